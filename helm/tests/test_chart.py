"""Chart tests without a cluster: strict lint, golden renders of every ci/*.yaml, negative
cases with their messages, Kubernetes API schemas over a version range, the semantic and
policy rules no schema sees, checkov, and upgrade safety.

Run through scripts/helm-test (which makes the venv); `UPDATE_GOLDEN=1` rewrites the
golden files after a reviewed change.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import chartlib
from chartlib import CHART, GOLDEN_DIR, ci_cases, find, objects, render, render_case

CASES = ci_cases()
CASE_IDS = [c.name for c in CASES]

# The Kubernetes versions every rendered object is validated against (the chart's
# kubeVersion is >=1.30: the native preStop sleep).
KUBE_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"]

# CI values every case is also rendered with, standing in for `--set`.
MINIMAL = {
    "clusterSecret": {"existingSecret": "tether-cluster"},
    "mfgKeys": {"existingSecret": "tether-mfg", "items": [{"id": "k1", "key": "k1.key"}]},
    "tls": {"mode": "existingSecret", "existingSecret": "tether-tls"},
    "store": {"postgres": {"existingSecret": "tether-store", "urlKey": "url"}},
}


MONITORING_FIXTURES = Path(__file__).parent / "fixtures" / "monitoring"


@pytest.fixture(scope="session")
def reference_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart with the fixed sample dashboards and alert files of fixtures/monitoring
    in place of whatever files/ holds: the golden renders (and every check on them) show
    the templates, and do not change when the observability work edits its files (those
    are checked on their own: test_the_chart_ships_its_own_dashboards_and_alert_rules)."""
    return chart_with_sample_monitoring_files(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def renders(reference_chart: Path) -> dict[str, dict[str, str]]:
    return {c.name: render_case(c, chart_dir=reference_chart) for c in CASES}


def sts_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objs, "StatefulSet")


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in sts_of(objs)["spec"]["template"]["spec"]["containers"] if c["name"] == "tether")


# --- versions -------------------------------------------------------------------------


def test_print_versions() -> None:
    v = chartlib.versions()
    print(
        f"\nHelm SDK {v['helm_sdk']} (helm-python-sdk {v['helm_python_sdk']}, helm-c {v['helm_c']}); "
        f"Kubernetes schemas: kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else '?'}"
        f" for {KUBE_VERSIONS[0]}–{KUBE_VERSIONS[-1]}"
    )
    assert v["helm_sdk"].startswith("v4.")


# --- L0: lint -------------------------------------------------------------------------


def test_chart_yaml_is_v2_with_kube_version() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]), meta["version"]
    assert meta["kubeVersion"] == ">=1.30.0-0"
    assert meta["type"] == "application"


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kube", [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
def test_strict_lint(c: chartlib.Case, kube: str) -> None:
    report = chartlib.lint(c.values, kube_version=f"v{kube}", namespace=c.namespace)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    assert not problems, problems
    # Infos are allowed but listed (e.g. "icon is recommended").
    infos = [m["error"] for m in report["messages"] if m["severity"] < 2]
    assert set(infos) <= {"icon is recommended"}, infos


# --- L1: golden renders ---------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_golden(c: chartlib.Case, renders: dict[str, dict[str, str]]) -> None:
    text = chartlib.manifest(renders[c.name])
    path = GOLDEN_DIR / f"{c.name}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1 and review it"
    if path.read_text() != text:
        import difflib

        diff = "".join(
            difflib.unified_diff(path.read_text().splitlines(True), text.splitlines(True), str(path), "rendered")
        )
        pytest.fail(f"render differs from the golden file (UPDATE_GOLDEN=1 after review):\n{diff[:6000]}")


def test_every_golden_has_a_ci_file() -> None:
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.yaml")) == sorted(CASE_IDS)


def test_upgrade_render_equals_install_render() -> None:
    c = chartlib.case("postgres")
    assert chartlib.manifest(render_case(c)) == chartlib.manifest(render_case(c, upgrade=True))


# --- L2: negative cases ---------------------------------------------------------------

