"""deploy/ rendered by kustomize, schema-validated, and checked for what schemas miss.

Runs offline: kubectl (kustomize), kubernetes-validate and hadolint are dev
dependencies (wheels), so CI has them; none of these tests is skipped.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrelay.auth.config import parse_auth_config
from keyrelay.configfile import ConfigError
from keyrelay.dev import GATEWAY_REDIS_USER
from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.limits_store import ACL_COMMANDS, acl_rules
from tests.deploy.manifests import (
    ANY,
    DEPLOY,
    DEPLOYMENT_DOC,
    REPO,
    WORLD,
    Edge,
    EdgeError,
    Obj,
    config_path,
    container_files,
    containers,
    created_secrets,
    documented_secrets,
    find_tool,
    get,
    inline_secret_problems,
    network_edges,
    overlays,
    pod_spec,
    probe_problems,
    reference_problems,
    render,
    secret_refs,
    security_problems,
    selector_problems,
    workloads,
)

# Oldest and newest Kubernetes minor the manifests are validated against
# (kubernetes-validate ships schemas up to its own version).
K8S_VERSIONS = ("1.31.0", "1.37.0")
OVERLAYS = overlays()
NAMESPACE = "keyrelay"
DNS = "ns[kubernetes.io/metadata.name=kube-system]/pods[k8s-app=kube-dns]"
MONITORING = "ns[kubernetes.io/metadata.name=monitoring]/pods[]"

COMMON_EDGES: set[Edge] = {
    (WORLD, "gateway", "TCP/8080"),
    (MONITORING, "gateway", "TCP/8080"),
    (MONITORING, "auth", "TCP/8081"),
    ("gateway", "auth", "TCP/50051"),
    ("auth", DNS, "UDP/53"),
    ("auth", DNS, "TCP/53"),
    ("gateway", DNS, "UDP/53"),
    ("gateway", DNS, "TCP/53"),
    ("auth", WORLD, "TCP/443"),
    ("gateway", WORLD, "TCP/443"),
}
IN_CLUSTER_REDIS = {
    ("auth", "redis", "TCP/6379"),
    ("gateway", "redis", "TCP/6379"),  # the limits counters, as the ACL user keyrelay-gateway
}
EXTERNAL_REDIS = {
    ("auth", WORLD, "TCP/6379"),
    ("auth", WORLD, "TCP/6380"),
    ("auth", WORLD, "TCP/26379"),  # Redis Sentinel
    ("gateway", WORLD, "TCP/6379"),  # the limits store: no Sentinel
    ("gateway", WORLD, "TCP/6380"),
}
EXPECTED_EDGES = {
    "local-redis": COMMON_EDGES | IN_CLUSTER_REDIS,
    "external-redis": COMMON_EDGES | EXTERNAL_REDIS,
    "production": COMMON_EDGES | EXTERNAL_REDIS,
}


@functools.cache
def _rendered(overlay: str) -> tuple[Obj, ...]:
    return tuple(render(DEPLOY / "overlays" / overlay))


def rendered(overlay: str) -> list[Obj]:
    """A fresh copy, so a test may modify it."""
    return copy.deepcopy(list(_rendered(overlay)))


@functools.cache
def _doc() -> str:
    return DEPLOYMENT_DOC.read_text(encoding="utf-8")


def test_every_overlay_has_expected_edges() -> None:
    assert set(OVERLAYS) == set(EXPECTED_EDGES)


# -- (a) render, (b) schemas --------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_with_kustomize(overlay: str) -> None:
    objs = rendered(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"} <= kinds
    assert {o["metadata"].get("namespace", NAMESPACE) for o in objs} == {NAMESPACE}


def _validate(objs: list[Obj], version: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"rendered-{version}.yaml"
    path.write_text(yaml.safe_dump_all(objs), encoding="utf-8")
    return subprocess.run(
        [find_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strict_schema_validation(overlay: str, version: str, tmp_path: Path) -> None:
    result = _validate(rendered(overlay), version, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


def test_strict_schema_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    objs = rendered("local-redis")
    pod_spec(get(objs, "Deployment", "keyrelay-auth"))["containers"][0]["livenesProbe"] = {}
    result = _validate(objs, K8S_VERSIONS[0], tmp_path)
    assert result.returncode != 0
    assert "livenesProbe" in result.stdout + result.stderr


# -- (c) what schemas miss ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pods_and_ports_exist(overlay: str) -> None:
    objs = rendered(overlay)
    assert selector_problems(objs) == []
    assert probe_problems(objs) == []


def test_selector_checker_catches_a_typo() -> None:
    objs = rendered("local-redis")
    get(objs, "Service", "keyrelay-auth-headless")["spec"]["selector"][
        "app.kubernetes.io/component"
    ] = "auht"
    get(objs, "PodDisruptionBudget", "keyrelay-auth")["spec"]["selector"]["matchLabels"] = {
        "app": "auth"
    }
    problems = selector_problems(objs)
    assert any("keyrelay-auth-headless" in p and "matches no pods" in p for p in problems)
    assert any("PodDisruptionBudget/keyrelay-auth" in p for p in problems)


def test_probe_checker_catches_a_wrong_port() -> None:
    objs = rendered("local-redis")
    ctr = pod_spec(get(objs, "Deployment", "keyrelay-gateway"))["containers"][0]
    ctr["readinessProbe"]["httpGet"]["port"] = "metrics"
    assert probe_problems(objs) == [
        "Deployment/keyrelay-gateway container gateway: readinessProbe port 'metrics' is not "
        "a container port"
    ]


def test_probes_match_the_services_contract() -> None:
    objs = rendered("local-redis")
    auth = pod_spec(get(objs, "Deployment", "keyrelay-auth"))["containers"][0]
    assert auth["readinessProbe"]["grpc"] == {
        "port": 50051,
        "service": "keyrelay.auth.v1.AuthService",
    }
    assert auth["livenessProbe"]["grpc"]["port"] == 50051
    gateway = get(objs, "Deployment", "keyrelay-gateway")
    ctr = pod_spec(gateway)["containers"][0]
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The endpoint leaves the load balancers (preStop) before SIGTERM; then the
    # gateway drains streams for 30 s: the grace period covers both.
    pause = int(ctr["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] > pause + 30
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"
    auth_annotations = get(objs, "Deployment", "keyrelay-auth")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert auth_annotations["prometheus.io/port"] == "8081"
    assert {"name": "http", "containerPort": 8081, "protocol": "TCP"} in auth["ports"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_availability(overlay: str) -> None:
    objs = rendered(overlay)
    assert get(objs, "Deployment", "keyrelay-auth")["spec"]["replicas"] >= 2
    assert get(objs, "HorizontalPodAutoscaler", "keyrelay-gateway")["spec"]["minReplicas"] >= 2
    headless = get(objs, "Service", "keyrelay-auth-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert get(objs, "Service", "keyrelay-auth")["spec"]["type"] == "ClusterIP"
    hpa = get(objs, "HorizontalPodAutoscaler", "keyrelay-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_in_cluster_redis_persists_with_aof() -> None:
    objs = rendered("local-redis")
    redis = get(objs, "StatefulSet", "keyrelay-redis")
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    ctr = pod_spec(redis)["containers"][0]
    assert {"name": "data", "mountPath": "/data"} in ctr["volumeMounts"]
    conf_name = next(v for v in pod_spec(redis)["volumes"] if v["name"] == "config")
    conf = get(objs, "ConfigMap", conf_name["configMap"]["name"])["data"]["redis.conf"]
    directives = {
        line.split()[0]: line.split(None, 1)[1] for line in conf.splitlines() if line[:1].isalpha()
    }
    assert directives["appendonly"] == "yes"
    assert directives["dir"] == "/data"
    assert directives["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in directives, "the password comes from the Secret at start"
    assert directives["include"] == "/run/redis/auth.conf"


@pytest.mark.parametrize("overlay", ["external-redis", "production"])
def test_external_redis_removes_the_in_cluster_one(overlay: str) -> None:
    objs = rendered(overlay)
    assert not [o for o in objs if "redis" in o["metadata"]["name"] and o["kind"] != "Secret"]
    auth = get(objs, "Deployment", "keyrelay-auth")
    volume = next(v for v in pod_spec(auth)["volumes"] if v["name"] == "redis-url")
    assert volume["secret"]["secretName"] == "keyrelay-external-redis"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context_and_resources(overlay: str) -> None:
    assert security_problems(rendered(overlay)) == []


def test_security_checker_catches_a_weakened_container() -> None:
    objs = rendered("local-redis")
    ctr = pod_spec(get(objs, "StatefulSet", "keyrelay-redis"))["containers"][0]
    ctr["securityContext"]["readOnlyRootFilesystem"] = False
    ctr["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    del ctr["resources"]["limits"]["memory"]
    problems = security_problems(objs)
    where = "StatefulSet/keyrelay-redis container redis"
    assert f"{where}: readOnlyRootFilesystem is not true" in problems
    assert f"{where}: capabilities must drop ALL and add none" in problems
    assert f"{where}: no memory in resources.limits" in problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_inline_secrets(overlay: str) -> None:
    assert inline_secret_problems(rendered(overlay)) == []


def test_inline_secret_checker_catches_a_secret_and_a_literal_env() -> None:
    objs = rendered("local-redis")
    objs.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {"a": "Yg=="}}
    )
    ctr = pod_spec(get(objs, "Deployment", "keyrelay-gateway"))["containers"][0]
    ctr["env"].append({"name": "UPSTREAM_API_KEY", "value": "sk-not-here"})
    assert len(inline_secret_problems(objs)) == 2


def test_base_ships_no_secret_with_data() -> None:
    for path in DEPLOY.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                raise AssertionError(f"{path}: ships a Secret")
            if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
                assert "secretGenerator" not in doc, path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_are_rendered_or_documented(overlay: str) -> None:
    assert reference_problems(rendered(overlay), documented_secrets(_doc())) == []


def test_reference_checker_catches_an_undocumented_secret() -> None:
    objs = rendered("local-redis")
    ctr = pod_spec(get(objs, "Deployment", "keyrelay-gateway"))["containers"][0]
    ctr["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "keyrelay-mystery", "key": "k"}}}
    )
    pod_spec(get(objs, "Deployment", "keyrelay-auth"))["volumes"][0]["configMap"]["name"] = "gone"
    problems = reference_problems(objs, documented_secrets(_doc()))
    assert any("keyrelay-mystery" in p for p in problems)
    assert any("ConfigMap gone" in p for p in problems)


def test_deployment_doc_lists_exactly_the_referenced_secrets_and_creates_them() -> None:
    documented = documented_secrets(_doc())
    referenced: dict[str, set[str]] = {}
    for overlay in OVERLAYS:
        for ref in secret_refs(rendered(overlay)):
            referenced.setdefault(ref.secret, set())
            if ref.key is not None:
                referenced[ref.secret].add(ref.key)
    assert set(documented) == set(referenced)
    for name, keys in referenced.items():
        assert keys <= documented[name], name
    created = created_secrets(_doc())
    for name, keys in documented.items():
        assert name in created, f"docs/deployment.md has no `kubectl create secret` for {name}"
        assert keys <= created[name], f"{name}: the create command misses {keys - created[name]}"


# -- the TOML configs, parsed by keyrelay itself -----------------------------------------


def _service_config(objs: list[Obj], deployment: str) -> tuple[Obj, Obj, dict[str, Any], Any]:
    workload = get(objs, "Deployment", deployment)
    ctr = pod_spec(workload)["containers"][0]
    path = config_path(ctr)
    assert path is not None
    files = container_files(objs, workload, ctr)
    assert path in files.files, f"{path} is not in a mounted ConfigMap"
    data = tomllib.loads(files.files[path])
    parse = parse_auth_config if ctr["args"][0] == "auth" else parse_gateway_config
    return workload, ctr, data, parse(data, files.env, files.read_file)


def _port(ctr: Obj, name: str) -> int:
    port: int = next(p["containerPort"] for p in ctr["ports"] if p["name"] == name)
    return port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configs_parse_with_keyrelays_own_parsers(overlay: str) -> None:
    objs = rendered(overlay)
    _, auth_ctr, _, auth = _service_config(objs, "keyrelay-auth")
    assert auth.listen == f"0.0.0.0:{_port(auth_ctr, 'grpc')}"
    assert {c.role for c in auth.callers} == {"gateway", "admin"}
    assert auth.web is not None
    assert auth.web.listen == f"0.0.0.0:{_port(auth_ctr, 'http')}"
    for provider in auth.providers.values():  # the admin page's callback, port-forwarded
        assert f"{auth.web.public_url}/callback" in provider.redirect_uris
    _, gw_ctr, _, gateway = _service_config(objs, "keyrelay-gateway")
    assert gateway.listen == f"0.0.0.0:{_port(gw_ctr, 'http')}"
    assert gateway.routes, "the example config has a [[keys]] route"
    # The gateway dials the headless Service in this namespace, on the auth gRPC port.
    assert gateway.auth is not None
    match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", gateway.auth.target)
    assert match, gateway.auth.target
    service = get(objs, "Service", match.group(1))
    assert service["spec"]["clusterIP"] == "None"
    assert match.group(2) == service["metadata"]["namespace"]
    assert int(match.group(3)) in [p["port"] for p in service["spec"]["ports"]]
    # The same service token on both sides.
    gateway_tokens = [c.token for c in auth.callers if c.role == "gateway"]
    assert gateway.auth.token in gateway_tokens
    # TLS on both ends or on neither; the files are mounted.
    assert (auth.tls is None) == (gateway.auth.ca_file is None)
    auth_files = container_files(objs, get(objs, "Deployment", "keyrelay-auth"), auth_ctr).files
    gw_files = container_files(objs, get(objs, "Deployment", "keyrelay-gateway"), gw_ctr).files
    if auth.tls is not None:
        assert auth.tls.cert_file in auth_files
        assert auth.tls.key_file in auth_files
        assert gateway.auth.ca_file in gw_files
        assert not any(path.endswith("tls.key") for path in gw_files)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_auth_pods_outlive_a_refresh_in_flight(overlay: str) -> None:
    """SIGTERM waits for a token call in flight up to refresh_deadline_seconds (its answer
    may hold the only copy of a rotated refresh token): the grace covers the preStop pause,
    that deadline and the fenced write after it."""
    objs = rendered(overlay)
    workload, ctr, _, auth = _service_config(objs, "keyrelay-auth")
    pause = int(ctr["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod_spec(workload)["terminationGracePeriodSeconds"]
    assert grace >= pause + auth.refresh_deadline_seconds + 5, (grace, pause)


def _redis_script(objs: list[Obj]) -> tuple[Obj, str]:
    ctr = pod_spec(get(objs, "StatefulSet", "keyrelay-redis"))["containers"][0]
    assert ctr["command"][:2] == ["sh", "-c"]
    return ctr, ctr["command"][2]


def _run_redis_script(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The container's start script with the file under tmp_path and no Redis started."""
    assert script.count("/run/redis/auth.conf") == 1
    assert script.count("exec redis-server /etc/redis/redis.conf") == 1
    script = script.replace("/run/redis/auth.conf", str(tmp_path / "auth.conf")).replace(
        "exec redis-server /etc/redis/redis.conf", "exit 0"
    )
    return subprocess.run(
        ["sh", "-c", script],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_redis_creates_the_gateways_acl_user_of_the_limits_store(tmp_path: Path) -> None:
    """Redis writes the gateways' ACL user at start: exactly ACL_COMMANDS, only the limits
    keys under the key_prefix that auth and gateway share, the password from the Secret
    (never on a command line or in a ConfigMap); the gateways dial Redis as that user."""
    objs = rendered("local-redis")
    _, _, _, auth = _service_config(objs, "keyrelay-auth")
    _, _, _, gateway = _service_config(objs, "keyrelay-gateway")
    assert gateway.limits is not None, "[gateway.limits] is configured"
    prefix = gateway.limits.key_prefix
    assert prefix == auth.key_prefix, "the auth service reads the usage under its key_prefix"
    ctr, script = _redis_script(objs)
    env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in ctr["env"]}
    assert env["REDIS_GATEWAY_PASSWORD"] == {"name": "keyrelay-redis", "key": "gateway-password"}
    result = _run_redis_script(
        script, tmp_path, REDISCLI_AUTH="admin-pw", REDIS_GATEWAY_PASSWORD="gw-Pass_1.~"
    )
    assert result.returncode == 0, result.stderr
    conf = (tmp_path / "auth.conf").read_text(encoding="utf-8")
    assert (tmp_path / "auth.conf").stat().st_mode & 0o077 == 0
    words = shlex.split(next(line for line in conf.splitlines() if line.startswith("user ")))
    assert words == ["user", GATEWAY_REDIS_USER, *acl_rules(prefix, "gw-Pass_1.~")]
    assert [w for w in words if w[:1] in "+-" and w != "-@all"] == list(ACL_COMMANDS)
    assert f"~{prefix}limits:*" in words
    # The password is refused when it could break the rule or the URL (not started).
    for bad in ("", "two words", 'q"uote', "a\\b", "p@ss/word"):
        result = _run_redis_script(script, tmp_path, REDISCLI_AUTH="x", REDIS_GATEWAY_PASSWORD=bad)
        assert result.returncode != 0, bad
        assert "gateway-password" in result.stderr
    # The gateways' URL file is mounted from their own Secret, never keyrelay-redis.
    gw = get(objs, "Deployment", "keyrelay-gateway")
    secrets = {v["secret"]["secretName"] for v in pod_spec(gw)["volumes"] if "secret" in v}
    assert secrets == {"keyrelay-gateway-redis"}
    # docs/deployment.md: the same user and rules for an external Redis, and the URLs
    # of the gateways' Secret name that user.
    doc = _doc()
    setuser = re.findall(r"ACL SETUSER ([^\n]*?)\\n'", doc)
    assert [s.split() for s in setuser] == [[GATEWAY_REDIS_USER, *acl_rules(prefix, "%s")]]
    gateway_secret = r"create secret generic keyrelay-gateway-redis[^\n]*\n[^\n]*url=\"(\S+?)\""
    urls = re.findall(gateway_secret, doc)
    assert len(urls) == 2, urls
    assert all(u.split("://", 1)[1].startswith(f"{GATEWAY_REDIS_USER}:") for u in urls), urls


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateways_have_the_limits_store(overlay: str) -> None:
    objs = rendered(overlay)
    _, _, _, auth = _service_config(objs, "keyrelay-auth")
    _, _, _, gateway = _service_config(objs, "keyrelay-gateway")
    assert gateway.limits is not None
    assert gateway.limits.key_prefix == auth.key_prefix


