"""The one place that talks to Helm (helm-python-sdk: the Helm v4 Go SDK through its C
ABI, no `helm` binary), so a real `helm template` could replace it in one spot.

Also: the chart's CI values files (`helm/tether/ci/*.yaml`), each rendered as an install
of release `tether` in namespace `iot` unless its first line says otherwise
(`# render: release=<name> namespace=<ns>`), and the rendered manifests split into
Kubernetes objects.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tether"
CI_DIR = CHART / "ci"
GOLDEN_DIR = ROOT / "helm" / "tests" / "golden"

DEFAULT_RELEASE = "tether"
DEFAULT_NAMESPACE = "iot"


def versions() -> dict[str, str]:
    """Helm SDK and binding versions, printed by every run."""
    return {
        "helm_sdk": helm.helm_sdk_version(),
        "helm_c": helm.helm_c_version(),
        "helm_python_sdk": helm.__version__,
    }


@dataclass
class Case:
    """One CI values file."""

    name: str
    path: Path
    values: dict[str, Any]
    release: str
    namespace: str


def ci_cases() -> list[Case]:
    cases = []
    for path in sorted(CI_DIR.glob("*.yaml")):
        text = path.read_text()
        release, namespace = DEFAULT_RELEASE, DEFAULT_NAMESPACE
        m = re.match(r"#\s*render:\s*(.*)", text.splitlines()[0] if text else "")
        if m:
            opts = dict(kv.split("=", 1) for kv in m.group(1).split())
            release = opts.get("release", release)
            namespace = opts.get("namespace", namespace)
        cases.append(Case(path.stem, path, yaml.safe_load(text) or {}, release, namespace))
    return cases


def case(name: str) -> Case:
    for c in ci_cases():
        if c.name == name:
            return c
    raise KeyError(name)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Values layering as `-f a.yaml -f b.yaml` does for maps."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_charts: dict[str, helm.Chart] = {}


def load(chart_dir: Path = CHART) -> helm.Chart:
    key = str(chart_dir)
    if key not in _charts:
        _charts[key] = helm.Chart.load(chart_dir)
    return _charts[key]


def render(
    values: dict[str, Any],
    *,
    release: str = DEFAULT_RELEASE,
    namespace: str = DEFAULT_NAMESPACE,
    chart_dir: Path = CHART,
    upgrade: bool = False,
) -> dict[str, str]:
    """Template path → rendered text, as `helm template` / an install would render.
    Raises helm_python.HelmError (schema violations, template `fail`s)."""
    return load(chart_dir).render(
        values,
        name=release,
        namespace=namespace,
        is_install=not upgrade,
        is_upgrade=upgrade,
    )


def render_case(c: Case, overrides: dict[str, Any] | None = None, **kw: Any) -> dict[str, str]:
    values = deep_merge(c.values, overrides or {})
    return render(values, release=c.release, namespace=c.namespace, **kw)


def objects(rendered: dict[str, str], *, hooks: bool = True) -> list[dict[str, Any]]:
    """Every Kubernetes object in the render (NOTES.txt excluded), in template order;
    `hooks=False` leaves out `helm.sh/hook` objects (the test pod)."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if not doc:
                continue
            is_hook = "helm.sh/hook" in (doc.get("metadata", {}).get("annotations") or {})
            if hooks or not is_hook:
                out.append(doc)
    return out


def notes(rendered: dict[str, str]) -> str:
    return next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")


def manifest(rendered: dict[str, str]) -> str:
    """The render as one YAML stream, like `helm template` prints it (`# Source:` headers,
    empty templates left out), plus NOTES.txt at the end: the golden file format."""
    parts = []
    for path in sorted(rendered):
        text = rendered[path]
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in re.split(r"(?m)^---\s*$", text):
            if doc.strip():
                parts.append(f"---\n# Source: {path}\n{doc.strip()}\n")
    parts.append("---\n# NOTES.txt\n" + "".join(f"# {l}".rstrip() + "\n" for l in notes(rendered).splitlines()))
    return "".join(parts)


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(matches) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(matches)}")
    return matches[0]


def lint(values: dict[str, Any], *, kube_version: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    return helm.lint(CHART, values, strict=True, kube_version=kube_version, namespace=namespace)


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


HelmError = helm.HelmError
