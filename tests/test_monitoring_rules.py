"""Prometheus rules and the Grafana dashboard, checked with the real tools: `promtool check rules`,
`promtool test rules` (every alert fires in a case built for it and stays silent in a healthy
run; two runs in one Prometheus stay apart), promql-parser on every query, every rule and query
is per run, the Prometheus Operator's PrometheusRule carries the same rules, and every metric
name exists in the roles' code."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "test_tools"))
import k8s_testlib as T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROLE_SOURCES = ["actors/role.py", "learner/metrics.py", "evaluator/role.py", "params/server.py",
                "replay/server.py"]
REQUIRED_ALERTS = {"CRLRunFinished", "CRLRunBehindBudget", "CRLLearnerStalled", "CRLUTDOutOfBand", "CRLNoActorConnected",
                   "CRLPolicyLagHigh", "CRLReplayNearCapacity", "CRLNaNLoss",
                   "CRLNonFiniteSegments", "CRLActorSegmentsDropped"}
# Data-loss counters each shown on the dashboard and alerted on: {metric: alert}.
DATA_LOSS_METRICS = {"crl_learner_nonfinite_segments_total": "CRLNonFiniteSegments",
                     "crl_actor_segments_dropped_total": "CRLActorSegmentsDropped"}


def test_promtool_check_rules():
    proc = T.promtool("check", "rules", T.MONITORING / "crl-rules.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_fire_and_stay_silent():
    proc = T.promtool("test", "rules", "rules-test.yml", cwd=T.MONITORING)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every alert has a case where it fires and one where it does not.
    import yaml
    tests = yaml.safe_load((T.MONITORING / "rules-test.yml").read_text())["tests"]
    fires, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    alerts = {r["alert"] for r in T.rules() if "alert" in r}
    assert REQUIRED_ALERTS <= alerts
    assert fires == alerts and silent == alerts, (alerts - fires, alerts - silent)
    # And the unit tests do catch a wrong rule: break one threshold, promtool must fail.
    broken = (T.MONITORING / "crl-rules.yml").read_text().replace(
        "crl_replay_table_capacity_items > 0.95", "crl_replay_table_capacity_items > 0.99")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "crl-rules.yml").write_text(broken)
        (Path(d) / "rules-test.yml").write_text((T.MONITORING / "rules-test.yml").read_text())
        proc = T.promtool("test", "rules", "rules-test.yml", cwd=Path(d))
    assert proc.returncode != 0 and "CRLReplayNearCapacity" in proc.stdout + proc.stderr


def test_every_query_parses():
    queries = [q["expr"] for q in T.dashboard_queries()] + [r["expr"] for r in T.rules()]
    errors = {q: e for q, e in T.promql_parse(queries).items() if e}
    assert not errors, errors
    # promql-parser rejects what Prometheus rejects.
    assert T.promql_parse(["sum(rate(crl_actor_env_steps_total[1m])"])[
        "sum(rate(crl_actor_env_steps_total[1m])"]


def _exported_names():
    """Metric names the roles export (prometheus_client adds _total/_bucket/_sum/_count)."""
    names = set()
    for src in ROLE_SOURCES:
        text = (REPO / src).read_text()
        for kind, name in re.findall(
                r'(Counter|Gauge|Histogram|CounterMetricFamily|GaugeMetricFamily)\w*\(\s*\n?\s*'
                r'(?:[fr]?["\'])(crl_[a-z0-9_]+)', text):
            if kind.startswith("Counter"):
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind == "Histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
            else:
                names.add(name)
        # The replay collector's helpers g(name, ...) / c(name, ...).
        for kind, name in re.findall(r'yield ([gc])\("(crl_[a-z0-9_]+)"', text):
            names.add(name + "_total" if kind == "c" else name)
    # The learner's one gauge per update metric (contract A): crl_learner_<key> for every key of
    # the metric dicts the update returns (crl/learning.py).
    learning = (REPO / "crl" / "learning.py").read_text()
    names |= {f"crl_learner_{k}" for k in re.findall(r'"([a-z_]+)":', learning)}
    return names


def test_every_metric_name_is_exported_by_a_role():
    exported = _exported_names()
    assert {"crl_learner_sgd_steps_total", "crl_replay_inserts_total",
            "crl_actor_env_steps_total", "crl_params_publish_duration_seconds_bucket",
            "crl_eval_time_at_goal"} <= exported
    recorded = {r["record"] for r in T.rules() if "record" in r}
    builtin = {"up", "ALERTS", "process_resident_memory_bytes", "process_cpu_seconds_total",
               "process_open_fds", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
    functions = {"sum", "max", "min", "avg", "count", "rate", "deriv", "increase", "changes",
                 "abs", "absent", "histogram_quantile", "by", "on", "and", "or", "unless", "le",
                 "vector", "time", "instance", "name", "method", "result", "job", "role",
                 "group_left", "alertstate", "alertname", "namespace", "crl_run", "pod",
                 "exported_pod", "exported_namespace", "gpu", "__name__"}
    queries = [q["expr"] for q in T.dashboard_queries()] + [r["expr"] for r in T.rules()]
    missing = {}
    for q in queries:
        # Names given as a regex alternation: {__name__=~"crl_learner_(a|b)"}.
        for prefix, alts in re.findall(r'__name__=~"([a-z_]+)\(([a-z_|]+)\)"', q):
            for alt in alts.split("|"):
                if prefix + alt not in exported:
                    missing.setdefault(prefix + alt, q)
        q = re.sub(r'"[^"]*"', '""', q)                     # drop label values
        q = re.sub(r"\[\d+[smhd]\]", "", q)                  # and range durations
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", q):
            if name in functions:
                continue
            if name not in exported | recorded | builtin:
                missing.setdefault(name, q)
    assert not missing, missing


def test_dashboard_covers_the_issue():
    dash = json.loads((T.MONITORING / "dashboards" / "crl.json").read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Run", "Learning", "Throughput balance", "Replay", "Params",
                    "Process health"]
    text = " ".join(q["expr"] for q in T.dashboard_queries())
    for needle in ("crl_learner_env_steps_total", "crl_learner_budget_env_steps",
                   "crl:run_progress:ratio", "crl:run_finished:max", "DCGM_FI_DEV_GPU_UTIL",
                   "crl_eval_time_at_goal", "crl_eval_success", "critic_loss", "actor_loss",
                   "crl_learner_alpha", "categorical_accuracy", "crl:actor_env_steps:rate1m",
                   "instance:crl_actor_env_steps:rate1m", "crl:learner_sgd_steps:rate1m",
                   "crl:replay_samples:rate1m", "crl_learner_utd_target",
                   "crl_replay_table_size_env_steps", "crl_replay_inserts_total",
                   "crl_replay_insert_wait_seconds_total", "crl_learner_params_version",
                   "crl_learner_policy_lag", "crl_params_publish_duration_seconds_bucket",
                   "process_resident_memory_bytes", "up{", *DATA_LOSS_METRICS):
        assert needle in text, needle
    alerts = {r["alert"]: r["expr"] for r in T.rules() if "alert" in r}
    for metric, alert in DATA_LOSS_METRICS.items():
        assert metric in alerts[alert], (metric, alert)
        assert metric in _exported_names(), metric
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


def test_every_rule_and_query_is_per_run():
    """Runs sharing one Prometheus never mix: every aggregation in a rule keeps namespace and
    crl_run, and every dashboard selector is restricted to the selected run (the promtool cases
    with two runs check the behaviour)."""
    agg = re.compile(r"\b(sum|max|min|count|avg)\s*(?:by\s*\(([^)]*)\))?\s*\(")
    for r in T.rules():
        for op, by in agg.findall(r["expr"]):
            labels = {x.strip() for x in (by or "").split(",")}
            assert {"namespace", "crl_run"} <= labels, (r.get("alert") or r["record"], op, by)
    dash = json.loads((T.MONITORING / "dashboards" / "crl.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "crl_run" in variables["run"]["definition"] and "$namespace" in \
        variables["run"]["definition"]
    for q in T.dashboard_queries():
        if "DCGM_" in q["expr"]:          # the exporter's own labels: the pod's namespace
            assert '"$namespace"' in q["expr"], q
            continue
        selectors = re.findall(r"\{([^}]*)\}", q["expr"])
        bare = re.sub(r'\{[^}]*\}|\[[^]]*\]|"[^"]*"', "", q["expr"])
        names = [n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
                 if n.startswith(("crl", "instance:", "up", "process_"))]
        assert selectors and len(selectors) >= len(names), q
        for sel in selectors:
            assert 'namespace="$namespace"' in sel and 'crl_run="$run"' in sel, q


def _operator_rule() -> dict:
    import yaml
    groups = yaml.safe_load((T.MONITORING / "crl-rules.yml").read_text())["groups"]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "crl"}, "spec": {"groups": groups}}


OPERATOR = T.K8S / "monitoring-operator"


def test_prometheus_operator_objects_carry_the_same_rules_and_labels():
    import yaml
    objs = T.objects(T.render(OPERATOR))
    rule = [o for o in objs if o["kind"] == "PrometheusRule"][0]
    want = _operator_rule()
    assert rule["spec"] == want["spec"], \
        "k8s/monitoring-operator/prometheusrule.yaml is stale: uv run --frozen python " \
        "tests/test_monitoring_rules.py"
    # The PodMonitor gives every series the labels the rules group by, as prometheus.yml does.
    pm = [o for o in objs if o["kind"] == "PodMonitor"][0]
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    ep = pm["spec"]["podMetricsEndpoints"][0]
    assert ep["port"] == "metrics"
    targets = {r.get("targetLabel"): r for r in ep["relabelings"]}
    assert targets["crl_run"]["sourceLabels"] == \
        ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
    assert targets["job"]["replacement"] == "crl-$1"
    prom = yaml.safe_load((T.MONITORING / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        if job["job_name"].startswith("crl-"):
            got = {r["target_label"] for r in job["relabel_configs"]}
            assert {"role", "namespace", "crl_run"} <= got, job["job_name"]


if __name__ == "__main__":      # regenerate k8s/monitoring-operator/prometheusrule.yaml
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass
    _Dumper.add_representer(str, lambda d, v: d.represent_scalar(
        "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))
    (OPERATOR / "prometheusrule.yaml").write_text(
        "# GENERATED from k8s/base/monitoring/crl-rules.yml (the same groups, unchanged); "
        "regenerate with\n#   uv run --frozen python tests/test_monitoring_rules.py\n"
        + yaml.dump(_operator_rule(), Dumper=_Dumper, sort_keys=False, width=200))


def test_params_service_metrics_pass_promtool_check_metrics():
    """The ParameterService's metrics as a scrape returns them, after real requests, linted by
    promtool (tests/test_monitoring_live.py does the same for every role of a live run)."""
    import subprocess

    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from params import ParameterClient, ParameterServer
    registry = CollectorRegistry()
    server = ParameterServer("127.0.0.1:0", registry=registry).start()
    try:
        server.publish({"actor": {"w": np.ones((2, 2), "float32")}}, 1)
        with ParameterClient(f"127.0.0.1:{server.port}", 10.0) as client:
            assert client.get()[0] == 1
    finally:
        server.stop(None)
    text = generate_latest(registry)
    for name in (b"crl_params_publish_duration_seconds_bucket",
                 b"crl_params_request_duration_seconds_bucket"):
        assert name in text
    proc = subprocess.run([str(T.tools.promtool()), "check", "metrics"], input=text,
                          capture_output=True, timeout=60)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0 and not out.strip(), out
    # promtool does flag a convention break (a counter without _total).
    bad = subprocess.run([str(T.tools.promtool()), "check", "metrics"], capture_output=True,
                         input=b"# HELP x_requests n\n# TYPE x_requests counter\nx_requests 1\n",
                         timeout=60)
    assert b"_total" in bad.stdout + bad.stderr
