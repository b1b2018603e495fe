#!/usr/bin/env python3
"""Renders a CI values file (plus JSON overrides) and prints every object as one JSON
array: what the render-then-execute harness (helm/execute) runs.

    render_json.py <case> [<overrides as JSON>]
"""

import json
import sys

import chartlib


def main() -> int:
    case = chartlib.case(sys.argv[1])
    overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    rendered = chartlib.render_case(case, overrides)
    out = {
        "release": case.release,
        "namespace": case.namespace,
        "helm_sdk": chartlib.versions()["helm_sdk"],
        "objects": chartlib.objects(rendered),
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
