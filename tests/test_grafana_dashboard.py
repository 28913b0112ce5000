"""The Prometheus and Grafana files in deploy/, checked without a Docker engine.

- every metric a dashboard panel queries is one some pairfarm component exports (the
  union of the components' ``metric_names()``), found by a small PromQL identifier parser;
- the scrape targets in deploy/prometheus/prometheus.yml use the ports the compose
  services listen on (read back through the real CLI with the service's environment);
- the Grafana provisioning paths and datasource match docker-compose.yml's mounts and the
  prometheus service.

tests/test_prometheus_scrape.py runs the dashboard's expressions on a real Prometheus.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.test_deploy_files import SERVICES, pairfarm_invocations, resolve

DASHBOARDS = REPO / "deploy/grafana/dashboards"
DASHBOARD = DASHBOARDS / "pairfarm.json"
PROMETHEUS_YML = REPO / "deploy/prometheus/prometheus.yml"
PROVISIONING = REPO / "deploy/grafana/provisioning"



def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# PromQL's functions, aggregation operators and keywords (Prometheus 2.42 - 3.x).
PROMQL_FUNCTIONS = _words("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters
    double_exponential_smoothing hour idelta increase info irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_desc sort_by_label sort_by_label_desc sqrt stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio
""")
PROMQL_KEYWORDS = _words("""
    by without on ignoring group_left group_right bool and or unless offset
    inf nan start end
""")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                       re.IGNORECASE)
_TOKEN = re.compile(r"(?P<number>\.?\d[\w.]*)|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
                    r"(?P<call>\s*\()?")


