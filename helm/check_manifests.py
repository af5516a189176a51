#!/usr/bin/env python3
"""Checks the manifests `helm template` rendered from helm/beseda against the deployment's invariants.

Usage: check_manifests.py RENDERED.yaml [--registry-voters N] [--no-ingress] [--no-hpa]
                          [--external-secret NAME] [--service-monitor] [--kube-versions A,B]

Prints each invariant once with the components it was checked on, then "checks: N passed, M
failed"; exits 1 when any failed. Needs PyYAML; validates every object against the Kubernetes
JSON schemas when kubernetes-validate is installed (.ci/helm-check installs both into a cache venv).
"""

import argparse
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml

COMPONENTS = ("gateway", "routing", "bots", "registry")
STATELESS = ("gateway", "routing", "bots")
HEALTH_PATH = "/rs/health"
LIVE_PATH = "/rs/live"
HTTP_PORT = 8087
GRPC_PORT = 9087
DATA_DIR = "/var/lib/beseda"
COMPONENT_LABEL = "app.kubernetes.io/component"
INGRESS_PATHS = {"/api", "/ws", "/bots", "/webhooks", "/rs"}
# The external connections each role uses (services/server/src/app.rs opens no others).
ROLE_NEEDS = {
    "gateway": {"redis"},
    "routing": {"postgres", "redis", "smtp"},
    "bots": {"postgres", "redis"},
    "registry": {"redis"},
}

# One arm of the environment match in NodeConfig::load: `"LISTEN" => ...`.
CONFIG_RS_ARM = re.compile(r'^\s*"([A-Z][A-Z0-9_]*)"\s*=>', re.MULTILINE)


class Checker:
    """Collects results per invariant; an invariant checked on several components prints once."""

    def __init__(self):
        self.results = {}

    def check(self, condition, what, detail="", subject=None):
        """Records that `what` must hold (for `subject`, a component, when given)."""
        self.results.setdefault(what, []).append((subject, bool(condition), detail))
        return condition

    def report(self):
        failed_statements = []
        for what, results in self.results.items():
            subjects = list(dict.fromkeys(s for s, _, _ in results if s))
            failures = [(s, d) for s, ok, d in results if not ok]
            line = what + (f" [{', '.join(subjects)}]" if subjects else "")
            print(f"  {'FAIL' if failures else 'ok  '}  {line}")
            for subject, detail in failures:
                print("          " + ": ".join(part for part in (subject, detail) if part))
            if failures:
                failed_statements.append(line)
        passed = len(self.results) - len(failed_statements)
        print(f"  checks: {passed} passed, {len(failed_statements)} failed")
        if failed_statements:
            print("FAILED:", file=sys.stderr)
            for line in failed_statements:
                print(f"  {line}", file=sys.stderr)
            return 1
        return 0


def known_settings(repo_root):
    """The BESEDA_* names the server accepts (it refuses to start on any other), and where that
    list came from: the environment match of NodeConfig::load in services/server/src/config.rs."""
    config_rs = repo_root / "services" / "server" / "src" / "config.rs"
    names = {"BESEDA_" + key for key in CONFIG_RS_ARM.findall(config_rs.read_text())}
    if len(names) < 10:
        sys.exit(f"{config_rs}: found only {len(names)} settings; has the environment match of NodeConfig::load moved?")
    return names, f"the {len(names)} settings services/server/src/config.rs accepts"


def load(path):
    documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    by_kind = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    return documents, by_kind


def named(by_kind, kind, name):
    return next((d for d in by_kind.get(kind, []) if d["metadata"]["name"] == name), None)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def component_of(document):
    return document["metadata"].get("labels", {}).get(COMPONENT_LABEL)


def resolve_port(container, port):
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return declared["containerPort"]
    return None


def secret_reference(value):
    return value.get("secretKeyRef") if isinstance(value, dict) else None


