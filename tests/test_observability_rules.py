"""The alert rules and the Grafana dashboard, without a stack.

promtool checks the rules and runs their unit tests (alerts_test.yml); every
alert has a case that fires and one that must not. Every metric an
expression names is one flotilla/common/metrics.py defines (with the suffix
its type exports), a Triton ``nv_`` metric, Prometheus's own ``up``, or a
recording rule of alerts.yml. The PromQL helpers here are shared with the
Prometheus integration test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, Summary

from flotilla.common import metrics
from flotilla.stack import prometheus

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "observability" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "observability" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "observability" / "grafana" / "flotilla.json"

PROMETHEUS_OWN = {"up"}
"""Series Prometheus itself writes for every target (with the target's ``tier`` and ``process`` labels)."""
# The sample names each metric type exports (prometheus-client, *_created disabled in metrics.py).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


# -- PromQL helpers (a few regular expressions; enough for the expressions of this repo) --


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (regexes, $model) first
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations ([5m], [$__rate_interval])
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\b(?:group_left|group_right)\b", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}:
            continue
        names.add(name)
    return names


def split_set_operands(expr: str) -> list[str]:
    """``A > 0 unless on (model) B > 0 and on () C`` -> [``A > 0``, ``B > 0``, ``C``]: the operands of the
    top-level ``and``/``or``/``unless``, each without its ``on``/``ignoring`` list."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        char = expr[i]
        if char == '"':
            i = expr.index('"', i + 1) + 1 if '"' in expr[i + 1 :] else len(expr)
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            keyword = re.match(r"(?:and|or|unless)\b(?:\s*(?:on|ignoring)\s*\([^)]*\))?", expr[i:])
            if keyword and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
                parts.append(expr[start:i])
                i += keyword.end()
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [" ".join(p.split()) for p in parts]


def without_threshold(expr: str) -> str:
    """``X > 0.05`` -> ``X``: the signal an alert compares, without a trailing comparison with a number."""
    return re.sub(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\s*$", "", expr.strip())


def watched_signal(operand: str) -> str:
    """What an alert operand compares: ``X > 0.05`` -> ``X``; for an alert on absence,
    ``label_replace(absent(up{tier="a"} == 1), ...)`` -> ``up{tier="a"}`` (the series whose absence it watches)."""
    start = operand.find("absent(")
    if start < 0:
        return without_threshold(operand)
    depth, i = 0, start + len("absent")
    for i in range(start + len("absent"), len(operand)):
        depth += {"(": 1, ")": -1}.get(operand[i], 0)
        if depth == 0:
            break
    return without_threshold(operand[start + len("absent("):i])


def rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml (recording and alerting)."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    """The panels that show data (rows left out), nested rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [p for p in found if p["type"] != "row"]


def dashboard_exprs() -> dict[str, str]:
    """``"<panel title> / <refId>"`` -> the target's PromQL (template variables as written)."""
    return {f"{p['title']} / {t['refId']}": t["expr"] for p in dashboard_panels() for t in p["targets"]}


def variable_queries() -> dict[str, tuple[str, str]]:
    """Template variable name -> (series selector, label) of its ``label_values(selector, label)`` query."""
    found = {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            parsed = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert parsed, f"variable ${variable['name']}: {query!r} is not label_values(selector, label)"
            found[variable["name"]] = (parsed.group(1).strip(), parsed.group(2))
    return found


def exported_names() -> set[str]:
    """Every sample name the metrics contract exports (a counter with _total, a histogram's three, ...)."""
    names = set()
    for collector in vars(metrics).values():
        if isinstance(collector, Counter | Gauge | Histogram | Summary):
            for family in collector.describe():
                names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


# -- promtool ----------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (Debian's prometheus package); run `make prometheus`")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases: dict[str, set[bool]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 5
    for rule in alerts:
        found = cases.get(rule["alert"], set())
        assert found == {True, False}, f"{rule['alert']}: cases that fire {True in found}, that stay silent {False in found}"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert "for" in rule, f"{rule['alert']} fires on a single evaluation"


# -- the local stack's Prometheus ---------------------------------------------------------


def test_generated_config_is_valid(tmp_path: Path) -> None:
    targets = tmp_path / "metrics-targets.json"
    targets.write_text(json.dumps([{"targets": ["127.0.0.1:1"], "labels": {"process": "router", "tier": "router"}}]))
    proc = prometheus.prometheus_process(
        tmp_path, "127.0.0.1", 9099, targets, scrape_interval_s=0.25, log_path=tmp_path / "prometheus.log"
    )
    path = tmp_path / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["global"] == {"scrape_interval": "250ms", "scrape_timeout": "250ms", "evaluation_interval": "250ms"}
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == [str(targets.resolve())]
    assert config["rule_files"] == [str(RULES)]
    assert proc.address == proc.metrics_address == "127.0.0.1:9099"
    assert f"--config.file={path.resolve()}" in proc.argv
    assert f"--storage.tsdb.path={(tmp_path / 'prometheus' / 'data').resolve()}" in proc.argv
    assert "--web.listen-address=127.0.0.1:9099" in proc.argv
    result = promtool("check", "config", str(path))  # the rules file too
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_binary_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(prometheus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="make prometheus"):
        prometheus.prometheus_process(
            tmp_path, "127.0.0.1", 9099, tmp_path / "targets.json", scrape_interval_s=1.0, log_path=tmp_path / "log"
        )


def test_not_ready_when_nothing_listens() -> None:
    from flotilla.stack.processes import free_port

    assert not prometheus.prometheus_ready(f"127.0.0.1:{free_port()}")


# -- the dashboard -------------------------------------------------------------------


def test_dashboard_loads_with_its_variables() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    assert variable_queries()["model"][1] == "model"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_targets_with_expressions() -> None:
    panels = dashboard_panels()
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target['refId']} has no expr"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_metric_name_is_in_the_contract() -> None:
    known = exported_names()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    expressions = {f"rule {r.get('alert') or r.get('record')}": r["expr"] for r in rules()}
    expressions.update({f"panel {where}": expr for where, expr in dashboard_exprs().items()})
    expressions.update({f"variable ${name}": selector for name, (selector, _) in variable_queries().items()})
    unknown = {}
    for where, expr in expressions.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        missing = {n for n in names if n not in known | recorded | PROMETHEUS_OWN and not n.startswith("nv_")}
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"metrics not defined in flotilla/common/metrics.py: {unknown}"


def test_promql_helpers() -> None:
    expr = (
        'sum by (model) (rate(flotilla_grpc_requests_total{model!="(unknown)", code=~"A|B"}[1m])) > 0\n'
        "unless on (model) sum by (model) (flotilla_model_placed * on (replica) group_left () "
        "flotilla_replica_healthy) > 0 and on () count(flotilla_replica_healthy) > 0"
    )
    assert metric_names(expr) == {"flotilla_grpc_requests_total", "flotilla_model_placed", "flotilla_replica_healthy"}
    assert [without_threshold(p) for p in split_set_operands(expr)] == [
        'sum by (model) (rate(flotilla_grpc_requests_total{model!="(unknown)", code=~"A|B"}[1m]))',
        "sum by (model) (flotilla_model_placed * on (replica) group_left () flotilla_replica_healthy)",
        "count(flotilla_replica_healthy)",
    ]
    assert metric_names("rate(nv_inference_count[5m]) / 1e6 / model:x:rate5m") == {"nv_inference_count",
                                                                                    "model:x:rate5m"}
    assert split_set_operands("(a or 0 * b) / b") == ["(a or 0 * b) / b"]
    tiers = 'label_replace(absent(up{tier="a"} == 1), "tier", "a", "", "") or label_replace(absent(up{tier="b"}), "tier", "b", "", "")'
    assert [watched_signal(p) for p in split_set_operands(tiers)] == ['up{tier="a"}', 'up{tier="b"}']
    assert watched_signal("sum(rate(x[5m])) / (sum(y) + sum(z)) > 0.05") == "sum(rate(x[5m])) / (sum(y) + sum(z))"
    assert metric_names(tiers) == {"up"}


# -- the same labels in Kubernetes -------------------------------------------------------

SERVICE_MONITORS = REPO / "k8s" / "components" / "monitoring" / "servicemonitors.yaml"
TARGET_LABELS = {"tier", "process"}
"""Labels the local stack's Prometheus gives every target (``flotilla.stack.prometheus``) and the
dashboard and alerts split by; the ServiceMonitors must add them in Kubernetes."""


def test_service_monitors_label_targets_as_the_local_prometheus_does() -> None:
    monitors = list(yaml.safe_load_all(SERVICE_MONITORS.read_text(encoding="utf-8")))
    assert {m["metadata"]["name"] for m in monitors} == {"flotilla", "triton"}
    for monitor in monitors:
        for endpoint in monitor["spec"]["endpoints"]:
            added = {r["targetLabel"] for r in endpoint.get("relabelings", [])}
            assert TARGET_LABELS <= added, (monitor["metadata"]["name"], added)
            if monitor["metadata"]["name"] == "flotilla":  # its metrics carry `tier` themselves
                assert endpoint.get("honorLabels") is True
    split = set()
    for expr in [*dashboard_exprs().values(), *(r["expr"] for r in rules())]:
        for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            split |= {label.strip() for label in labels.split(",") if label.strip()}
    assert "process" in split, "the Triton panels split by process"


def test_every_tier_has_a_tier_down_alert() -> None:
    [rule] = [r for r in rules() if r.get("alert") == "FlotillaTierDown"]
    for tier in ("router", "batcher", "preprocess", "controller", "triton"):
        assert f'absent(up{{tier="{tier}"}} == 1), "tier", "{tier}"' in rule["expr"], tier