def test_config_check_catches_an_unmounted_secret_file() -> None:
    objs = rendered("local-redis")
    auth = get(objs, "Deployment", "keyrelay-auth")
    pod_spec(auth)["containers"][0]["volumeMounts"] = [
        m for m in pod_spec(auth)["containers"][0]["volumeMounts"] if m["name"] != "redis-url"
    ]
    with pytest.raises(ConfigError, match=r"auth\.redis_url_secret: cannot read"):
        _service_config(objs, "keyrelay-auth")


def test_tls_configs_are_the_base_plus_tls() -> None:
    def load(path: str) -> dict[str, Any]:
        return tomllib.loads((DEPLOY / path).read_text(encoding="utf-8"))

    auth = load("components/auth-tls/auth.toml")
    assert set(auth["auth"].pop("tls")) == {"cert_file", "key_file"}
    assert auth == load("base/auth.toml")
    gateway = load("components/auth-tls/gateway.toml")
    assert gateway["gateway"]["auth"].pop("ca_file")
    assert gateway == load("base/gateway.toml")


# -- NetworkPolicies: exactly the intended paths ------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_intended_paths(overlay: str) -> None:
    assert network_edges(rendered(overlay)) == EXPECTED_EDGES[overlay]


def test_edge_checker_catches_a_redis_open_to_all() -> None:
    objs = rendered("local-redis")
    policy = get(objs, "NetworkPolicy", "keyrelay-redis")
    del policy["spec"]["ingress"][0]["from"]
    extra = network_edges(objs) - EXPECTED_EDGES["local-redis"]
    assert (WORLD, "redis", "TCP/6379") in extra


