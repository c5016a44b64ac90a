"""Offline checks of the Kubernetes manifests in deploy/: what JSON schemas miss.

Each ``*_problems`` function takes rendered objects (plain dicts, as ``kubectl
kustomize`` prints them) and returns a list of human-readable problems, so a
test asserts ``== []`` and a malformed-form test feeds a modified object and
expects a problem. Anything the checkers do not understand (``matchExpressions``,
``endPort``) is reported as a problem rather than guessed at.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

Obj = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
APP_LABEL = "app.kubernetes.io/component"


def find_tool(name: str) -> str:
    """A dev-dependency binary: the running venv's first (CI), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: `make venv` installs it (a dev dependency)")
    return found


def overlays() -> list[str]:
    return sorted(
        p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists()
    )


def render(path: Path) -> list[Obj]:
    out = subprocess.run(
        [find_tool("kubectl"), "kustomize", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def name_of(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def workloads(objs: Iterable[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Mapping[str, Any]) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def app_of(workload: Mapping[str, Any]) -> str:
    return pod_labels(workload)[APP_LABEL]


def match_labels(selector: Mapping[str, Any], where: str) -> dict[str, str] | str:
    """The selector's matchLabels, or a problem when it uses anything else."""
    if set(selector) - {"matchLabels"}:
        return f"{where}: only matchLabels selectors are checked, got {sorted(selector)}"
    labels: dict[str, str] = selector.get("matchLabels", {})
    return labels


def selects(labels: Mapping[str, str], pods: Mapping[str, str]) -> bool:
    return all(pods.get(k) == v for k, v in labels.items())


def get(objs: Iterable[Obj], kind: str, name: str) -> Obj:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KeyError(f"{kind}/{name}")


# -- selectors and ports -----------------------------------------------------------


def _port_exists(port: int | str, ctrs: Iterable[Mapping[str, Any]]) -> bool:
    ports = [p for c in ctrs for p in c.get("ports", [])]
    if isinstance(port, str):
        return any(p.get("name") == port for p in ports)
    return any(p["containerPort"] == port for p in ports)


def selector_problems(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    pods = {name_of(w): w for w in workloads(objs)}

    def matching(labels: Mapping[str, str]) -> list[Obj]:
        return [w for w in pods.values() if selects(labels, pod_labels(w))]

    for name, w in pods.items():
        own = match_labels(w["spec"]["selector"], f"{name} selector")
        if isinstance(own, str):
            problems.append(own)
        elif not own or not selects(own, pod_labels(w)):
            problems.append(f"{name}: selector {own} does not match its own pod labels")
        for i, tsc in enumerate(pod_spec(w).get("topologySpreadConstraints", [])):
            labels = match_labels(tsc["labelSelector"], f"{name} topologySpread[{i}]")
            if isinstance(labels, str) or not selects(labels, pod_labels(w)):
                problems.append(f"{name}: topologySpreadConstraints[{i}] misses its own pods")
    for obj in objs:
        kind, name = obj["kind"], name_of(obj)
        if kind == "Service":
            selector = obj["spec"].get("selector") or {}
            targets = matching(selector) if selector else []
            if not targets:
                problems.append(f"{name}: selector {selector} matches no pods")
            for port in obj["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                for w in targets:
                    if not _port_exists(target, containers(w)):
                        problems.append(f"{name}: targetPort {target!r} not on {name_of(w)}")
        elif kind == "PodDisruptionBudget":
            labels = match_labels(obj["spec"]["selector"], name)
            if isinstance(labels, str):
                problems.append(labels)
            elif not labels or not matching(labels):
                problems.append(f"{name}: selector {labels} matches no pods")
        elif kind == "NetworkPolicy":
            labels = match_labels(obj["spec"]["podSelector"], name)
            if isinstance(labels, str):
                problems.append(labels)
            elif labels and not matching(labels):
                problems.append(f"{name}: podSelector {labels} matches no pods")
        elif kind == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            target = pods.get(f"{ref['kind']}/{ref['name']}")
            if target is None:
                problems.append(f"{name}: scaleTargetRef {ref['kind']}/{ref['name']} not defined")
                continue
            if "replicas" in target["spec"]:
                problems.append(f"{name}: {name_of(target)} sets replicas; the HPA owns them")
            for c in containers(target):
                if "cpu" not in c.get("resources", {}).get("requests", {}):
                    problems.append(f"{name}: container {c['name']} has no cpu request")
    return problems


def probe_problems(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    for w in workloads(objs):
        for c in pod_spec(w)["containers"]:
            where = f"{name_of(w)} container {c['name']}"
            for kind in ("readinessProbe", "livenessProbe"):
                if kind not in c:
                    problems.append(f"{where}: no {kind}")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind, {})
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe and not _port_exists(probe[handler]["port"], [c]):
                        port = probe[handler]["port"]
                        problems.append(f"{where}: {kind} port {port!r} is not a container port")
    return problems


# -- security ------------------------------------------------------------------------


def security_problems(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    for w in workloads(objs):
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{name_of(w)}: {flag}")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name_of(w)}: automountServiceAccountToken must be false")
        for c in containers(w):
            where = f"{name_of(w)} container {c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            if sc.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if not isinstance(sc.get("runAsUser"), int) or sc["runAsUser"] <= 0:
                problems.append(f"{where}: runAsUser must be a non-zero uid")
            csc = c.get("securityContext", {})
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                problems.append(f"{where}: privileged")
            caps = csc.get("capabilities", {})
            if "ALL" not in caps.get("drop", []) or caps.get("add"):
                problems.append(f"{where}: capabilities must drop ALL and add none")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(part, {}):
                        problems.append(f"{where}: no {res} in resources.{part}")
            if not any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])):
                problems.append(f"{where}: read-only root without a writable /tmp")
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{where}: image {image!r} has no pinned tag")
    return problems


SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|AUTH|CREDENTIAL", re.IGNORECASE)


def inline_secret_problems(objs: list[Obj]) -> list[str]:
    problems = [
        f"{name_of(o)}: Secrets are created by the operator, never shipped"
        for o in objs
        if o["kind"] == "Secret"
    ]
    for w in workloads(objs):
        for c in containers(w):
            for env in c.get("env", []):
                if "value" in env and SECRETISH.search(env["name"]):
                    problems.append(
                        f"{name_of(w)} container {c['name']}: env {env['name']} has an inline "
                        "value; use valueFrom.secretKeyRef"
                    )
    return problems


# -- ConfigMap and Secret references -------------------------------------------------


@dataclass(frozen=True, order=True)
class SecretRef:
    secret: str
    key: str | None  # None: the whole Secret (a volume without items)


def _volume_refs(volume: Mapping[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key) for each ConfigMap/Secret a volume reads."""
    if "configMap" in volume:
        items = volume["configMap"].get("items") or [{"key": None}]
        for item in items:
            yield "ConfigMap", volume["configMap"]["name"], item["key"]
    if "secret" in volume:
        items = volume["secret"].get("items") or [{"key": None}]
        for item in items:
            yield "Secret", volume["secret"]["secretName"], item["key"]
    for source in volume.get("projected", {}).get("sources", []):
        yield from _volume_refs(
            {"configMap": source["configMap"]} if "configMap" in source else source
        )


def references(workload: Mapping[str, Any]) -> set[tuple[str, str, str | None]]:
    refs: set[tuple[str, str, str | None]] = set()
    for volume in pod_spec(workload).get("volumes", []):
        refs.update(_volume_refs(volume))
    for c in containers(workload):
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            if "secretKeyRef" in source:
                refs.add(("Secret", source["secretKeyRef"]["name"], source["secretKeyRef"]["key"]))
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                refs.add(("ConfigMap", ref["name"], ref["key"]))
        for env_from in c.get("envFrom", []):
            if "secretRef" in env_from:
                refs.add(("Secret", env_from["secretRef"]["name"], None))
            if "configMapRef" in env_from:
                refs.add(("ConfigMap", env_from["configMapRef"]["name"], None))
    return refs


def reference_problems(objs: list[Obj], documented: Mapping[str, set[str]]) -> list[str]:
    """Every referenced ConfigMap is rendered; every Secret is rendered or documented."""
    problems: list[str] = []
    defined = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    for w in workloads(objs):
        for kind, name, key in sorted(references(w), key=str):
            where = f"{name_of(w)}: {kind} {name}" + (f" key {key}" if key else "")
            obj = defined.get((kind, name))
            if obj is not None:
                if key is not None and key not in obj.get("data", {}):
                    problems.append(f"{where}: no such key in the rendered {kind}")
            elif kind == "ConfigMap":
                problems.append(f"{where}: not in the rendered output")
            elif name not in documented:
                problems.append(f"{where}: neither rendered nor a documented operator Secret")
            elif key is not None and key not in documented[name]:
                problems.append(f"{where}: key not documented in docs/deployment.md")
    return problems


def secret_refs(objs: list[Obj]) -> set[SecretRef]:
    return {
        SecretRef(name, key)
        for w in workloads(objs)
        for kind, name, key in references(w)
        if kind == "Secret"
    }


def documented_secrets(doc: str) -> dict[str, set[str]]:
    """The operator-created Secrets table of docs/deployment.md: name -> keys."""
    start = doc.index("<!-- operator-secrets:start -->")
    end = doc.index("<!-- operator-secrets:end -->")
    table: dict[str, set[str]] = {}
    for line in doc[start:end].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        table[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[1]))
    return table


def created_secrets(doc: str) -> dict[str, set[str]]:
    """Secrets the doc's `kubectl create secret generic` commands create: name -> keys."""
    created: dict[str, set[str]] = {}
    joined = re.sub(r"\\\n\s*", " ", doc)
    for match in re.finditer(r"kubectl[^\n]*?create secret generic (\S+)([^\n]*)", joined):
        keys = set(re.findall(r"--from-(?:literal|file)=([^=\s]+)=", match.group(2)))
        created.setdefault(match.group(1), set()).update(keys)
    return created


# -- configs inside ConfigMaps ---------------------------------------------------------


def fake_secret(secret: str, key: str) -> str:
    """A well-formed stand-in for an operator Secret's value."""
    if key == "keys":
        return "k1:" + base64.b64encode(bytes(range(32))).decode()
    if key == "url":
        return "rediss://:fake-password@redis.example:6379/0"
    return f"fake-{secret}-{key}-0123456789abcdef"


@dataclass(frozen=True)
class ContainerFiles:
    """What a container can read: mounted files and env, with fake secret values."""

    files: dict[str, str]
    env: dict[str, str]

    def read_file(self, path: str) -> str:
        if path not in self.files:
            raise FileNotFoundError(2, "not mounted in the container", path)
        return self.files[path]


def container_files(objs: list[Obj], workload: Obj, container: Obj) -> ContainerFiles:
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        base = mount["mountPath"].rstrip("/")
        if "configMap" in volume:
            data = get(objs, "ConfigMap", volume["configMap"]["name"]).get("data", {})
            for key, value in data.items():
                files[f"{base}/{key}"] = value
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            items = volume["secret"].get("items")
            if items is None:
                keys = documented_secrets(DEPLOYMENT_DOC.read_text(encoding="utf-8")).get(
                    name, set()
                )
                items = [{"key": k, "path": k} for k in keys]
            for item in items:
                files[f"{base}/{item['path']}"] = fake_secret(name, item["key"])
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = fake_secret(ref["name"], ref["key"])
    return ContainerFiles(files, env)


def config_path(container: Mapping[str, Any]) -> str | None:
    args: list[str] = container.get("args", [])
    if "--config" not in args:
        return None
    return args[args.index("--config") + 1]


# -- NetworkPolicy edges -----------------------------------------------------------------

ANY = "*"
WORLD = "world"
Edge = tuple[str, str, str]  # (from, to, "TCP/8080" or "*")


def _labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass(frozen=True)
class _Rule:
    peers: tuple[str, ...]  # app names, WORLD, external peer names, or ANY
    ports: tuple[tuple[str, int | str], ...] | None  # None: every port


class EdgeError(ValueError):
    pass


def _peers(entries: list[Obj] | None, apps: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    if not entries:
        return (ANY,)
    peers: list[str] = []
    for entry in entries:
        if "ipBlock" in entry:
            block = entry["ipBlock"]
            if block.get("except"):
                raise EdgeError(f"ipBlock except is not modelled: {block}")
            cidr = block["cidr"]
            peers.append(WORLD if cidr in ("0.0.0.0/0", "::/0") else f"cidr:{cidr}")
            continue
        pods = match_labels(entry.get("podSelector", {}), "peer podSelector")
        if isinstance(pods, str):
            raise EdgeError(pods)
        if "namespaceSelector" in entry:
            ns = match_labels(entry["namespaceSelector"], "peer namespaceSelector")
            if isinstance(ns, str):
                raise EdgeError(ns)
            peers.append(f"ns[{_labels_text(ns)}]/pods[{_labels_text(pods)}]")
        else:
            peers.extend(app for app, labels in apps.items() if selects(pods, labels))
    return tuple(peers)


def _ports(entries: list[Obj] | None) -> tuple[tuple[str, int | str], ...] | None:
    if not entries:
        return None
    out: list[tuple[str, int | str]] = []
    for entry in entries:
        if "endPort" in entry:
            raise EdgeError("endPort is not modelled")
        out.append((entry.get("protocol", "TCP"), entry["port"]))
    return tuple(out)


def _port_matches(
    rule: _Rule, proto: str, number: int, named: Mapping[str, tuple[str, int]]
) -> bool:
    if rule.ports is None:
        return True
    for rule_proto, port in rule.ports:
        resolved = named.get(port) if isinstance(port, str) else (rule_proto, port)
        if resolved == (proto, number) and rule_proto == proto:
            return True
    return False


def network_edges(objs: list[Obj]) -> set[Edge]:
    """Every (from, to, port) a set of NetworkPolicies allows in one namespace.

    In-namespace traffic needs the source's egress and the destination's ingress;
    traffic from or to outside peers needs the one in-namespace side. A pod no
    policy selects for a direction is open in that direction. ipBlocks are
    taken as outside the cluster (what the API documents them for).
    """
    ws = workloads(objs)
    apps = {app_of(w): pod_labels(w) for w in ws}
    ports: dict[str, list[tuple[str, int]]] = {}
    named: dict[str, dict[str, tuple[str, int]]] = {}
    for w in ws:
        found = [p for c in pod_spec(w)["containers"] for p in c.get("ports", [])]
        ports[app_of(w)] = [(p.get("protocol", "TCP"), p["containerPort"]) for p in found]
        named[app_of(w)] = {
            p["name"]: (p.get("protocol", "TCP"), p["containerPort"]) for p in found if "name" in p
        }
    ingress: dict[str, list[_Rule]] = {}
    egress: dict[str, list[_Rule]] = {}
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        selector = match_labels(spec["podSelector"], name_of(policy))
        if isinstance(selector, str):
            raise EdgeError(selector)
        targets = [app for app, labels in apps.items() if selects(selector, labels)]
        types = spec.get("policyTypes") or (
            ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]
        )
        for app in targets:
            if "Ingress" in types:
                ingress.setdefault(app, []).extend(
                    _Rule(_peers(r.get("from"), apps), _ports(r.get("ports")))
                    for r in spec.get("ingress", [])
                )
            if "Egress" in types:
                egress.setdefault(app, []).extend(
                    _Rule(_peers(r.get("to"), apps), _ports(r.get("ports")))
                    for r in spec.get("egress", [])
                )

    def allows(
        rules: Mapping[str, list[_Rule]], app: str, peer: str, proto: str, number: int, on: str
    ) -> bool:
        if app not in rules:
            return True
        return any(
            (peer in r.peers or ANY in r.peers) and _port_matches(r, proto, number, named[on])
            for r in rules[app]
        )

    outside_sources = {WORLD} | {
        p for rs in ingress.values() for r in rs for p in r.peers if p not in apps and p != ANY
    }
    outside_targets = {WORLD} | {
        p for rs in egress.values() for r in rs for p in r.peers if p not in apps and p != ANY
    }
    edges: set[Edge] = set()
    for dst in apps:
        for proto, number in ports[dst]:
            label = f"{proto}/{number}"
            for src in apps:
                if allows(egress, src, dst, proto, number, dst) and allows(
                    ingress, dst, src, proto, number, dst
                ):
                    edges.add((src, dst, label))
            for src in outside_sources:
                if allows(ingress, dst, src, proto, number, dst):
                    edges.add((src, dst, label))
    for src in apps:
        for dst in outside_targets:
            if src not in egress:
                edges.add((src, dst, ANY))
                continue
            for rule in egress[src]:
                if dst in rule.peers or ANY in rule.peers:
                    if rule.ports is None:
                        edges.add((src, dst, ANY))
                    else:
                        edges.update((src, dst, f"{pr}/{port}") for pr, port in rule.ports)
    return edges
