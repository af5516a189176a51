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

What points at in-cluster hosts is replaced by this machine's (PostgreSQL, Redis, listen
addresses, data directory); every other variable, endpoint lists included, is the pod's own.
A negative control adds a misspelt setting and expects the refusal that the check guards against.

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
import urllib.request

import yaml

CLUSTER_IP_BASE = "10.96.0."
START_TIMEOUT_SECONDS = 30


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


def pod_name(workload):
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return f"{name}-0"
    return f"{name}-7c9d8f6b5-x2k4q"


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


def container_environment(workload, by_kind):
    pod = pod_name(workload)
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
    return pod, env


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


def live(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/rs/live", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("binary")
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--redis-url", required=True)
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

    workloads = [w for kind in ("Deployment", "StatefulSet") for w in by_kind.get(kind, {}).values()]
    failures = 0
    run_id = f"{os.getpid()}_{int(time.time())}"
    with tempfile.TemporaryDirectory() as work:
        for workload in workloads:
            pod, env = container_environment(workload, by_kind)
            http_port, grpc_port = free_port(), free_port()
            data_dir = os.path.join(work, pod)
            os.makedirs(data_dir)
            machine = {
                "BESEDA_LISTEN": f"127.0.0.1:{http_port}",
                "BESEDA_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
                "BESEDA_DATA_DIR": data_dir,
                "BESEDA_REDIS_CHANNEL_PREFIX": f"podenv_{run_id}",
            }
            if "BESEDA_POSTGRES_URL" in env:
                machine["BESEDA_POSTGRES_URL"] = arguments.postgres_url
                machine["BESEDA_POSTGRES_SCHEMA"] = f"podenv_{run_id}"
            if "BESEDA_REDIS_URL" in env:
                machine["BESEDA_REDIS_URL"] = arguments.redis_url
            process_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod,
                           **links, **env, **machine}
            log_path = os.path.join(work, f"{pod}.log")
            process = start(arguments.binary, process_env, log_path)
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            started = False
            while time.monotonic() < deadline and process.poll() is None:
                if live(http_port):
                    started = True
                    break
                time.sleep(0.2)
            # Still running a moment later: it did not answer and then exit on a late check.
            time.sleep(0.5)
            started = started and process.poll() is None
            stop(process)
            role = env.get("BESEDA_ROLES", "?")
            if started:
                print(f"  ok    {pod} ({role}) started with {len(process_env)} variables and answered /rs/live")
            else:
                failures += 1
                print(f"  FAIL  {pod} ({role}) did not start (exit {process.returncode}); its output:")
                print("".join("        " + line for line in open(log_path).readlines()[-20:]))

            if workload is workloads[0]:
                # The control: a misspelt setting in the same environment is still refused.
                control_env = {**process_env, "BESEDA_LISTN": "0.0.0.0:8087"}
                control = start(arguments.binary, control_env, log_path + ".control")
                try:
                    control.wait(timeout=START_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
                refused = control.returncode not in (None, 0) and "BESEDA_LISTN" in open(log_path + ".control").read()
                stop(control)
                if refused:
                    print("  ok    control: the same environment plus BESEDA_LISTN is refused, naming it")
                else:
                    failures += 1
                    print("  FAIL  control: a misspelt BESEDA_LISTN was not refused")
    if failures:
        sys.exit(f"{failures} pod environment check(s) failed")


if __name__ == "__main__":
    main()