def container_env(container, by_kind, checker, subject):
    """The container's environment as {name: value, or the valueFrom source}."""
    env = {}
    for source in container.get("envFrom", []):
        reference = source.get("configMapRef", {}).get("name")
        config_map = named(by_kind, "ConfigMap", reference)
        checker.check(config_map is not None, "the ConfigMap of envFrom is rendered", reference, subject)
        if config_map:
            env.update(config_map.get("data", {}))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            env[variable["name"]] = variable.get("valueFrom")
    return env


def schema_validation(documents, versions, checker):
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError:
        print("  skip  schema validation: kubernetes-validate is not installed")
        return
    for version in versions:
        errors, custom = [], set()
        for document in documents:
            label = f"{document['kind']}/{document['metadata']['name']}"
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except SchemaNotFoundError:
                custom.add(document["kind"])
            except Exception as error:  # ValidationError and friends: report, keep going
                errors.append(f"{label}: {getattr(error, 'message', error)}")
        note = f" ({', '.join(sorted(custom))}: no core schema, skipped)" if custom else ""
        checker.check(not errors, f"every object is valid against the Kubernetes {version} schemas, "
                      f"strict{note}", "; ".join(errors))


def check_workload(workload, component, by_kind, settings, external_secret, checker):
    """Checks one component's pod template; returns its container's environment."""
    pod = workload["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"].get("labels", {})

    def check(condition, what, detail=""):
        return checker.check(condition, what, detail, component)

    check(selects(workload["spec"]["selector"]["matchLabels"], labels)
          and labels.get(COMPONENT_LABEL) == component,
          "the workload's selector matches its pods, labelled with their component")
    check(spec.get("automountServiceAccountToken") is False, "no service account token is mounted")
    check(spec.get("enableServiceLinks") is False,
          "no service-link variables are injected (the release's Services would share the BESEDA_ prefix)")
    check(len(spec["containers"]) == 1, "one container per pod")

    pod_security = spec.get("securityContext", {})
    container = spec["containers"][0]
    for probe, path in (("livenessProbe", LIVE_PATH), ("readinessProbe", HEALTH_PATH)):
        http_get = container.get(probe, {}).get("httpGet", {})
        port = resolve_port(container, http_get.get("port"))
        check(http_get.get("path") == path and port == HTTP_PORT,
              f"{probe} is GET {path} on port {HTTP_PORT}", f"found {http_get or 'none'}")

    security = container.get("securityContext", {})
    run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
    run_as_user = security.get("runAsUser", pod_security.get("runAsUser"))
    check(run_as_non_root is True and run_as_user not in (None, 0), "runs as a non-root user",
          f"runAsNonRoot {run_as_non_root}, runAsUser {run_as_user}")
    check(security.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
    check(security.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    check("ALL" in security.get("capabilities", {}).get("drop", []), "drops ALL capabilities")

    resources = container.get("resources", {})
    check(bool(resources.get("requests", {}).get("cpu")) and bool(resources.get("requests", {}).get("memory"))
          and bool(resources.get("limits", {}).get("memory")),
          "CPU and memory requests and a memory limit are set", f"found {resources}")

    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    check(set(mounts) <= {DATA_DIR, "/tmp"} and DATA_DIR in mounts,
          f"writable mounts are only {DATA_DIR} and /tmp", f"mounts {sorted(mounts)}")
    if component == "registry":
        claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
        check(mounts.get(DATA_DIR) in claims, f"{DATA_DIR} is a PersistentVolumeClaim per pod", f"claims {claims}")
    else:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        check("emptyDir" in volumes.get(mounts.get(DATA_DIR), {}), f"{DATA_DIR} is an emptyDir (stateless)")

    env = container_env(container, by_kind, checker, component)
    allowed, source = settings
    unknown = sorted(k for k in env if k.startswith("BESEDA_") and k not in allowed)
    check(not unknown, f"every BESEDA_* variable is one of {source}", f"unknown {unknown}")
    check(env.get("BESEDA_ROLES") == component, "BESEDA_ROLES is the component's role",
          f"found {env.get('BESEDA_ROLES')!r}")
    check(env.get("BESEDA_LISTEN") == f"0.0.0.0:{HTTP_PORT}" and env.get("BESEDA_GRPC_LISTEN") == f"0.0.0.0:{GRPC_PORT}",
          f"listens on 0.0.0.0:{HTTP_PORT} (HTTP) and 0.0.0.0:{GRPC_PORT} (gRPC)")
    check(env.get("BESEDA_NODE_ID") == {"fieldRef": {"fieldPath": "metadata.name"}},
          "BESEDA_NODE_ID is the pod name (downward API)")
    check(env.get("BESEDA_DATA_DIR") == DATA_DIR, f"BESEDA_DATA_DIR={DATA_DIR}")

    # Each role gets the connections it uses, from a Secret, and no others.
    needs = ROLE_NEEDS[component]
    for setting, needed in (("BESEDA_POSTGRES_URL", "postgres" in needs), ("BESEDA_REDIS_URL", "redis" in needs)):
        reference = secret_reference(env.get(setting)) or {}
        secret = named(by_kind, "Secret", reference.get("name"))
        if not needed:
            check(setting not in env, f"{setting} is given only to the roles that use it")
        elif external_secret:
            check(reference.get("name") == external_secret and secret is None,
                  f"{setting} comes from the existing Secret {external_secret}", f"found {reference}")
        else:
            check(secret is not None and reference.get("key") in secret.get("stringData", secret.get("data", {})),
                  f"{setting} comes from a key of the chart's Secret", f"found {reference}")
    if "postgres" in needs:
        check(env.get("BESEDA_STORE_BACKEND") == "postgres", "BESEDA_STORE_BACKEND=postgres")
    else:
        check(not any(k.startswith(("BESEDA_STORE_", "BESEDA_POSTGRES_")) for k in env),
              "no store settings where no role uses the database")
    check("BESEDA_SMTP_URL" not in env or "smtp" in needs, "BESEDA_SMTP_URL is given only to routing, which sends mail")
    for setting in ("BESEDA_SMTP_URL", "BESEDA_CLUSTER_TOKEN"):
        value = env.get(setting)
        check(value is None or secret_reference(value) is not None, f"{setting}, when set, comes from a Secret")

    grace = int(env.get("BESEDA_SHUTDOWN_GRACE_SECONDS", 10))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_seconds = int(pre_stop[1]) if len(pre_stop) == 2 and pre_stop[0] == "sleep" else 0
    termination = spec.get("terminationGracePeriodSeconds", 30)
    check(termination > pre_stop_seconds + grace,
          "terminationGracePeriodSeconds > preStop sleep + BESEDA_SHUTDOWN_GRACE_SECONDS",
          f"{termination} <= {pre_stop_seconds} + {grace}")
    return env


def check_headless_endpoint(env, setting, client, target, pods_by_component, by_kind, namespace, checker):
    """`setting` of `client` is one URL naming a headless Service of `target`'s ready pods."""
    urls = [u for u in env.get(setting, "").split(",") if u]
    ok = len(urls) == 1
    for url in urls:
        parsed = urlparse(url)
        service_name, _, domain = (parsed.hostname or "").partition(".")
        service = named(by_kind, "Service", service_name)
        ok = ok and (service is not None and service["spec"].get("clusterIP") == "None"
                     and selects(service["spec"].get("selector"), pods_by_component[target])
                     and not service["spec"].get("publishNotReadyAddresses", False)
                     and domain.startswith(f"{namespace}.svc") and parsed.port == GRPC_PORT
                     and any(p["port"] == GRPC_PORT for p in service["spec"]["ports"]))
    checker.check(ok, f"{setting} is a headless Service of the ready {target} pods, port {GRPC_PORT}",
                  f"found {urls}", client)


def check_registry(registry, env, by_kind, pods_by_component, namespace, expected_voters, checker):
    voters = registry["spec"]["replicas"]
    service_name = registry["spec"]["serviceName"]
    checker.check(voters % 2 == 1 and voters >= 3 and voters == expected_voters,
                  f"registry StatefulSet replicas is odd, >= 3 and what the values ask for: {voters}",
                  f"expected {expected_voters}")
    peers_setting = env["registry"].get("BESEDA_REGISTRY_PEERS", "")
    peers = dict(p.split("=", 1) for p in peers_setting.split(",") if "=" in p)
    checker.check(len(peers) == voters,
                  f"BESEDA_REGISTRY_PEERS names as many peers as there are replicas: {len(peers)}", peers_setting)
    expected_hosts = {
        str(ordinal + 1): f"{registry['metadata']['name']}-{ordinal}.{service_name}.{namespace}.svc"
        for ordinal in range(voters)
    }
    checker.check(sorted(peers) == sorted(expected_hosts)
                  and all(urlparse(peers[i]).scheme == "http"
                          and (urlparse(peers[i]).hostname or "").startswith(expected_hosts[i])
                          and urlparse(peers[i]).port == GRPC_PORT for i in expected_hosts),
                  "peer id N is pod ordinal N-1, named under the registry's headless Service, gRPC port",
                  peers_setting)
    checker.check("BESEDA_REGISTRY_ID" not in env["registry"],
                  "BESEDA_REGISTRY_ID is left to the pod's host name (ordinal + 1)")
    for component in COMPONENTS:
        endpoints = [u for u in env[component].get("BESEDA_REGISTRY_ENDPOINTS", "").split(",") if u]
        checker.check(sorted(endpoints) == sorted(peers.values()),
                      "BESEDA_REGISTRY_ENDPOINTS lists every voter", f"found {endpoints}", component)
    service = named(by_kind, "Service", service_name)
    checker.check(service is not None and service["spec"].get("clusterIP") == "None"
                  and service["spec"].get("publishNotReadyAddresses") is True
                  and selects(service["spec"].get("selector"), pods_by_component["registry"]),
                  "the registry's Service is headless, publishes not-ready addresses and selects the voters")
    checker.check(registry["spec"].get("podManagementPolicy") == "Parallel",
                  "registry voters start in parallel (a lone voter cannot elect a leader)")
    anti_affinity = registry["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    checker.check(bool(anti_affinity), "registry voters have podAntiAffinity")
    return voters


def check_ingress(ingresses, gateway_services, env, checker):
    checker.check(len(ingresses) == 1, "one Ingress is rendered")
    for ingress in ingresses:
        annotations = ingress["metadata"].get("annotations", {})
        timeouts = [int(annotations.get(f"nginx.ingress.kubernetes.io/proxy-{d}-timeout", 0)) for d in ("read", "send")]
        checker.check(min(timeouts) >= 3600, "Ingress proxy read and send timeouts are >= 3600 s", f"found {timeouts}")
        checker.check(annotations.get("nginx.ingress.kubernetes.io/proxy-http-version") == "1.1",
                      "Ingress proxies with HTTP/1.1 (WebSocket upgrade)")
        paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
        backends = {p["backend"]["service"]["name"] for p in paths}
        checker.check(bool(gateway_services) and backends == {gateway_services[0]["metadata"]["name"]},
                      "every Ingress path goes to the gateway Service", f"found {sorted(backends)}")
        prefixes = {p["path"] for p in paths}
        checker.check(INGRESS_PATHS <= prefixes and not {"/", "/metrics"} & prefixes,
                      f"Ingress exposes {', '.join(sorted(INGRESS_PATHS))} and not /metrics", f"found {sorted(prefixes)}")
        tls_hosts = {h for t in ingress["spec"].get("tls", []) for h in t.get("hosts", [])}
        rule_hosts = {r.get("host") for r in ingress["spec"]["rules"]}
        scheme = "https" if rule_hosts <= tls_hosts else "http"
        public_url = env.get("BESEDA_PUBLIC_URL", "")
        checker.check(public_url in {f"{scheme}://{h}" for h in rule_hosts} or urlparse(public_url).hostname in rule_hosts,
                      f"BESEDA_PUBLIC_URL is the Ingress host: {public_url}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests")
    parser.add_argument("--registry-voters", type=int, default=3)
    parser.add_argument("--no-ingress", action="store_true")
    parser.add_argument("--no-hpa", action="store_true")
    parser.add_argument("--external-secret", default="")
    parser.add_argument("--service-monitor", action="store_true")
    parser.add_argument("--kube-versions", default="1.25.0,1.37.0")
    arguments = parser.parse_args()

    repo_root = Path(__file__).resolve().parent.parent
    documents, by_kind = load(arguments.manifests)
    checker = Checker()
    print(f"  {len(documents)} objects: " + ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items())))

    keys = [(d["kind"], d["metadata"]["name"]) for d in documents]
    checker.check(len(keys) == len(set(keys)), "no two objects share a kind and a name")
    schema_validation(documents, arguments.kube_versions.split(","), checker)

    # Workloads: three Deployments and one StatefulSet, one per component.
    workloads = {}
    for kind in ("Deployment", "StatefulSet"):
        for document in by_kind.get(kind, []):
            workloads[component_of(document)] = document
    found = {c: w["kind"] for c, w in workloads.items()}
    expected = {**{c: "Deployment" for c in STATELESS}, "registry": "StatefulSet"}
    if not checker.check(found == expected, "gateway, routing and bots are Deployments, registry is a StatefulSet",
                         f"found {found}"):
        return checker.report()

    settings = known_settings(repo_root)
    env = {c: check_workload(workloads[c], c, by_kind, settings, arguments.external_secret, checker)
           for c in COMPONENTS}
    pods_by_component = {c: workloads[c]["spec"]["template"]["metadata"]["labels"] for c in COMPONENTS}
    namespace = workloads["gateway"]["metadata"].get("namespace", "default")
    shared = ("BESEDA_PUBLIC_URL", "BESEDA_ROUTING_ENDPOINTS", "BESEDA_BOTS_ENDPOINTS")
    checker.check(all(env[c].get(s) == env["gateway"].get(s) for c in COMPONENTS for s in shared)
                  and len({json.dumps(env[c].get("BESEDA_REDIS_URL"), sort_keys=True)
                           for c in COMPONENTS if "redis" in ROLE_NEEDS[c]}) == 1,
                  "every component sees the same public URL and endpoints, and those using Redis the same Redis")
    tokens = {json.dumps(env[c].get("BESEDA_CLUSTER_TOKEN"), sort_keys=True) for c in COMPONENTS}
    checker.check(len(tokens) == 1, "every component presents the same cluster token source (or none)", str(tokens))

    voters = check_registry(workloads["registry"], env, by_kind, pods_by_component, namespace,
                            arguments.registry_voters, checker)

    # Clients of routing and bots resolve headless Services and balance over every ready pod.
    for client in ("gateway", "bots"):
        check_headless_endpoint(env[client], "BESEDA_ROUTING_ENDPOINTS", client, "routing", pods_by_component,
                                by_kind, namespace, checker)
    check_headless_endpoint(env["gateway"], "BESEDA_BOTS_ENDPOINTS", "gateway", "bots", pods_by_component,
                            by_kind, namespace, checker)

    # Disruption budgets: one per component; the registry keeps a majority.
    budgets = by_kind.get("PodDisruptionBudget", [])
    for component in COMPONENTS:
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], pods_by_component[component])]
        checker.check(len(matching) == 1, "exactly one PodDisruptionBudget selects the pods",
                      f"found {len(matching)}", component)
        if component == "registry" and matching:
            majority = voters // 2 + 1
            checker.check(matching[0]["spec"].get("minAvailable") == majority,
                          f"the registry's PodDisruptionBudget keeps a majority: minAvailable {majority} of {voters}",
                          f"found {matching[0]['spec']}")

    # Autoscaling of gateway and routing.
    autoscalers = by_kind.get("HorizontalPodAutoscaler", [])
    for component in ("gateway", "routing"):
        deployment = workloads[component]
        targeting = [h for h in autoscalers if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
                     and h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        if arguments.no_hpa:
            checker.check(not targeting and "replicas" in deployment["spec"],
                          "no HPA; the Deployment has fixed replicas", "", component)
            continue
        checker.check(len(targeting) == 1 and "replicas" not in deployment["spec"],
                      "an HPA targets the Deployment, which leaves replicas to it", "", component)
        for autoscaler in targeting:
            metrics = [m["resource"]["name"] for m in autoscaler["spec"].get("metrics", []) if m["type"] == "Resource"]
            checker.check("cpu" in metrics and 1 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"],
                          "the HPA scales on CPU, 1 <= min <= max", f"found {autoscaler['spec']}", component)
    scalable = {workloads[c]["metadata"]["name"] for c in ("gateway", "routing")}
    checker.check(all(h["spec"]["scaleTargetRef"]["name"] in scalable for h in autoscalers),
                  "HPAs target nothing but the gateway and routing Deployments")

    # The way in: Ingress -> gateway Service -> gateway pods.
    gateway_services = [s for s in by_kind.get("Service", [])
                        if selects(s["spec"].get("selector"), pods_by_component["gateway"])]
    checker.check(len(gateway_services) == 1 and any(p["name"] == "http" for p in gateway_services[0]["spec"]["ports"])
                  and gateway_services[0]["spec"].get("type", "ClusterIP") == "ClusterIP",
                  "one ClusterIP Service selects the gateways, with an http port")
    if arguments.no_ingress:
        checker.check(not by_kind.get("Ingress"), "no Ingress is rendered")
    else:
        check_ingress(by_kind.get("Ingress", []), gateway_services, env["gateway"], checker)

    # Metrics: a ServiceMonitor over every component's http port, or scrape annotations.
    monitors = by_kind.get("ServiceMonitor", [])
    if arguments.service_monitor:
        checker.check(len(monitors) == 1, "a ServiceMonitor is rendered")
        for monitor in monitors:
            selector = monitor["spec"]["selector"]["matchLabels"]
            scraped = sorted({component_of(s) for s in by_kind.get("Service", [])
                              if selects(selector, s["metadata"].get("labels", {}))
                              and any(p["name"] == "http" for p in s["spec"]["ports"])})
            checker.check(scraped == sorted(COMPONENTS), "the ServiceMonitor scrapes every component",
                          f"found {scraped}")
    else:
        checker.check(not monitors, "no ServiceMonitor is rendered")
    for component in COMPONENTS:
        annotations = workloads[component]["spec"]["template"]["metadata"].get("annotations", {})
        checker.check(annotations.get("prometheus.io/scrape") == "true"
                      and annotations.get("prometheus.io/port") == str(HTTP_PORT)
                      and annotations.get("prometheus.io/path") == "/metrics",
                      "pods carry Prometheus scrape annotations for /metrics", "", component)

    # gRPC must not be reachable from outside the release while the NetworkPolicy is on.
    for policy in by_kind.get("NetworkPolicy", []):
        covered = all(selects(policy["spec"]["podSelector"].get("matchLabels"), pods_by_component[c]) for c in COMPONENTS)
        grpc_rules = [r for r in policy["spec"].get("ingress", [])
                      if any(p.get("port") in ("grpc", GRPC_PORT) for p in r.get("ports", []))]
        open_rules = [r for r in policy["spec"].get("ingress", []) if not r.get("from")]
        checker.check(covered and grpc_rules and all(r.get("from") for r in grpc_rules)
                      and all(p.get("port") in ("http", HTTP_PORT) for r in open_rules for p in r.get("ports", [{}])),
                      "the NetworkPolicy admits gRPC only from the release's pods")

    return checker.report()


if __name__ == "__main__":
    sys.exit(main())