def test_edge_checker_catches_a_missing_default_deny() -> None:
    objs = [o for o in rendered("local-redis") if o["metadata"]["name"] != "default-deny"]
    objs = [
        o for o in objs if o["metadata"]["name"] != "keyrelay-redis" or o["kind"] != "NetworkPolicy"
    ]
    edges = network_edges(objs)
    assert ("redis", WORLD, ANY) in edges
    assert (WORLD, "redis", "TCP/6379") in edges


def test_edge_checker_needs_both_sides_in_the_namespace() -> None:
    objs = rendered("local-redis")
    # The auth service accepting every keyrelay pod is not enough: Redis's egress
    # (none) still denies.
    get(objs, "NetworkPolicy", "keyrelay-auth")["spec"]["ingress"][0]["from"][0]["podSelector"] = {
        "matchLabels": {"app.kubernetes.io/name": "keyrelay"}
    }
    assert ("redis", "auth", "TCP/50051") not in network_edges(objs)
    # ... and with an egress rule towards it, the path opens: caught.
    get(objs, "NetworkPolicy", "keyrelay-redis")["spec"]["egress"] = [
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "auth"}}}]}
    ]
    extra = network_edges(objs) - EXPECTED_EDGES["local-redis"]
    assert extra == {("redis", "auth", "TCP/50051")}


