"""`crl cluster status`: workloads, pods, where the run stands (env steps against the budget,
finished) and its metrics, from Prometheus or the learner pod."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from app.cluster.common import (
    DEFAULT_NAMESPACE, METRICS_PORT_NAME, PROMETHEUS_SERVICE, REQUEST_TIMEOUT_S, Cluster,
    ClusterError, _short, _table)

# status: what is read from Prometheus (name -> PromQL), for the namespace `{ns}` of the run.
# The lifecycle values look back (last_over_time): a finished run's learner pod has ended and
# its series are gone from the instant vector.
STATUS_QUERIES = {
    "params_version": 'max(crl_learner_params_version{{namespace="{ns}"}})',
    "sgd_steps": 'max(crl_learner_sgd_steps_total{{namespace="{ns}"}})',
    "env_steps": 'max(last_over_time(crl_learner_env_steps_total{{namespace="{ns}"}}[30d]))',
    "budget_env_steps":
        'max(last_over_time(crl_learner_budget_env_steps{{namespace="{ns}"}}[30d]))',
    "finished": 'max(last_over_time(crl_learner_finished{{namespace="{ns}"}}[30d]))',
    "utd": 'max(crl_learner_utd{{namespace="{ns}"}})',
    "utd_target": 'max(crl_learner_utd_target{{namespace="{ns}"}})',
    "policy_lag": 'max(crl_learner_policy_lag{{namespace="{ns}"}})',
    "env_steps_per_s": 'sum(rate(crl_actor_env_steps_total{{namespace="{ns}"}}[1m]))',
    "sgd_steps_per_s": 'sum(rate(crl_learner_sgd_steps_total{{namespace="{ns}"}}[1m]))',
    "replay_fill": 'max(crl_replay_table_size_items{{namespace="{ns}"}} / '
                   'crl_replay_table_capacity_items{{namespace="{ns}"}})',
    "eval_time_at_goal": 'max(crl_eval_time_at_goal{{namespace="{ns}"}})',
    "eval_params_version": 'max(crl_eval_params_version{{namespace="{ns}"}})',
}


# The same values from the learner's own /metrics (fallback without Prometheus).
LEARNER_METRICS = {
    "params_version": "crl_learner_params_version", "sgd_steps": "crl_learner_sgd_steps_total",
    "env_steps": "crl_learner_env_steps_total", "budget_env_steps": "crl_learner_budget_env_steps",
    "finished": "crl_learner_finished", "utd": "crl_learner_utd",
    "utd_target": "crl_learner_utd_target", "policy_lag": "crl_learner_policy_lag",
}


def add_parser(sub, common) -> None:
    p = sub.add_parser("status", parents=[common], help="run progress or finished, roles, pods, params version, UTD, alerts")
    p.add_argument("--prometheus-url", default=None,
                   help="query this Prometheus (e.g. after kubectl port-forward) instead of the "
                        "in-cluster one through the API server")
    p.add_argument("--no-metrics", action="store_true", help="skip the metrics")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def status(cl: Cluster, args) -> int:
    workloads = cl.workloads()
    pods = cl.pods()
    metrics: Dict[str, Any] = {}
    source = None
    if not args.no_metrics:
        metrics, source = read_metrics(cl, pods, args.prometheus_url)
    report = {"namespace": cl.namespace, "server": cl.host, "workloads": workloads,
              "pods": [{k: v for k, v in p.items() if k != "containers"} for p in pods],
              "metrics": metrics, "metrics_source": source,
              "run": run_state(workloads, metrics)}
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print(format_status(report))
    return 0


def format_status(r: Dict[str, Any]) -> str:
    lines = [f"namespace {r['namespace']} on {r['server']}", ""]
    if "run" in r:
        lines += [format_run_state(r["run"]), ""]
    if r["workloads"]:
        lines += _table(["ROLE", "KIND", "NAME", "DESIRED", "CURRENT", "READY", "DONE", "STATE"],
                        [[w["role"], w["kind"], w["name"], w["desired"], w["current"], w["ready"],
                          w.get("succeeded", "-"), w.get("state", "-")]
                         for w in r["workloads"]])
    else:
        lines.append("no CRL workloads in this namespace")
    lines.append("")
    if r["pods"]:
        lines += _table(["POD", "ROLE", "PHASE", "READY", "RESTARTS", "NODE", "IMAGE"],
                        [[p["name"], p["role"], p["phase"], p["ready"], p["restarts"],
                          p["node"] or "-", p["image"]] for p in r["pods"]])
    else:
        want = sum(w["desired"] for w in r["workloads"])
        lines.append(f"no pods yet ({want} desired): the controllers have not created them "
                     "or the scheduler has not placed them" if want else "no pods")
    lines.append("")
    m = r["metrics"]
    if r["metrics_source"] is None:
        lines.append("metrics: not read" if not m.get("error") else f"metrics: {m['error']}")
    else:
        def f(key, fmt="{:.0f}"):
            v = m.get(key)
            return "n/a" if v is None else fmt.format(v)
        lines.append(f"metrics (from {r['metrics_source']}):")
        lines.append(f"  params version {f('params_version')}   sgd steps {f('sgd_steps')}   "
                     f"env steps {f('env_steps')}")
        lines.append(f"  UTD {f('utd', '{:.4f}')} (target {f('utd_target', '{:.4f}')})   "
                     f"policy lag {f('policy_lag', '{:.1f}')} versions")
        if "env_steps_per_s" in m or "eval_time_at_goal" in m:
            lines.append(f"  env steps/s {f('env_steps_per_s', '{:.1f}')}   sgd steps/s "
                         f"{f('sgd_steps_per_s', '{:.2f}')}   replay fill "
                         f"{f('replay_fill', '{:.1%}')}   eval time at goal "
                         f"{f('eval_time_at_goal', '{:.1f}')} (v{f('eval_params_version')})")
        if "firing_alerts" in m:
            lines.append("  alerts firing: " + (", ".join(m["firing_alerts"]) or "none"))
    return "\n".join(lines).rstrip()


def read_metrics(cl: Optional[Cluster], pods: List[Dict[str, Any]],
                 prometheus_url: Optional[str], namespace: Optional[str] = None
                 ) -> Tuple[Dict[str, Any], Optional[str]]:
    """({name: value}, source) from Prometheus (URL or service proxy), else the learner pod.
    Only the series of `namespace` (default: the cluster's) count: a shared Prometheus holds
    many runs."""
    namespace = namespace or (cl.namespace if cl is not None else DEFAULT_NAMESPACE)
    errors = []
    try:
        if prometheus_url:
            query = _direct_query(prometheus_url)
            source = f"Prometheus at {prometheus_url}"
        else:
            query = _proxy_query(cl)
            source = f"Prometheus service {cl.namespace}/{PROMETHEUS_SERVICE.split(':')[0]}"
        return query_status(query, namespace), source
    except ClusterError as e:
        errors.append(f"Prometheus: {e}")
        if prometheus_url:
            return {"error": "; ".join(errors)}, None
    learners = [p for p in pods if p["role"] == "learner" and p["phase"] == "Running"]
    for p in learners:
        try:
            text = cl.call(cl.core.connect_get_namespaced_pod_proxy_with_path,
                           f"{p['name']}:{METRICS_PORT_NAME}", cl.namespace, "metrics",
                           what=f"read /metrics of pod {p['name']}")
            values = parse_metrics_text(text if isinstance(text, str) else str(text))
            return ({k: values.get(n) for k, n in LEARNER_METRICS.items()},
                    f"pod {p['name']} /metrics")
        except ClusterError as e:
            errors.append(str(e))
    if not learners:
        errors.append("no running learner pod")
    return {"error": "; ".join(errors)}, None


def query_status(query, namespace: str) -> Dict[str, Any]:
    """Runs STATUS_QUERIES and the firing alerts of `namespace` through
    `query(promql) -> result list`."""
    out: Dict[str, Any] = {}
    for key, q in STATUS_QUERIES.items():
        result = query(q.format(ns=namespace))
        out[key] = float(result[0]["value"][1]) if result else None
    out["actor_params_versions"] = {
        r["metric"].get("instance", "?"): float(r["value"][1])
        for r in query(f'crl_actor_params_version{{namespace="{namespace}"}}')}
    out["firing_alerts"] = sorted({r["metric"].get("alertname", "?") for r in query(
        f'ALERTS{{alertstate="firing",namespace="{namespace}"}}')})
    return out


def run_state(workloads: List[Dict[str, Any]], metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Where the run stands (contract B): finished once the learner said so
    (crl_learner_finished) or its Job completed; env steps against the budget when known."""
    learner = [w for w in workloads if w["role"] == "learner"]
    job_done = bool(learner) and learner[0].get("state") == "Complete"
    finished = metrics.get("finished") == 1 or job_done
    env, budget = metrics.get("env_steps"), metrics.get("budget_env_steps")
    return {"finished": finished, "env_steps": env, "budget_env_steps": budget,
            "progress": env / budget if env is not None and budget else None,
            "learner_job_complete": job_done,
            "failed": [w["name"] for w in workloads if w.get("state") == "Failed"]}


def format_run_state(run: Dict[str, Any]) -> str:
    steps = ("" if run["env_steps"] is None else
             f" at {run['env_steps']:.0f}" + ("" if run["budget_env_steps"] is None else
                                              f" / {run['budget_env_steps']:.0f}") +
             " env steps")
    if run["finished"]:
        how = ("the learner Job completed; its pods have ended and released their GPUs"
               if run["learner_job_complete"] else "the learner published its final params")
        line = f"run: finished{steps} ({how}); remove it with `crl cluster delete`"
    elif run["progress"] is not None:
        line = f"run: in progress{steps} ({run['progress']:.1%} of the budget)"
    else:
        line = f"run: in progress{steps}" if steps else "run: in progress"
    if run["failed"]:
        line += f"; FAILED job(s): {', '.join(run['failed'])} (crl cluster logs ROLE --previous)"
    return line


def _prom_result(payload: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(payload, (bytes, str)):
        try:
            payload = json.loads(payload)
        except ValueError:
            raise ClusterError(f"{where} did not answer with JSON") from None
    if not isinstance(payload, dict) or payload.get("status") != "success":
        err = payload.get("error") if isinstance(payload, dict) else payload
        raise ClusterError(f"{where}: query failed: {err}")
    return payload["data"]["result"]


def _direct_query(url: str):
    import urllib.error
    import urllib.parse
    import urllib.request
    base = url.rstrip("/")

    def query(q: str):
        full = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': q})}"
        try:
            with urllib.request.urlopen(full, timeout=REQUEST_TIMEOUT_S) as resp:
                return _prom_result(resp.read(), f"Prometheus at {url}")
        except urllib.error.HTTPError as e:
            return _prom_result(e.read(), f"Prometheus at {url}")
        except OSError as e:
            raise ClusterError(f"cannot reach Prometheus at {url}: {_short(e)}") from None
    return query


def _proxy_query(cl: Cluster):
    path = (f"/api/v1/namespaces/{cl.namespace}/services/{PROMETHEUS_SERVICE}/proxy/"
            "api/v1/query")
    where = f"Prometheus (service {cl.namespace}/{PROMETHEUS_SERVICE} through the API server)"

    def query(q: str):
        api = cl.api_client
        method, url, headers, body, post = api.param_serialize(
            "GET", path, query_params=[("query", q)], auth_settings=["BearerToken"])
        resp = cl.call(api.call_api, method, url, header_params=headers, body=body,
                       post_params=post, what=f"query {where}")
        resp.read()
        if resp.status >= 400:
            try:
                return _prom_result(resp.data, where)        # Prometheus' own error
            except ClusterError as e:
                if "did not answer with JSON" not in str(e):
                    raise
            text = resp.data.decode(errors="replace") if isinstance(resp.data, bytes) else resp.data
            try:
                text = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                pass
            raise ClusterError(f"{where}: HTTP {resp.status}: {str(text).strip()[:300]}")
        return _prom_result(resp.data, where)
    return query


def parse_metrics_text(text: str) -> Dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out: Dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out