def _strip(expr: str) -> str:
    """Drop what holds no metric name: strings, label matchers, grouping label lists,
    range and subquery brackets, Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)
    return _GROUPING.sub(" ", expr)


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. A name followed by ``(`` is a call
    and must be a PromQL function (so a misspelt function is reported too)."""
    names: set[str] = set()
    for token in _TOKEN.finditer(_strip(expr)):
        ident = token["ident"]
        if ident is None:
            continue
        if token["call"]:
            if ident not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {ident!r} in {expr!r}")
        elif ident.lower() not in PROMQL_KEYWORDS:
            names.add(ident)
    return names


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including the ones inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query target of every panel."""
    return [(panel.get("title", "?"), target["expr"])
            for panel in iter_panels(dashboard["panels"])
            for target in panel.get("targets", []) if target.get("expr")]


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> dict[str, set[str]]:
    """Panel title -> the metric names its queries use that no component exports."""
    missing: dict[str, set[str]] = {}
    for title, expr in panel_expressions(dashboard):
        unknown = metric_names_in(expr) - exported
        if unknown:
            missing.setdefault(title, set()).update(unknown)
    return missing


def exported_metric_names() -> set[str]:
    """What the coordinator, the download worker and the post-processing node export."""
    from coordinator.metrics import metric_names as coordinator_names
    from gpu_postprocess.metrics import metric_names as postprocess_names
    from worker.metrics import metric_names as worker_names

    return coordinator_names() | worker_names() | postprocess_names()


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# -- the parser ---------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ("sum by (state) (pairfarm_batches)", {"pairfarm_batches"}),
    ('sum(rate(pairfarm_url_outcomes_total{outcome=~"ok|http_4xx"}[5m])) by (outcome)',
     {"pairfarm_url_outcomes_total"}),
    ("histogram_quantile(0.95, sum by (le, kind) (rate(a_bucket[5m:30s] offset 1h)))",
     {"a_bucket"}),
    ('process_resident_memory_bytes{job="worker", instance!~"x{1,2}"}',
     {"process_resident_memory_bytes"}),
    ("sum(a{d=\"kept\"}) / clamp_min(sum(b), 1) * on (instance) group_left(device) c",
     {"a", "b", "c"}),
    ("rate(x[$__rate_interval]) > bool 1e-3 or vector(0) unless y:recorded:rate5m",
     {"x", "y:recorded:rate5m"}),
    ('label_replace(up, "dst", "$1", "instance", "(.*):.*") and Inf', {"up"}),
])
def test_parser_finds_the_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_parser_refuses_an_unknown_function() -> None:
    with pytest.raises(ValueError, match="histogram_quantil"):
        metric_names_in("histogram_quantil(0.5, x_bucket)")


def test_the_checker_reports_a_panel_with_an_unknown_metric() -> None:
    exported = set().union(*(metric_names_in(e) for _, e in panel_expressions(load_dashboard())))
    broken = copy.deepcopy(load_dashboard())
    assert unknown_metrics(broken, exported) == {}
    rows = [p for p in broken["panels"] if p["type"] == "row"]
    rows[-1]["panels"].append({"type": "timeseries", "title": "Broken", "targets": [
        {"refId": "A", "expr": "sum(rate(pairfarm_no_such_metric[5m])) by (le)"}]})
    assert unknown_metrics(broken, exported) == {"Broken": {"pairfarm_no_such_metric"}}


# -- the dashboard --------------------------------------------------------------------------

def test_every_dashboard_metric_is_exported_by_a_component() -> None:
    assert unknown_metrics(load_dashboard(), exported_metric_names()) == {}


def test_dashboard_has_the_promised_panels() -> None:
    dashboard = load_dashboard()
    used = set().union(*(metric_names_in(e) for _, e in panel_expressions(dashboard)))
    assert {
        "pairfarm_candidates", "pairfarm_batches", "pairfarm_url_outcomes_total",
        "pairfarm_leases_total", "pairfarm_completions_total", "pairfarm_lease_expiries_total",
        "pairfarm_fencing_rejections_total", "pairfarm_lease_duration_seconds_bucket",
        "pairfarm_workers_alive", "pairfarm_workers_quarantined",
        "pairfarm_worker_requests_in_flight",
        "pairfarm_worker_fetch_duration_seconds_bucket",
        "pairfarm_worker_decode_duration_seconds_bucket", "process_resident_memory_bytes",
        "pairfarm_postprocess_samples_per_second", "pairfarm_postprocess_samples_total",
        "pairfarm_similarity_bucket", "pairfarm_postprocess_shard_duration_seconds_bucket",
        "pairfarm_postprocess_device_memory_bytes",
    } <= used
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "pairfarm"


def test_dashboard_panels_are_well_formed() -> None:
    panels = list(iter_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    uid = load_yaml(PROVISIONING / "datasources/prometheus.yml")["datasources"][0]["uid"]
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


# -- prometheus.yml against docker-compose.yml ---------------------------------------------

def scrape_targets(config: dict[str, Any]) -> dict[str, set[tuple[str, int]]]:
    """job name -> {(host, port)} from static_configs and dns_sd_configs."""
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "compose DNS has A records, not SRV"
            targets.update((name, int(dns["port"])) for name in dns["names"])
    return jobs


def service_metrics_port(name: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """The port the service's pairfarm process serves /metrics on, as the real CLI parses
    its command line and environment: the API port for the coordinator, --metrics-port
    (PAIRFARM_METRICS_PORT) for the others."""
    service = SERVICES[name]
    for key, value in service.get("environment", {}).items():
        monkeypatch.setenv(key, str(value))
    (argv,) = pairfarm_invocations(service)
    params = resolve(argv).params
    return int(params["port"] if argv[0] == "coordinator" else params["metrics_port"])


def test_prometheus_scrapes_every_pairfarm_service_on_its_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = scrape_targets(load_yaml(PROMETHEUS_YML))
    assert set(jobs) == {"coordinator", "worker", "postprocess"}
    assert {host for targets in jobs.values() for host, _ in targets} == {
        "coordinator", "worker", "postprocess", "postprocess-gpu"}
    for targets in jobs.values():
        for host, port in targets:
            with monkeypatch.context() as env:
                assert port == service_metrics_port(host, env), host
    assert SERVICES["coordinator"]["ports"] == ["8600:8600"]


def test_prometheus_config_is_what_the_prometheus_service_loads() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "15s"
    service = SERVICES["prometheus"]
    (flag,) = [a for a in service["command"] if a.startswith("--config.file=")]
    assert f"./{PROMETHEUS_YML.relative_to(REPO)}:{flag.split('=', 1)[1]}:ro" in \
        service["volumes"]
    assert all(j.get("metrics_path", "/metrics") == "/metrics"
               for j in config["scrape_configs"])


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package `prometheus`)")
def test_promtool_accepts_the_prometheus_config() -> None:
    proc = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- Grafana provisioning against docker-compose.yml ---------------------------------------

def compose_mounts(service: str) -> dict[str, str]:
    """Container path -> host path (relative to the repository) of a service's bind mounts."""
    mounts = {}
    for volume in SERVICES[service]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source[2:]
    return mounts


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    mounts = compose_mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == str(PROVISIONING.relative_to(REPO))
    providers = load_yaml(PROVISIONING / "dashboards/pairfarm.yml")["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == str(DASHBOARDS.relative_to(REPO))
    assert DASHBOARD.parent == DASHBOARDS


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    (source,) = load_yaml(PROVISIONING / "datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in SERVICES["prometheus"]["ports"]
    assert SERVICES["grafana"]["depends_on"] == ["prometheus"]
