"""Write the Prometheus operator's form of rules.yaml: a PrometheusRule with the same
groups, in deploy/kubernetes/components/monitoring/prometheusrule.yaml.

    python deploy/observability/prometheusrule.py

tests/test_observability.py fails while the two hold different rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yaml"
OUTPUT = HERE.parents[0] / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/observability/rules.yaml by\n"
    "# `python deploy/observability/prometheusrule.py`: edit rules.yaml, then run it.\n"
)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "digit-sentiment-serving"},
        "spec": {"groups": rules["groups"]},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render() -> str:
    document = prometheus_rule(yaml.safe_load(RULES.read_text()))
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
