"""contrib/: the Prometheus alerting rules and the Grafana dashboard.

promtool checks and unit-tests the rules (missing promtool fails these tests: install the
Debian package ``prometheus``), and every metric and label the rules and the dashboard use
must exist, with that name and those labels, on the registry of a real flag.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "sqlflag-alerts.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "sqlflag-alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "sqlflag-dashboard.json"
#: The subsystem the rules are written for (and the dashboard's default).
SUBSYSTEM = "sqlflag"
METRIC = re.compile(rf"\b{SUBSYSTEM}_leadership_flag_[a-z_]+\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; fails (never skips) when it is not installed."""
    path = shutil.which("promtool")
    assert path is not None, "promtool is missing: apt-get install prometheus (Debian/Ubuntu)"
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard, with Grafana's variables as Grafana fills them
    by default (subsystem ``sqlflag``, all flags, a 1 m rate interval)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = next(v for v in dash["templating"]["list"] if v["name"] == "name")
    subsystem = next(v for v in dash["templating"]["list"] if v["name"] == "subsystem")
    assert subsystem["query"] == SUBSYSTEM
    label_values = re.fullmatch(r"label_values\((.+), name\)", names["query"]["query"])
    assert label_values is not None
    exprs.append(label_values.group(1))

    def fill(expr: str) -> str:
        expr = expr.replace("${subsystem}", SUBSYSTEM).replace("$__rate_interval", "1m")
        return expr.replace("$name", names["allValue"])

    filled = [fill(e) for e in exprs]
    assert not [e for e in filled if "$" in e], filled
    return filled


def test_promtool_checks_the_rules():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_alerts_pass():
    done = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in rules()}, "every alert has a unit test"


def test_the_expected_alerts_exist():
    alerts = {r["alert"]: r["expr"] for r in rules()}
    assert re.sub(r"\s+", " ", alerts["SqlflagTwoLeaders"]) == (
        f"sum by (name) ({SUBSYSTEM}_leadership_flag_state) > 1"
    )
    assert {"SqlflagNoLeader", "SqlflagErrors", "SqlflagLeaseNearlyOut",
            "SqlflagTenureChurn"} <= set(alerts)


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query (as a recording rule), so a typo fails here, not in Grafana."""
    recording = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboard_queries())
    ]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(recording))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_shows_what_an_operator_needs():
    queries = " ".join(dashboard_queries())
    for metric in ("state", "token", "lease_seconds_left", "acquisitions_total",
                   "lowered_total", "errors_total", "check_duration_seconds_bucket"):
        assert f"{SUBSYSTEM}_leadership_flag_{metric}" in queries
    assert {"0.5", "0.9", "0.99"} <= set(re.findall(r"histogram_quantile\(([\d.]+)", queries))


def labels_used(expr: str) -> set[str]:
    """Label names an expression groups, joins or matches on."""
    used: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                            expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return used


@pytest.fixture
def own_engine(tmp_path: Path):
    """A SQLite database of this test's own: the test drops its table."""
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'contrib.db'}")
    yield eng
    eng.dispose()


def test_every_metric_and_label_used_exists_on_a_real_flag(own_engine, flag_name):
    """A real flag on SQLite, raised, then failing (its table dropped), then closed: its
    registry then holds a sample of every family; the rules and the dashboard may only use
    those names and labels."""
    import sqlflag

    engine = own_engine
    registry = CollectorRegistry()
    flag = (
        sqlflag.new_flag().handle(engine).name(flag_name).process("p1").interval(1.0)
        .timeout(0.3).jitter(0).metrics_subsystem(SUBSYSTEM).metrics_registerer(registry)
        .create_table(True).build()
    )
    try:
        assert flag.wait_raised(5)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE leadership_flags"))
        deadline = time.monotonic() + 10
        while registry.get_sample_value(
            f"{SUBSYSTEM}_leadership_flag_errors_total",
            {"name": flag_name, "process": "p1", "kind": "database"},
        ) is None:
            assert time.monotonic() < deadline, "no error counted"
            time.sleep(0.05)
    finally:
        flag.close()
    exported: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    assert exported, "the flag registered nothing"

    for origin, expr, templated in [
        *((f"rule {r['alert']}", r["expr"], list(r.get("annotations", {}).values()))
          for r in rules()),
        *(("dashboard", q, []) for q in dashboard_queries()),
    ]:
        metrics = set(METRIC.findall(expr))
        assert metrics, f"{origin}: no sqlflag metric in {expr!r}"
        unknown = metrics - set(exported)
        assert not unknown, f"{origin}: no metric {unknown}; a real flag has {sorted(exported)}"
        for label in labels_used(expr) | {
            m for text in templated for m in re.findall(r"\$labels\.(\w+)", text)
        }:
            lacking = {m for m in metrics if label not in exported[m]}
            assert not lacking, f"{origin}: label {label!r} is not on {lacking}"
    # The rules are written for one fixed subsystem, as their header says.
    assert set(re.findall(r"\b(\w+)_leadership_flag_", RULES.read_text())) == {SUBSYSTEM}
