"""``helm template`` for tests/packaging/test_deploy.py, run by the deploy tools' venv.

Usage: ``python helm_render.py CHART VALUES.yaml|- ...`` (``-``: the chart's defaults alone).
Prints a JSON list, one entry per values file: ``{"ok": true, "manifests": {template: text},
"lint": [...]}`` (``lint``: what ``helm lint --strict`` warns about with those values) or
``{"ok": false, "error": "..."}`` when Helm refuses the values (the schema) or the templates.
It needs ``helm_python`` (Helm's Go SDK, the PyPI package helm-python-sdk), which the
project's own venv does not have: `make deploy-tools` puts it in .venv-deploy.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import helm_python as helm
import yaml


def render(chart: Any, chart_dir: str, values_file: str) -> dict[str, Any]:
    values = {}
    if values_file != "-":
        with open(values_file, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    try:
        manifests = chart.render(values, name="rel", namespace="mcp")
    except helm.HelmError as e:
        return {"ok": False, "error": str(e)}
    # `helm lint --strict` with the same values: its warnings and errors (severity 2 and 3).
    found = helm.lint(chart_dir, values, strict=True, namespace="mcp")
    lint = [f"{m['path']}: {m['error']}" for m in found["messages"] if m["severity"] >= 2]
    return {"ok": True, "manifests": manifests, "lint": lint}


def main(argv: list[str]) -> int:
    with helm.Chart.load(argv[1]) as chart:
        print(json.dumps([render(chart, argv[1], v) for v in argv[2:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
