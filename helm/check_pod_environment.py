#!/usr/bin/env python3
"""Starts the real `beseda` binary once per workload of a rendered chart, with the environment
its pod would have under Kubernetes, and checks that each process starts and answers /rs/live.

`helm template` and `helm lint` cannot see what the kubelet adds to a pod: the pod's own
variables (HOSTNAME, the `kubernetes` Service's links) and, unless the pod sets
`enableServiceLinks: false`, service-link variables for every Service of the namespace. With the
release named `beseda` those share the server's `BESEDA_` prefix (`BESEDA_GATEWAY_SERVICE_HOST`,
`BESEDA_GATEWAY_PORT=tcp://...`), and a server that refuses unknown `BESEDA_*` names would exit.
The chart turns the links off; this check adds them anyway, so the server's own rule
(services/server/src/config.rs, `is_kubernetes_service_link`) is proven too.

The links are derived by the documented rule (Kubernetes "Environment variables" of Services):
for a Service `my-svc` with cluster IP `ip` and ports p1 (named `http`), p2 ...:
  MY_SVC_SERVICE_HOST=ip, MY_SVC_SERVICE_PORT=p1, MY_SVC_SERVICE_PORT_HTTP=p1,
  MY_SVC_PORT=tcp://ip:p1, and per port MY_SVC_PORT_<p>_TCP=tcp://ip:p with _PROTO, _PORT, _ADDR.
The kubelet skips headless Services; this check gives every Service links as if it had a cluster
IP, a superset, so a later Service with an IP cannot break the pods either.

Every pod of the chart (three registry voters, routing, bots, a gateway) starts at once, as one
cluster on loopback: what names a host of the cluster network is replaced by this machine's
address for it (the Services' and pods' DNS names by the ports given to each process,
PostgreSQL and Redis by the local ones, the data directory by a temporary one); every other
variable is the pod's own. Each process must answer /rs/live and the gateway /rs/health (200:
routing, Redis and the registry reached). A negative control adds a misspelt setting and expects
the refusal that the check guards against.

Usage: check_pod_environment.py RENDERED.yaml BINARY --postgres-url URL --redis-url URL
"""

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

CLUSTER_IP_BASE = "10.96.0."
START_TIMEOUT_SECONDS = 60
HTTP_PORT, GRPC_PORT = 8087, 9087
COMPONENT_LABEL = "app.kubernetes.io/component"


def link_name(service_name):
    return service_name.upper().replace("-", "_").replace(".", "_")