NEGATIVE = [
    # (name, values on top of MINIMAL, message fragments)
    ("typo at the root", {"replicaCont": 3}, ["additional properties 'replicaCont' not allowed"]),
    ("typo nested", {"clusterSecret": {"exsitingSecret": "x"}}, ["/clusterSecret", "'exsitingSecret' not allowed"]),
    ("typo in a probe", {"probes": {"readines": {"enabled": True}}}, ["/probes", "'readines' not allowed"]),
    ("wrong type", {"replicaCount": "three"}, ["/replicaCount", "got string, want integer"]),
    ("bad enum", {"tls": {"mode": "letsencrypt"}}, ["/tls/mode", "value must be one of"]),
    ("privileged port", {"ports": {"http": 443}}, ["/ports/http", "minimum"]),
    ("three cluster secrets", {"clusterSecret": {"additionalKeys": ["a", "b"]}}, ["/clusterSecret/additionalKeys", "maxItems"]),
    ("fullname too long", {"fullnameOverride": "x" * 53}, ["/fullnameOverride", "maxLength"]),
    ("image digest not sha256", {"image": {"digest": "latest"}}, ["/image/digest"]),
    (
        "grace shorter than preStop + drain",
        {"shutdown": {"preStopSleepSeconds": 10, "drainTimeoutSeconds": 30, "terminationGracePeriodSeconds": 40}},
        ["terminationGracePeriodSeconds (40) must be at least", "= 45", "in the middle of its drain"],
    ),
    ("no cluster secret", {"clusterSecret": {"existingSecret": ""}}, ["clusterSecret.existingSecret is required", "never generates one"]),
    ("no manufacturing keys", {"mfgKeys": {"items": []}}, ["mfgKeys.existingSecret and mfgKeys.items are required"]),
    ("TLS secret missing", {"tls": {"existingSecret": ""}}, ["tls.existingSecret is empty"]),
    ("cert-manager without issuer", {"tls": {"mode": "certManager"}}, ["tls.certManager.issuerRef.name is empty"]),
    (
        "plain HTTP on a load balancer",
        {"tls": {"mode": "none"}, "service": {"type": "LoadBalancer"}},
        ["clear text", "tls.allowPlainLoadBalancer"],
    ),
    (
        "password in the store URL",
        {"store": {"postgres": {"urlKey": "", "url": "postgres://u:hunter2@db:5432/t", "passwordKey": "pw"}}},
        ["store.postgres.url carries a password"],
    ),
    ("store URL and URL key both", {"store": {"postgres": {"url": "postgres://u@db/t"}}}, ["not both"]),
    ("store Secret missing", {"store": {"postgres": {"existingSecret": ""}}}, ["store.postgres.existingSecret is required"]),
    ("fdb without its ConfigMap", {"store": {"type": "fdb"}}, ["store.fdb.clusterFileConfigMap is empty"]),
    ("both PDB bounds", {"podDisruptionBudget": {"minAvailable": 2}}, ["not both"]),
    (
        "HPA bounds reversed",
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}},
        ["autoscaling.minReplicas (5) exceeds autoscaling.maxReplicas (3)"],
    ),
    ("same ports", {"ports": {"grpc": 8443}}, ["ports.http and ports.grpc must differ"]),
    ("push without its secret", {"push": {"webhook": "http://gw/wake"}}, ["push.webhook needs push.existingSecret", "X-Tether-Signature"]),
    (
        "https push without CAs",
        {"push": {"webhook": "https://gw/wake", "existingSecret": "tether-push"}},
        ["push.caConfigMap is empty", "no CA bundle"],
    ),
    ("push webhook not a URL", {"push": {"webhook": "gw:80"}}, ["/push/webhook"]),
    (
        "both monitors",
        {"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}},
        ["metrics.podMonitor and metrics.serviceMonitor are both enabled", "scraped twice"],
    ),
]