def test_edge_checker_refuses_what_it_does_not_model() -> None:
    objs = rendered("local-redis")
    get(objs, "NetworkPolicy", "keyrelay-auth")["spec"]["ingress"][0]["from"][0]["podSelector"] = {
        "matchExpressions": [{"key": "app", "operator": "Exists"}]
    }
    with pytest.raises(EdgeError, match="only matchLabels"):
        network_edges(objs)


# -- the image build file -----------------------------------------------------------------


def _stages(text: str) -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[str]] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_containerfile_is_multi_stage_and_final_stage_is_minimal() -> None:
    text = (REPO / "Containerfile").read_text(encoding="utf-8")
    # The base is pinned by digest: a re-pushed tag cannot change what is built.
    assert re.search(
        r"^ARG PYTHON_IMAGE=\S*python:3\.11-slim\S*@sha256:[0-9a-f]{64}$", text, re.MULTILINE
    )
    stages = _stages(text)
    assert len(stages) >= 2
    builder, final = "\n".join(stages[0]), stages[-1]
    # Dependencies only from the lock, hashes checked; keyrelay itself without resolution.
    assert "pip install --require-hashes -r requirements/runtime.txt" in builder
    assert re.search(r"pip install --no-deps \.(\s|$)", builder), (
        "a regular, non-editable install of keyrelay, with no resolution of its own"
    )
    assert " -e " not in builder
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    final_text = "\n".join(final)
    for tool in ("gcc", "build-essential", "apt-get install", "grpc_tools", "make "):
        assert tool not in final_text, tool
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    user = [line.split()[1] for line in final if line.startswith("USER ")]
    assert user, "the final stage sets USER"
    uid = user[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid, so runAsNonRoot can check it"
    assert int(uid) > 0
    assert final_text.count("ENTRYPOINT") == 1
    assert 'ENTRYPOINT ["python", "-m", "keyrelay"]' in final
    # The manifests run as the image's user.
    for overlay in OVERLAYS:
        for w in workloads(rendered(overlay)):
            for c in containers(w):
                if c["image"].rsplit("/", 1)[-1].startswith("keyrelay:"):
                    assert pod_spec(w)["securityContext"]["runAsUser"] == int(uid)


def test_containerignore_keeps_state_out_and_the_lock_in() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert lines[lines.index("*") :][:1] == ["*"]
    assert "!requirements/" in lines
    # The generated gRPC code is committed source: it must reach the build.
    assert not any("_pb2" in line for line in lines)


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [find_tool("hadolint"), "--no-color", str(REPO / "Containerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", ["auth", "gateway"])
def test_the_image_entrypoint_serves_both_services(service: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keyrelay", service, "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