def service_links(service, address):
    """The variables of one Service, by the documented rule."""
    prefix = link_name(service["metadata"]["name"])
    ports = service["spec"].get("ports", [])
    if not ports:
        return {}
    links = {f"{prefix}_SERVICE_HOST": address, f"{prefix}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        if port.get("name"):
            links[f"{prefix}_SERVICE_PORT_{link_name(port['name'])}"] = str(port["port"])
    first = ports[0]
    links[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{address}:{first['port']}"
    for port in ports:
        protocol = port.get("protocol", "TCP")
        base = f"{prefix}_PORT_{port['port']}_{protocol}"
        links[base] = f"{protocol.lower()}://{address}:{port['port']}"
        links[f"{base}_PROTO"] = protocol.lower()
        links[f"{base}_PORT"] = str(port["port"])
        links[f"{base}_ADDR"] = address
    return links


def kubernetes_service_links():
    """The `kubernetes` Service's links, which every pod of every namespace gets."""
    service = {"metadata": {"name": "kubernetes"}, "spec": {"ports": [{"name": "https", "port": 443}]}}
    return service_links(service, CLUSTER_IP_BASE + "1")


def pod_names(workload):
    """The pods a workload makes: a StatefulSet's by ordinal, one pod of a Deployment."""
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return [f"{name}-{ordinal}" for ordinal in range(int(workload["spec"].get("replicas", 1)))]
    return [f"{name}-7c9d8f6b5-x2k4q"]


def resolve(value_from, by_kind, pod):
    if "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
        kind, reference = (("Secret", value_from["secretKeyRef"]) if "secretKeyRef" in value_from
                           else ("ConfigMap", value_from["configMapKeyRef"]))
        source = by_kind.get(kind, {}).get(reference["name"])
        if source is None:
            sys.exit(f"{kind} {reference['name']} is not in the rendered chart")
        data = source.get("stringData") or source.get("data") or {}
        return str(data[reference["key"]])
    if "fieldRef" in value_from:
        path = value_from["fieldRef"]["fieldPath"]
        return {"metadata.name": pod, "metadata.namespace": "beseda-ci", "status.podIP": "10.244.1.7"}.get(path, "")
    sys.exit(f"unsupported valueFrom {value_from}")


def container_environment(workload, pod, by_kind):
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        kind, reference = (("ConfigMap", source["configMapRef"]) if "configMapRef" in source
                           else ("Secret", source["secretRef"]))
        data = by_kind.get(kind, {}).get(reference["name"], {})
        env.update({k: str(v) for k, v in (data.get("stringData") or data.get("data") or {}).items()})
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            env[variable["name"]] = resolve(variable["valueFrom"], by_kind, pod)
    return env


def free_port():
    # Outside the kernel's ephemeral range, where an outgoing connection could take it first.
    for _ in range(200):
        port = random.randint(20000, 29999)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    sys.exit("no free port found")


def live(port, endpoint="live"):
    return answer_of(port, endpoint)[0] == 200


def answer_of(port, endpoint):
    """(status, body) of GET /rs/<endpoint>; (None, reason) when there is no answer. The timeout
    is above the server's own 1 s per health component: a registry still electing its leader
    makes /rs/health take that long."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/rs/{endpoint}", timeout=5) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return None, str(error)


def start(binary, env, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Pod:
    def __init__(self, workload, name, env):
        self.workload, self.name, self.env = workload, name, env
        self.component = workload["spec"]["template"]["metadata"]["labels"].get(COMPONENT_LABEL)
        self.ports = {HTTP_PORT: free_port(), GRPC_PORT: free_port()}
        self.process = None
        self.log_path = None


def loopback_addresses(pods, services, namespace):
    """In-cluster DNS names of the chart's Services and pods -> this machine's address for them."""
    addresses = {}
    for service in services:
        selector = service["spec"].get("selector", {})
        backing = [pod for pod in pods if pod.component == selector.get(COMPONENT_LABEL)]
        if not backing:
            continue
        service_host = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            target = {"http": HTTP_PORT, "grpc": GRPC_PORT}.get(target, target)
            addresses[f"{service_host}:{port['port']}"] = f"127.0.0.1:{backing[0].ports[int(target)]}"
            for pod in backing:
                addresses[f"{pod.name}.{service_host}:{port['port']}"] = f"127.0.0.1:{pod.ports[int(target)]}"
    return addresses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("binary")
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", default="beseda-ci")
    arguments = parser.parse_args()

    documents = [d for d in yaml.safe_load_all(open(arguments.rendered)) if d]
    by_kind = {}
    for document in documents:
        by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document
    services = sorted(by_kind.get("Service", {}).values(), key=lambda s: s["metadata"]["name"])
    links = kubernetes_service_links()
    for index, service in enumerate(services, start=10):
        links.update(service_links(service, CLUSTER_IP_BASE + str(index)))
    prefixed = sorted(name for name in links if name.startswith("BESEDA_"))
    print(f"  {len(links)} service-link variables for {len(services)} Services and `kubernetes`, "
          f"{len(prefixed)} with the BESEDA_ prefix (e.g. {', '.join(prefixed[:3])})")

    workloads = [w for kind in ("StatefulSet", "Deployment") for w in by_kind.get(kind, {}).values()]
    pods = [Pod(workload, name, container_environment(workload, name, by_kind))
            for workload in workloads for name in pod_names(workload)]
    addresses = loopback_addresses(pods, services, arguments.namespace)
    run_id = f"{os.getpid()}_{int(time.time())}"
    failures = 0
    with tempfile.TemporaryDirectory() as work:
        for pod in pods:
            data_dir = os.path.join(work, pod.name)
            os.makedirs(data_dir)
            # What names hosts of the cluster network becomes this machine's; nothing else changes.
            machine = {
                "BESEDA_LISTEN": f"127.0.0.1:{pod.ports[HTTP_PORT]}",
                "BESEDA_GRPC_LISTEN": f"127.0.0.1:{pod.ports[GRPC_PORT]}",
                "BESEDA_DATA_DIR": data_dir,
                "BESEDA_REDIS_CHANNEL_PREFIX": f"podenv_{run_id}",
            }
            if "BESEDA_POSTGRES_URL" in pod.env:
                machine["BESEDA_POSTGRES_URL"] = arguments.postgres_url
                machine["BESEDA_POSTGRES_SCHEMA"] = f"podenv_{run_id}"
            if "BESEDA_REDIS_URL" in pod.env:
                machine["BESEDA_REDIS_URL"] = arguments.redis_url
            env = dict(pod.env)
            for name, value in env.items():
                for host, address in addresses.items():
                    value = value.replace(host, address)
                env[name] = value
            pod.process_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod.name,
                               **links, **env, **machine}
            pod.log_path = os.path.join(work, f"{pod.name}.log")

        # The control: the first pod's environment plus a misspelt setting is refused, naming it.
        control_log = os.path.join(work, "control.log")
        control = start(arguments.binary, {**pods[0].process_env, "BESEDA_LISTN": "0.0.0.0:8087"}, control_log)
        try:
            control.wait(timeout=START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        refused = control.returncode not in (None, 0) and "BESEDA_LISTN" in open(control_log).read()
        stop(control)
        if refused:
            print("  ok    control: the same environment plus BESEDA_LISTN is refused, naming it")
        else:
            failures += 1
            print("  FAIL  control: a misspelt BESEDA_LISTN was not refused")

        # Every pod at once, as a rollout starts them; the voters elect a leader among themselves.
        for pod in pods:
            pod.process = start(arguments.binary, pod.process_env, pod.log_path)
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            waiting = list(pods)
            while waiting and time.monotonic() < deadline:
                waiting = [pod for pod in waiting if pod.process.poll() is None and not live(pod.ports[HTTP_PORT], "live")]
                time.sleep(0.2)
            gateways = [pod for pod in pods if pod.component == "gateway"]
            while time.monotonic() < deadline and not all(live(p.ports[HTTP_PORT], "health") for p in gateways):
                time.sleep(0.5)
            for pod in pods:
                role = pod.env.get("BESEDA_ROLES", "?")
                running = pod.process.poll() is None
                endpoint = "health" if pod.component == "gateway" else "live"
                if running and live(pod.ports[HTTP_PORT], endpoint):
                    print(f"  ok    {pod.name} ({role}) started with {len(pod.process_env)} variables and "
                          f"answers /rs/{endpoint}")
                else:
                    failures += 1
                    status, body = answer_of(pod.ports[HTTP_PORT], endpoint) if running else (None, "")
                    print(f"  FAIL  {pod.name} ({role}) "
                          f"{f'runs; /rs/{endpoint} answers {status}: {body}' if running else 'exited'}; its output:")
                    print("".join("        " + line for line in open(pod.log_path).readlines()[-15:]))
        finally:
            for pod in pods:
                stop(pod.process)
            # Leave nothing behind in the shared database.
            subprocess.run(["psql", arguments.postgres_url, "-q", "-c",
                            f"DROP SCHEMA IF EXISTS podenv_{run_id} CASCADE"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if failures:
        sys.exit(f"{failures} pod environment check(s) failed")
    print(f"  the chart's {len(pods)} pods ran together as one cluster, the gateway healthy")


if __name__ == "__main__":
    main()