@pytest.mark.parametrize("name,values,fragments", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_negative(name: str, values: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(chartlib.HelmError) as err:
        render(chartlib.deep_merge(MINIMAL, values))
    message = str(err.value)
    for f in fragments:
        assert f in message, f"{name}: {f!r} not in:\n{message}"


def test_defaults_alone_say_what_is_required() -> None:
    with pytest.raises(chartlib.HelmError) as err:
        render({})
    assert "clusterSecret.existingSecret is required" in str(err.value)


def test_minimal_values_render() -> None:
    objs = objects(render(MINIMAL))
    assert sts_of(objs)["spec"]["replicas"] == 3


# --- L3: Kubernetes API schemas -------------------------------------------------------

CRD_KINDS = {"Certificate", "PodMonitor", "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_kubernetes_schemas(c: chartlib.Case, renders: dict[str, dict[str, str]]) -> None:
    objs = objects(renders[c.name])
    checked = 0
    for kube in KUBE_VERSIONS:
        for o in objs:
            if o["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(o, kube, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{o['kind']}/{o['metadata']['name']} invalid for Kubernetes {kube}: {e.message} at {list(e.path)}")
            checked += 1
    assert checked >= 5 * len(KUBE_VERSIONS)


# CRDs have no schema in kubernetes-validate: the chart's custom resources go through the
# validators generated from cert-manager's and prometheus-operator's own API types
# (npm @kubernetes-models/*, pinned in crd/package-lock.json; type, enum and required
# checks — unknown fields are pruned by the API server, not flagged).
CRD_NODE_DIR = chartlib.ROOT / "target" / "npm-crd"


def validate_custom_resources(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    script = CRD_NODE_DIR / "validate.mjs"
    assert script.exists(), f"{script} missing: scripts/helm-test installs the validators (npm ci)"
    out = subprocess.run(["node", str(script)], input=json.dumps(objs), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(l) for l in out.stdout.splitlines() if l.strip()]


def test_custom_resources_match_their_apis(renders: dict[str, dict[str, str]]) -> None:
    # The PrometheusRule comes from the sample alert files of the reference chart.
    crs = [o for name in CASE_IDS for o in objects(renders[name]) if o["kind"] in CRD_KINDS]
    assert {o["kind"] for o in crs} == CRD_KINDS, "the CI values render every custom resource kind"
    results = validate_custom_resources(crs)
    assert len(results) == len(crs)
    bad = [r for r in results if r["errors"]]
    assert not bad, bad


def test_custom_resource_validation_catches_mistakes() -> None:
    results = validate_custom_resources(
        [
            {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "c"}, "spec": {"secretName": "s", "dnsNames": "a"}},
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "p"},
             "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "http", "scheme": "htp"}]}},
        ]
    )
    assert all(r["errors"] for r in results), results


# --- L4: semantics and policy ---------------------------------------------------------

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_semantics(c: chartlib.Case, renders: dict[str, dict[str, str]]) -> None:
    rendered = renders[c.name]
    objs = objects(rendered)
    sts = sts_of(objs)
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    ctr = container(objs)
    selector = sts["spec"]["selector"]["matchLabels"]

    # Selectors: frozen, unversioned, and every one matches the pods.
    assert selector == {
        "app.kubernetes.io/name": selector["app.kubernetes.io/name"],
        "app.kubernetes.io/instance": c.release,
        "app.kubernetes.io/component": "node",
    }
    assert selector_matches(selector, pod_labels)
    for o in objs:
        if o["kind"] == "Service":
            assert o["spec"]["selector"] == selector, o["metadata"]["name"]
        if o["kind"] in ("PodDisruptionBudget", "PodMonitor"):
            assert o["spec"]["selector"]["matchLabels"] == selector
        if o["kind"] == "NetworkPolicy":
            assert o["spec"]["podSelector"]["matchLabels"] == selector
    for t in spec.get("topologySpreadConstraints", []):
        assert t["labelSelector"]["matchLabels"] == selector

    # Discovery: the headless Service publishes not-ready pods, the device Service not.
    headless = find(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    device = next(o for o in objs if o["kind"] == "Service" and o is not headless)
    assert not device["spec"].get("publishNotReadyAddresses")

    # Monitoring: each pod scraped once (one monitor; the ServiceMonitor selects only the
    # headless Service, never the device Service with the same pods), under job="tether"
    # as the alert rules expect, on a port the pods and the Service have.
    monitors = [o for o in objs if o["kind"] in ("PodMonitor", "ServiceMonitor")]
    assert len(monitors) <= 1, [m["kind"] for m in monitors]
    for m in monitors:
        assert m["spec"]["jobLabel"] == "app.kubernetes.io/name"
        endpoints = m["spec"].get("podMetricsEndpoints") or m["spec"]["endpoints"]
        assert [e["port"] for e in endpoints] == ["http"] and endpoints[0]["path"] == "/metrics"
        if m["kind"] == "PodMonitor":
            assert pod_labels[m["spec"]["jobLabel"]] == "tether"
            assert "http" in {p["name"] for p in container(objs)["ports"]}
        else:
            scraped = [o for o in objs if o["kind"] == "Service" and selector_matches(m["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])]
            assert scraped == [headless], [s["metadata"]["name"] for s in scraped]
            assert headless["metadata"]["labels"][m["spec"]["jobLabel"]] == "tether"
            assert "http" in {p["name"] for p in headless["spec"]["ports"]}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert "volumeClaimTemplates" not in sts["spec"]

    # Named ports exist, every $(VAR) is defined before use, every mount has a volume.
    port_names = {p["name"] for p in ctr["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in ctr:
            assert ctr[probe]["httpGet"]["port"] in port_names
            assert ctr[probe]["httpGet"]["scheme"] in ("HTTP", "HTTPS")
    for svc in (o for o in objs if o["kind"] == "Service"):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names
    defined: set[str] = set()
    for e in ctr["env"]:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            assert ref in defined, f"env {e['name']} uses $({ref}) before it is defined"
        defined.add(e["name"])
    for a in ctr["args"]:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            assert ref in defined, f"arg {a} uses undefined $({ref})"
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in ctr["volumeMounts"]:
        assert m["name"] in volumes, m
        assert "subPath" not in m, f"{m['name']}: subPath mounts are never updated by kubelet"

    # Liveness never depends on the store or peers: it is /healthz, not /readyz.
    if "livenessProbe" in ctr:
        assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if "readinessProbe" in ctr:
        assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # The DNS names: one join name (never an enumerated list) and the pod's own FQDN, both
    # under the configured cluster domain.
    args = ctr["args"]
    domain = c.values.get("clusterDomain", "cluster.local")
    join = [a for a in args if a.startswith("--join=")]
    advertise = [a for a in args if a.startswith("--grpc-advertise=")]
    assert len(join) == 1 and "," not in join[0]
    assert join[0] == f"--join={headless['metadata']['name']}.$(POD_NAMESPACE).svc.{domain}:{headless['spec']['ports'][0]['port']}"
    assert advertise[0].startswith(f"--grpc-advertise=$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc.{domain}:")
    if domain != "cluster.local":
        assert "cluster.local" not in chartlib.manifest(rendered), "the cluster domain is used everywhere"

    # Secrets by reference: no secret material in args, everything mounted as files.
    for a in args:
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", a), f"credentials in an argument: {a}"
        assert "SECRET" not in a.upper() or a.startswith("--cluster-secret-file=")
    for e in ctr["env"]:
        assert "secretKeyRef" not in e.get("valueFrom", {}), "secrets as files, not env (CKV_K8S_35)"
    assert not [o for o in objs if o["kind"] == "Secret"], "the chart never renders a Secret"
    for v in volumes.values():
        if "secret" in v:
            assert v["secret"]["defaultMode"] == 0o440

    # Pod Security "restricted", written out (no admission controller here).
    psc, sc = spec["securityContext"], ctr["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    assert psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    for bad in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(bad)
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    # The one writable path is the data emptyDir.
    writable = [m for m in ctr["volumeMounts"] if not m.get("readOnly")]
    assert [m["mountPath"] for m in writable] == ["/var/lib/tether"]
    assert "emptyDir" in volumes[writable[0]["name"]]
    assert "--data-dir=/var/lib/tether" in args

    # Drain sizing.
    grace = spec["terminationGracePeriodSeconds"]
    pre = ctr.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = int(next(a for a in args if a.startswith("--drain-timeout-s=")).split("=")[1])
    assert grace >= pre + drain + 5

    # Names: DNS-1123 labels of at most 63 characters (StatefulSets at most 52).
    for o in objs:
        name = o["metadata"]["name"]
        assert DNS_1123_LABEL.match(name) and len(name) <= 63, name
    assert len(sts["metadata"]["name"]) <= 52

    # Replicas: the HPA owns them when enabled.
    hpa = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    assert ("replicas" in sts["spec"]) == (not hpa)
    if hpa:
        assert hpa[0]["spec"]["behavior"]["scaleDown"]["policies"][0]["value"] == 1

    # The test hook runs the image's `tether check` against the device Service.
    tests = [o for o in objs if o["kind"] == "Pod"]
    assert len(tests) == 1 and tests[0]["metadata"]["annotations"]["helm.sh/hook"] == "test"
    tc = tests[0]["spec"]["containers"][0]
    assert tc["image"] == ctr["image"] and tc["args"][0] == "check"
    assert f"--connect-host={device['metadata']['name']}.{c.namespace}.svc.{domain}" in tc["args"]


def test_store_selection() -> None:
    pg = container(objects(render_case(chartlib.case("postgres"))))
    assert "--store-password-file=/etc/tether/store/password" in pg["args"]
    url = container(objects(render_case(chartlib.case("postgres-url-nodeport"))))
    assert "--store-file=/etc/tether/store/url" in url["args"]
    fdb_objs = objects(render_case(chartlib.case("fdb")))
    fdb = container(fdb_objs)
    assert "--store=fdb:/var/lib/tether/fdb.cluster" in fdb["args"]
    assert fdb["image"].endswith(":0.1.0-fdb")
    init = sts_of(fdb_objs)["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"].startswith("foundationdb/foundationdb-kubernetes-sidecar:")
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"fdb-cluster-file": "/var/input-files", "data": "/var/output-files"}
    vols = {v["name"]: v for v in sts_of(fdb_objs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["fdb-cluster-file"]["configMap"]["name"] == "sample-cluster-config"
    assert vols["fdb-cluster-file"]["configMap"]["items"] == [{"key": "cluster-file", "path": "fdb.cluster"}]


def test_tls_modes() -> None:
    none = container(objects(render_case(chartlib.case("plain-http-ingress"))))
    assert "--allow-plain-http" in none["args"] and not [a for a in none["args"] if a.startswith("--tls-")]
    assert none["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    cm_objs = objects(render_case(chartlib.case("certmanager-ingress")))
    cert = find(cm_objs, "Certificate")
    assert cert["spec"]["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert {"tether", "tether.iot.svc.cluster.local", "devices.example.com"} <= set(cert["spec"]["dnsNames"])
    tls_vol = next(v for v in sts_of(cm_objs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls_vol["secret"]["secretName"] == cert["spec"]["secretName"]
    assert "--public-url=https://devices.example.com" in container(cm_objs)["args"]


def test_cluster_secret_rotation_values() -> None:
    objs = objects(render_case(chartlib.case("ha-monitoring")))
    args = container(objs)["args"]
    assert [a for a in args if a.startswith("--cluster-secret-file=")] == [
        "--cluster-secret-file=/etc/tether/cluster/next",
        "--cluster-secret-file=/etc/tether/cluster/current",
    ]
    vol = next(v for v in sts_of(objs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "cluster-secret")
    assert [i["key"] for i in vol["secret"]["items"]] == ["next", "current"]


def test_network_policy_lets_only_peers_reach_grpc() -> None:
    objs = objects(render_case(chartlib.case("ha-monitoring")))
    np = find(objs, "NetworkPolicy")
    sel = sts_of(objs)["spec"]["selector"]["matchLabels"]
    grpc_rules = [r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
    assert grpc_rules == [{"ports": [{"port": "grpc", "protocol": "TCP"}], "from": [{"podSelector": {"matchLabels": sel}}]}]
    http_rules = [r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == "http"]
    assert http_rules and "from" not in http_rules[0]
    assert "Egress" in np["spec"]["policyTypes"]


# --- dashboards and alerts (files written by the observability work) -------------------


def chart_copy(tmp_path: Path, *, keep_files: bool) -> Path:
    """The chart in a temporary directory, its dashboards and alerts removed unless kept."""
    chart = tmp_path / "tether"
    shutil.copytree(CHART, chart)
    if not keep_files:
        for f in list((chart / "files" / "dashboards").glob("*.json")) + list((chart / "files" / "alerts").glob("*.yaml")):
            f.unlink()
    chartlib._charts.pop(str(chart), None)
    return chart


def chart_with_sample_monitoring_files(tmp_path: Path) -> Path:
    """A chart copy holding fixtures/monitoring's sample dashboards and alert files in
    place of the observability work's: two dashboards, a Prometheus rules file and a
    PrometheusRule-shaped one."""
    chart = chart_copy(tmp_path, keep_files=False)
    for kind in ("dashboards", "alerts"):
        for f in (MONITORING_FIXTURES / kind).iterdir():
            shutil.copy(f, chart / "files" / kind / f.name)
    chartlib._charts.pop(str(chart), None)
    return chart


def test_dashboards_and_alert_rules_ship_the_chart_files(tmp_path: Path) -> None:
    values = chartlib.deep_merge(MINIMAL, {"metrics": {"prometheusRule": {"enabled": True}, "dashboards": {"enabled": True}}})
    # Nothing to ship: enabling them renders nothing.
    empty = chart_copy(tmp_path / "empty", keep_files=False)
    kinds = {o["kind"] for o in objects(render(values, chart_dir=empty))}
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds

    chart = chart_with_sample_monitoring_files(tmp_path / "full")
    objs = objects(render(values, chart_dir=chart))
    cm = find(objs, "ConfigMap", "tether-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(cm["data"]) == {"tether-overview.json", "tether-cluster.json"}
    assert json.loads(cm["data"]["tether-overview.json"])["title"] == "Tether"
    rule = find(objs, "PrometheusRule")
    assert sorted(g["name"] for g in rule["spec"]["groups"]) == ["tether", "tether-cluster"]
    # Shipped as data: Prometheus's own templates in the rules are not Helm's.
    summary = rule["spec"]["groups"][[g["name"] for g in rule["spec"]["groups"]].index("tether")]["rules"][0]["annotations"]["summary"]
    assert summary == "Tether node {{ $labels.instance }} is down"

    # Off by default.
    chartlib._charts.pop(str(chart), None)
    kinds = {o["kind"] for o in objects(render(MINIMAL, chart_dir=chart))}
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds

    (chart / "files" / "alerts" / "broken.yaml").write_text("rules: []\n")
    chartlib._charts.pop(str(chart), None)
    with pytest.raises(chartlib.HelmError) as err:
        render(values, chart_dir=chart)
    assert "files/alerts/broken.yaml has no rule groups" in str(err.value)


# ConfigMaps hold at most 1 MiB (etcd's value limit).
CONFIGMAP_LIMIT = 1 << 20


def test_the_chart_ships_its_own_dashboards_and_alert_rules() -> None:
    """Whatever the observability work put in files/ (none yet is fine: then nothing is
    rendered) ships whole and valid: every dashboard verbatim in the ConfigMap, every rule
    group in the PrometheusRule, which prometheus-operator's model accepts."""
    dashboards = sorted((CHART / "files" / "dashboards").glob("*.json"))
    alerts = sorted((CHART / "files" / "alerts").glob("*.yaml"))
    print(f"\nshipped monitoring files: {[p.name for p in dashboards + alerts] or 'none yet'}")
    objs = objects(render_case(chartlib.case("ha-monitoring")))
    kinds = [o["kind"] for o in objs]
    assert kinds.count("ConfigMap") == (1 if dashboards else 0) and kinds.count("PrometheusRule") == (1 if alerts else 0), kinds
    if dashboards:
        cm = find(objs, "ConfigMap", "tether-dashboards")
        assert set(cm["data"]) == {p.name for p in dashboards}
        uids = []
        for p in dashboards:
            assert cm["data"][p.name] == p.read_text().rstrip("\n"), f"{p.name} is not shipped verbatim"
            board = json.loads(p.read_text())
            assert board.get("title"), f"{p.name} has no title"
            uids.append(board.get("uid"))
        assert len(set(uids)) == len(uids), f"dashboard uids collide: {uids}"
        size = sum(len(v.encode()) for v in cm["data"].values())
        assert size < CONFIGMAP_LIMIT, f"the dashboards ConfigMap holds {size} bytes, more than a ConfigMap can"
        for kube in KUBE_VERSIONS:
            kubernetes_validate.validate(cm, kube, strict=True)
    if alerts:
        rule = find(objs, "PrometheusRule")
        expected = []
        for p in alerts:
            doc = yaml.safe_load(p.read_text())
            expected += doc.get("groups") or doc["spec"]["groups"]
        assert rule["spec"]["groups"] == expected
        names = [g["name"] for g in expected]
        # prometheus-operator writes one rules file per PrometheusRule; Prometheus refuses
        # a file that repeats a group name.
        assert len(set(names)) == len(names), f"rule group names repeat: {names}"
        for g in expected:
            for r in g["rules"]:
                assert ("alert" in r) != ("record" in r) and r.get("expr"), f"{g['name']}: {r}"
        results = validate_custom_resources([rule])
        assert not results[0]["errors"], results


# --- checkov --------------------------------------------------------------------------

# Each check checkov fails on the rendered chart: the kinds it may fail on, and why that is
# the right choice here. Anything else failing fails the test.
CHECKOV_EXPLAINED = {
    "CKV_K8S_8": ({"Pod"}, "only the `helm test` pod (restartPolicy Never): one `tether check` run "
                  "that exits; the nodes have all three probes (test_semantics)"),
    "CKV_K8S_9": ({"Pod"}, "only the `helm test` pod, as CKV_K8S_8"),
    "CKV_K8S_11": ({"StatefulSet", "Pod"}, "no CPU limit by default: CFS throttling makes a busy node "
                   "miss gossip deadlines and peers declare it down; the request reserves its CPU"),
    "CKV_K8S_43": ({"StatefulSet", "Pod"}, "the image tag defaults to the chart's appVersion, an "
                   "immutable release tag; image.digest pins by digest (ci/long-names.yaml)"),
    "CKV_K8S_15": ({"StatefulSet", "Pod"}, "imagePullPolicy IfNotPresent with immutable release tags "
                   "(or digests) is intended; Always adds a registry round trip to every pod start"),
    "CKV2_K8S_6": ({"Pod"}, "a NetworkPolicy is rendered when networkPolicy.enabled "
                   "(ci/ha-monitoring.yaml; the test pod needs none: it only connects out); off by default: "
                   "the right ingress sources depend on the load balancer"),
}


def checkov_failures(directory: Path) -> list[dict[str, Any]]:
    # checkov pins packages the rest does not accept: it has a venv of its own.
    checkov = chartlib.ROOT / "target" / "venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), f"{checkov} missing: scripts/helm-test installs it"
    out = subprocess.run(
        [str(checkov), "--framework", "kubernetes", "-d", str(directory), "--output", "json", "--compact", "--quiet", "--skip-download"],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]
    reports = json.loads(out.stdout or "[]")
    if isinstance(reports, dict):
        reports = [reports]
    failed = []
    for r in reports:
        failed += r.get("results", {}).get("failed_checks", [])
    return failed


def test_checkov_kubernetes_checks(tmp_path: Path, renders: dict[str, dict[str, str]]) -> None:
    for name, rendered in renders.items():
        (tmp_path / f"{name}.yaml").write_text(chartlib.manifest(rendered))
    failed = checkov_failures(tmp_path)
    unexplained = sorted(
        {
            (f["check_id"], f["check_name"], f["resource"])
            for f in failed
            if f["resource"].split(".")[0] not in CHECKOV_EXPLAINED.get(f["check_id"], (set(), ""))[0]
        }
    )
    assert not unexplained, "checkov failures nobody explained: " + json.dumps(unexplained, indent=1)
    seen = {f["check_id"] for f in failed}
    print("\ncheckov: explained failures", {k: sum(1 for f in failed if f["check_id"] == k) for k in sorted(seen)})
    stale = sorted(set(CHECKOV_EXPLAINED) - seen)
    assert not stale, f"explanations for checks that no longer fail (remove them): {stale}"


# --- L5: upgrade safety ---------------------------------------------------------------

RELEASED = Path(__file__).parent / "released.json"


def immutable_fields(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """What Kubernetes refuses to change on a live StatefulSet (and Service)."""
    sts = sts_of(objs)
    return {
        "statefulset": {
            "name": sts["metadata"]["name"],
            "selector": sts["spec"]["selector"],
            "serviceName": sts["spec"]["serviceName"],
            "podManagementPolicy": sts["spec"]["podManagementPolicy"],
            "volumeClaimTemplates": sts["spec"].get("volumeClaimTemplates"),
        },
        "services": {o["metadata"]["name"]: o["spec"].get("clusterIP") for o in objs if o["kind"] == "Service"},
    }


def test_immutable_statefulset_fields_unchanged_against_released_chart_versions() -> None:
    released = json.loads(RELEASED.read_text())
    current = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert released, "released.json records at least the first chart version"
    for version, cases in released.items():
        for name, fields in cases.items():
            now = immutable_fields(objects(render_case(chartlib.case(name))))
            assert now == fields, (
                f"chart {current} changes immutable StatefulSet/Service fields of release {version} "
                f"({name}): `helm upgrade` would fail. Was {fields}, now {now}"
            )


def test_changing_only_replica_count_leaves_the_pod_template_byte_identical() -> None:
    c = chartlib.case("postgres")
    three = render_case(c, {"replicaCount": 3})
    five = render_case(c, {"replicaCount": 5})
    sts3, sts5 = (yaml.safe_load(r["tether/templates/statefulset.yaml"]) for r in (three, five))
    assert yaml.safe_dump(sts3["spec"]["template"]) == yaml.safe_dump(sts5["spec"]["template"])
    # Byte-level: the rendered StatefulSet differs in the replicas line only.
    diff = [
        (a, b)
        for a, b in zip(three["tether/templates/statefulset.yaml"].splitlines(), five["tether/templates/statefulset.yaml"].splitlines())
        if a != b
    ]
    assert diff == [("  replicas: 3", "  replicas: 5")], diff
    # Every other object is the same, except the test hook's expected member count.
    for path in three:
        if path.endswith(("statefulset.yaml", "test-check.yaml", "NOTES.txt")):
            continue
        assert three[path] == five[path], path


def test_changing_only_the_image_tag_changes_only_image_and_version_labels() -> None:
    c = chartlib.case("postgres")
    a = objects(render_case(c, {"image": {"tag": "0.1.0"}}))
    b = objects(render_case(c, {"image": {"tag": "0.2.0"}}))
    assert immutable_fields(a) == immutable_fields(b)

    def scrub(objs: list[dict[str, Any]]) -> str:
        text = yaml.safe_dump(objs)
        return text.replace("0.1.0", "X").replace("0.2.0", "X")

    assert scrub(a) == scrub(b)


def record_release() -> None:
    """`python test_chart.py record-release`: append the current version's immutable fields."""
    released = json.loads(RELEASED.read_text()) if RELEASED.exists() else {}
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    released[version] = {c.name: immutable_fields(objects(render_case(c))) for c in CASES}
    RELEASED.write_text(json.dumps(released, indent=1, sort_keys=True) + "\n")


# --- docs -----------------------------------------------------------------------------


def test_chart_readme_is_generated_from_the_schema_and_current() -> None:
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "gen_readme.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr


def test_every_value_is_in_the_schema_with_a_description() -> None:
    schema = chartlib.schema()
    missing: list[str] = []

    def walk(values: Any, node: dict[str, Any], path: str) -> None:
        if not node.get("description") and path:
            missing.append(path)
        if isinstance(values, dict) and node.get("additionalProperties") is False:
            for k, v in values.items():
                child = node.get("properties", {}).get(k)
                if child is None:
                    missing.append(f"{path}.{k} (not in the schema)")
                else:
                    walk(v, child, f"{path}.{k}" if path else k)

    walk(chartlib.default_values(), schema, "")
    assert not missing, missing


if __name__ == "__main__" and sys.argv[1:] == ["record-release"]:
    record_release()
