"""`crl cluster`: operate a CRL deployment on Kubernetes through the official `kubernetes` client.

    crl cluster status [--prometheus-url URL] [--json]   roles, pods, progress / finished, UTD, alerts
    crl cluster scale-actors N                            parallelism of job/actor
    crl cluster delete [--delete-volumes] [--yes]         remove a run (volumes kept unless asked)
    crl cluster apply --name RUN --config run.yaml [--section.field VALUE ...] [--dry-run]
    crl cluster logs ROLE [--tail N] [--follow] [--pod NAME] [--previous]
    crl cluster create-secrets [--cert F --key F [--ca F]] [--token-file F] [--if-missing]
                                                          the ParameterService's TLS + token Secrets
    crl cluster probe --config FILE [--ready]             (the learner pod's health probe)

The cluster is the one of the user's kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) or,
inside a pod, the in-cluster config. Namespace: --namespace, else $CRL_NAMESPACE, else `crl`
(`crl-RUN` for `apply --name RUN`). Errors name what is missing (no config, server unreachable,
namespace absent, forbidden) and exit with status 2.

Metrics in `status` come from the Prometheus of the deployment (through the API server's service
proxy, or --prometheus-url), falling back to the learner pod's /metrics through the pod proxy.

Cheap to import: the kubernetes client, grpc and YAML are imported by the commands that use them.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

HELP = ("operate a Kubernetes deployment: status, scale-actors N, apply a config as a run, "
        "logs ROLE, create-secrets, delete")

DEFAULT_NAMESPACE = "crl"
CONFIG_MAP = "crl-config"          # ConfigMap (name prefix; kustomize adds a hash) with crl.yaml
CONFIG_KEY = "crl.yaml"
PART_OF = "app.kubernetes.io/part-of=crl"
RUN_LABEL = "app.kubernetes.io/instance"   # the run; Prometheus copies it to every series as crl_run
CRL_ROLES = ("replay", "learner", "actor", "evaluator")
MONITORING = ("prometheus", "grafana")
ROLES = CRL_ROLES + MONITORING
PROMETHEUS_SERVICE = "prometheus:web"
METRICS_PORT_NAME = "metrics"
DEFAULT_OVERLAY = os.path.join("k8s", "overlays", "cpu")
REQUEST_TIMEOUT_S = 10.0

# Config fields the manifests depend on (ports, Service names, volume paths): `apply` keeps the
# manifests' values, whatever the applied config says.
PINNED_FIELDS = ("service.host", "service.replay_address", "service.params_address",
                 "service.metrics_port", "run.run_dir", "replay.checkpoint_dir",
                 "learner.checkpoint_dir",
                 # where the pods mount the Secrets, and security on (docs/reliability.md)
                 "service.tls_cert", "service.tls_key", "service.tls_ca", "service.token_file",
                 "service.require_token",
                 # the learner Job completes at the budget (docs/deploy.md, "Run lifecycle")
                 "learner.exit_at_budget")

# The ParameterService's Secrets (created by `create-secrets`, mounted by the manifests; never in
# a manifest). TLS: type kubernetes.io/tls with tls.crt, tls.key and ca.crt (the roots actors and
# the evaluator trust: the certificate itself when self-signed). Token: key "token".
TLS_SECRET = "crl-params-tls"
TOKEN_SECRET = "crl-params-token"
TOKEN_KEY = "token"
SECRET_KEYS = {TLS_SECRET: ("tls.crt", "tls.key", "ca.crt"), TOKEN_SECRET: (TOKEN_KEY,)}
# The Services clients dial for params (service.params_address = params:18001) and the learner's
# own name: every generated certificate names each, in every in-cluster DNS form.
PARAMS_HOSTS = ("params", "learner")

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


class ClusterError(RuntimeError):
    """A user-facing failure: printed as `crl cluster: <message>`, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Arguments.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n")[1]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=None,
                        help=f"namespace of the deployment (default: $CRL_NAMESPACE or "
                             f"{DEFAULT_NAMESPACE!r})")
    common.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    common.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    common.add_argument("--name", default=None, metavar="RUN",
                        help="a run made by `apply --name RUN`: its namespace is crl-RUN")
    sub = parser.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", parents=[common], help="roles, pods, params version, UTD, alerts")
    p.add_argument("--prometheus-url", default=None,
                   help="query this Prometheus (e.g. after kubectl port-forward) instead of the "
                        "in-cluster one through the API server")
    p.add_argument("--no-metrics", action="store_true", help="skip the metrics")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("scale-actors", parents=[common],
                       help="set the parallelism of job/actor (the exploration knob)")
    p.add_argument("replicas", type=int, metavar="N")

    p = sub.add_parser("apply", parents=[common],
                       help="apply the manifests with a given config as a run (one namespace)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifests", default=None, metavar="FILE",
                     help="rendered manifests (kubectl kustomize k8s/overlays/cpu > FILE); '-' "
                          "reads stdin")
    src.add_argument("--overlay", default=None, metavar="DIR",
                     help=f"kustomize directory rendered with kubectl (default: {DEFAULT_OVERLAY})")
    p.add_argument("--kubectl", default=None,
                   help="kubectl used to render --overlay (default: $KUBECTL, then PATH)")
    p.add_argument("--actors", type=int, default=None, help="actor pods (parallelism of job/actor)")
    p.add_argument("--image", default=None, help="image of the crl containers (default: manifests')")
    p.add_argument("--without-monitoring", action="store_true",
                   help="leave out the run's own Prometheus and Grafana")
    p.add_argument("--dry-run", action="store_true",
                   help="print the objects that would be applied; contact no cluster")
    from app.cli import add_config_options   # --config FILE and one --section.field per field
    add_config_options(p)

    p = sub.add_parser("logs", parents=[common], help="logs of the pods of one role")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--pod", default=None, help="only this pod (default: every pod of the role)")
    p.add_argument("--tail", type=int, default=100, help="lines per pod (default: 100; -1 = all)")
    p.add_argument("-f", "--follow", action="store_true", help="stream (one pod)")
    p.add_argument("--previous", action="store_true", help="the previous (crashed) container")
    p.add_argument("--since", type=int, default=None, metavar="SECONDS")

    p = sub.add_parser("create-secrets", parents=[common],
                       help="create (or replace) the Secrets of the ParameterService: TLS "
                            f"({TLS_SECRET}) and the shared token ({TOKEN_SECRET})")
    p.add_argument("--cert", default=None, metavar="FILE",
                   help="PEM certificate (chain) of the learner (default: a new self-signed EC "
                        "certificate naming params and learner in every DNS form of the "
                        "namespace)")
    p.add_argument("--key", default=None, metavar="FILE", help="PEM private key of --cert")
    p.add_argument("--ca", default=None, metavar="FILE",
                   help="PEM roots the actors and the evaluator trust (default: --cert, right "
                        "for a self-signed certificate)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the token (default: a new random one); never printed")
    p.add_argument("--server-name", default="params", metavar="NAME",
                   help="the name clients check in the certificate (default: params, the host "
                        "of service.params_address; another one needs service.tls_server_name)")
    p.add_argument("--dns-name", action="append", default=[], metavar="NAME",
                   help="one more name for the generated certificate (repeatable)")
    p.add_argument("--days", type=int, default=365,
                   help="validity of the generated certificate (default: 365)")
    p.add_argument("--cluster-domain", default="cluster.local",
                   help="the cluster's DNS domain (default: cluster.local)")
    p.add_argument("--if-missing", action="store_true",
                   help="keep Secrets that exist; create only the missing ones")
    p.add_argument("--create-namespace", action="store_true",
                   help="create the namespace if it does not exist (the manifests would)")

    p = sub.add_parser("delete", parents=[common],
                       help="remove a run: its workloads, Services, config and policies; its "
                            "volumes (checkpoints, replay, eval history) and Secrets are kept "
                            "unless --delete-volumes")
    p.add_argument("--delete-volumes", action="store_true",
                   help="delete the whole namespace, volumes and Secrets included (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --delete-volumes")

    p = sub.add_parser("probe", help="health probe of the learner (runs inside its pod; no "
                                      "cluster): the ParameterService Health RPC")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the role's config: probe 127.0.0.1 at the port of "
                        "service.params_address, with its TLS settings")
    p.add_argument("--params", default=None, metavar="HOST:PORT",
                   help="probe this address instead")
    p.add_argument("--ready", action="store_true",
                   help="ok only once a params version is published (default: once serving)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")


def main(args: argparse.Namespace) -> int:
    try:
        cmd = args.cluster_command
        if cmd == "probe":
            return probe(args)
        if cmd == "apply":
            return apply(args)
        if cmd == "create-secrets":
            return create_secrets(args)
        cl = Cluster.connect(args.kubeconfig, args.context, namespace_of(args))
        if cmd == "status":
            return status(cl, args)
        if cmd == "scale-actors":
            return scale_actors(cl, args.replicas)
        if cmd == "logs":
            return logs(cl, args)
        if cmd == "delete":
            return delete(cl, args)
        raise ClusterError(f"unknown command {cmd!r}")
    except ClusterError as e:
        print(f"crl cluster: {e}", file=sys.stderr)
        return 2


def namespace_of(args) -> str:
    import re
    name = getattr(args, "name", None)
    if name is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,55}[a-z0-9])?", name):
        raise ClusterError(f"--name {name!r}: a run name is a DNS label (lowercase letters, "
                           "digits and '-', at most 57 characters): its namespace is crl-NAME")
    if getattr(args, "namespace", None):
        return args.namespace
    if name:
        return f"crl-{name}"
    return os.environ.get("CRL_NAMESPACE") or DEFAULT_NAMESPACE


# ---------------------------------------------------------------------------------------------
# Connection.

class Cluster:
    """The kubernetes client of one cluster and namespace, with errors turned into ClusterError."""

    def __init__(self, api_client, namespace: str, host: str):
        from kubernetes import client
        self.api_client, self.namespace, self.host = api_client, namespace, host
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: Optional[str], context: Optional[str], namespace: str,
                check_namespace: bool = True) -> "Cluster":
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
        conf = client.Configuration()
        try:
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=conf)
        except (ConfigException, OSError, TypeError) as e:
            if kubeconfig or context:
                raise ClusterError(f"cannot use kubeconfig {kubeconfig or '(default)'}"
                                   f"{' context ' + context if context else ''}: {e}") from None
            try:
                config.load_incluster_config(client_configuration=conf)
            except ConfigException:
                env = os.environ.get("KUBECONFIG")
                where = (f"$KUBECONFIG={env} names no usable kubeconfig" if env else
                         "no kubeconfig (set --kubeconfig or $KUBECONFIG, or create "
                         "~/.kube/config)")
                raise ClusterError(f"no Kubernetes cluster configured: {where}, and not running "
                                   "inside a pod") from None
        conf.retries = 0                  # fail fast: every call has its own timeout
        if not conf.verify_ssl:           # the kubeconfig says insecure-skip-tls-verify, as kubectl
            import urllib3
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        cl = cls(client.ApiClient(conf), namespace, conf.host)
        if check_namespace:
            cl.check_namespace()
        return cl

    def call(self, fn, *a, what: str = "", **kw):
        """fn(*a, **kw) with a request timeout; API and connection errors -> ClusterError."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError
        kw.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
        try:
            return fn(*a, **kw)
        except ApiException as e:
            raise ApiError(e.status, f"{what or fn.__name__}: {_api_reason(e)}") from None
        except (HTTPError, OSError) as e:
            raise ClusterError(f"cannot reach the Kubernetes API server at {self.host}: "
                               f"{_short(e)}") from None

    def check_namespace(self) -> None:
        try:
            self.call(self.core.read_namespace, self.namespace, what="read namespace")
        except ApiError as e:
            if e.status == 404:
                raise ClusterError(
                    f"namespace {self.namespace!r} does not exist on {self.host}: deploy with "
                    f"`kubectl apply -k {DEFAULT_OVERLAY}` (namespace {DEFAULT_NAMESPACE!r}) or "
                    "`crl cluster apply --name RUN`, or pass --namespace") from None
            if e.status not in (401, 403):   # may not read namespaces: go on, later calls tell
                raise

    # -- reads --------------------------------------------------------------------------------
    def workloads(self) -> List[Dict[str, Any]]:
        out = []
        for kind, fn in (("Deployment", self.apps.list_namespaced_deployment),
                         ("StatefulSet", self.apps.list_namespaced_stateful_set)):
            items = self.call(fn, self.namespace, label_selector=PART_OF,
                              what=f"list {kind}s").items
            for w in items:
                st = w.status
                out.append({"role": role_of(w.metadata.labels or {}), "kind": kind,
                            "name": w.metadata.name, "desired": w.spec.replicas or 0,
                            "current": (st.replicas or 0) if st else 0,
                            "ready": (st.ready_replicas or 0) if st else 0,
                            "updated": (st.updated_replicas or 0) if st else 0})
        # Jobs (learner, actors, evaluator): desired = parallelism, current = running pods,
        # done = pods that exited 0; state Complete once the Job succeeded (the run finished).
        for j in self.call(self.batch.list_namespaced_job, self.namespace, label_selector=PART_OF,
                           what="list Jobs").items:
            st = j.status
            conds = {c.type: c.status for c in ((st.conditions if st else None) or [])}
            state = ("Complete" if conds.get("Complete") == "True" else
                     "Failed" if conds.get("Failed") == "True" else "Running")
            out.append({"role": role_of(j.metadata.labels or {}), "kind": "Job",
                        "name": j.metadata.name, "desired": j.spec.parallelism or 0,
                        "current": (st.active or 0) if st else 0,
                        "ready": (getattr(st, "ready", None) or 0) if st else 0,
                        "updated": (st.active or 0) if st else 0,
                        "succeeded": (st.succeeded or 0) if st else 0, "state": state})
        order = {r: i for i, r in enumerate(ROLES)}
        return sorted(out, key=lambda w: (order.get(w["role"], 99), w["name"]))

    def pods(self, role: Optional[str] = None) -> List[Dict[str, Any]]:
        sel = PART_OF
        if role in CRL_ROLES:
            sel += f",app.kubernetes.io/name=crl,app.kubernetes.io/component={role}"
        elif role in MONITORING:
            sel += f",app.kubernetes.io/name={role}"
        items = self.call(self.core.list_namespaced_pod, self.namespace, label_selector=sel,
                          what="list pods").items
        out = []
        for p in items:
            statuses = (p.status.container_statuses or []) if p.status else []
            out.append({
                "name": p.metadata.name, "role": role_of(p.metadata.labels or {}),
                "phase": (p.status.phase if p.status else None) or "Unknown",
                "ready": f"{sum(1 for c in statuses if c.ready)}/{len(p.spec.containers)}",
                "restarts": sum(c.restart_count or 0 for c in statuses),
                "image": ",".join(c.image for c in p.spec.containers),
                "node": p.spec.node_name or "",
                "containers": [c.name for c in p.spec.containers],
            })
        return sorted(out, key=lambda p: p["name"])


class ApiError(ClusterError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _api_reason(e) -> str:
    try:
        body = json.loads(e.body)
        msg = body.get("message") or e.reason
    except (TypeError, ValueError):
        msg = (e.body or e.reason or "").strip() if isinstance(e.body, str) else e.reason
    return f"{msg} (HTTP {e.status})"


def _short(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    text = str(reason if reason is not None else e)
    return text if len(text) < 300 else text[:300] + "..."


def role_of(labels: Dict[str, str]) -> str:
    if labels.get("app.kubernetes.io/name") == "crl":
        return labels.get("app.kubernetes.io/component", "?")
    return labels.get("app.kubernetes.io/name", "?")


# ---------------------------------------------------------------------------------------------
# status

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


def _table(header: List[str], rows: List[List[Any]]) -> List[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


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


# ---------------------------------------------------------------------------------------------
# scale-actors

def scale_actors(cl: Cluster, replicas: int) -> int:
    if replicas < 0:
        raise ClusterError(f"N = {replicas}: the number of actors must be >= 0")
    try:
        before = cl.call(cl.batch.read_namespaced_job, "actor", cl.namespace,
                         what="read job/actor")
    except ApiError as e:
        if e.status == 404:
            raise ClusterError(f"job/actor not found in namespace {cl.namespace!r}") from None
        raise
    cl.call(cl.batch.patch_namespaced_job, "actor", cl.namespace,
            {"spec": {"parallelism": replicas}}, what="scale job/actor")
    print(f"job/actor in {cl.namespace}: parallelism {before.spec.parallelism} -> {replicas} "
          "(the rate limiter keeps the UTD; the next `kubectl apply -k` resets the overlay's "
          "count)")
    return 0


# ---------------------------------------------------------------------------------------------
# logs

def logs(cl: Cluster, args) -> int:
    pods = cl.pods(args.role)
    if args.pod:
        pods = [p for p in pods if p["name"] == args.pod]
        if not pods:
            raise ClusterError(f"no pod {args.pod!r} of role {args.role} in namespace "
                               f"{cl.namespace!r}")
    if not pods:
        want = [w for w in cl.workloads() if w["role"] == args.role]
        detail = (f"{want[0]['kind'].lower()}/{want[0]['name']} wants {want[0]['desired']}; "
                  "none created yet (controller manager or scheduler not running?)"
                  if want else f"no {args.role} workload is deployed")
        raise ClusterError(f"no pods of role {args.role} in namespace {cl.namespace!r} "
                           f"({detail})")
    if args.follow and len(pods) > 1:
        raise ClusterError(f"{len(pods)} pods of role {args.role}: pick one to follow with "
                           f"--pod ({', '.join(p['name'] for p in pods)})")
    kw = {"previous": args.previous}
    if args.tail is not None and args.tail >= 0:
        kw["tail_lines"] = args.tail
    if args.since:
        kw["since_seconds"] = args.since
    container = args.role if args.role in pods[0]["containers"] else pods[0]["containers"][0]
    failed = 0
    for p in pods:
        if len(pods) > 1:
            print(f"==> pod/{p['name']} <==", flush=True)
        if not p["node"]:
            failed += 1
            print(f"crl cluster: pod {p['name']} ({p['phase']}) is not scheduled on a node yet: "
                  "no logs", file=sys.stderr)
            continue
        try:
            if args.follow:
                resp = cl.call(cl.core.read_namespaced_pod_log, p["name"], cl.namespace,
                               container=container, follow=True, _preload_content=False,
                               _request_timeout=None, what=f"logs of pod {p['name']}", **kw)
                stream = getattr(resp, "stream", None) or resp.response.stream
                for chunk in stream(4096):
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
            else:
                text = cl.call(cl.core.read_namespaced_pod_log, p["name"], cl.namespace,
                               container=container, what=f"logs of pod {p['name']}", **kw)
                text = text or ""
                sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        except ApiError as e:
            failed += 1
            print(f"crl cluster: pod {p['name']} ({p['phase']}): {e}", file=sys.stderr)
        except KeyboardInterrupt:
            return 130
    return 2 if failed == len(pods) else 0


# ---------------------------------------------------------------------------------------------
# apply

def apply(args) -> int:
    namespace = namespace_of(args)
    objects = load_manifests(args)
    objects = build_run(objects, args, namespace)
    if args.dry_run:
        sys.stdout.write(_dump_all(objects))
        return 0
    cl = Cluster.connect(args.kubeconfig, args.context, namespace, check_namespace=False)
    for line in apply_objects(cl, objects):
        print(line, flush=True)
    missing = missing_secrets(cl, objects)
    if missing:
        print(f"crl cluster apply: the pods wait for Secret(s) {', '.join(missing)}, which do "
              f"not exist in namespace {namespace!r}: create them with `crl cluster "
              f"create-secrets -n {namespace}` (docs/deploy.md)", file=sys.stderr)
    return 0


def missing_secrets(cl: "Cluster", objects: List[Dict[str, Any]]) -> List[str]:
    """Secrets the pods of `objects` mount (not optional) that the namespace lacks. Unknown
    (not allowed to read Secrets): not reported."""
    wanted = []
    for o in objects:
        for v in (_pod_spec(o) or {}).get("volumes") or []:
            s = v.get("secret")
            if s and not s.get("optional") and s.get("secretName") not in wanted:
                wanted.append(s["secretName"])
    missing = []
    for name in wanted:
        try:
            cl.call(cl.core.read_namespaced_secret, name, cl.namespace, what=f"read secret/{name}")
        except ApiError as e:
            if e.status == 404:
                missing.append(name)
            elif e.status not in (401, 403):
                raise
    return missing


def _dump_all(objects) -> str:
    """YAML documents, multi-line strings (the ConfigMaps' files) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)
    Dumper.add_representer(str, text)
    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False)


def load_manifests(args) -> List[Dict[str, Any]]:
    import yaml
    if args.manifests:
        try:
            text = sys.stdin.read() if args.manifests == "-" else open(args.manifests).read()
        except OSError as e:
            raise ClusterError(f"cannot read manifests {args.manifests!r}: {e}") from None
        where = args.manifests
    else:
        overlay = args.overlay or _default_overlay()
        kubectl = args.kubectl or os.environ.get("KUBECTL") or shutil.which("kubectl")
        if not kubectl:
            raise ClusterError(
                f"rendering {overlay} needs kubectl (not on PATH; set --kubectl or $KUBECTL), or "
                f"pass pre-rendered manifests: kubectl kustomize {overlay} > crl.yaml; "
                "crl cluster apply --manifests crl.yaml ...")
        if not os.path.isdir(overlay):
            raise ClusterError(f"overlay directory {overlay!r} does not exist (run from the "
                               "repository root or pass --overlay / --manifests)")
        try:
            proc = subprocess.run([kubectl, "kustomize", overlay], capture_output=True,
                                  text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ClusterError(f"{kubectl} kustomize {overlay} failed: {e}") from None
        if proc.returncode:
            raise ClusterError(f"{kubectl} kustomize {overlay} failed: {proc.stderr.strip()}")
        text, where = proc.stdout, overlay
    try:
        objects = [o for o in yaml.safe_load_all(text) if o]
    except yaml.YAMLError as e:
        raise ClusterError(f"manifests {where!r} are not valid YAML: {e}") from None
    if not objects or not all(isinstance(o, dict) and "kind" in o for o in objects):
        raise ClusterError(f"manifests {where!r} hold no Kubernetes objects")
    return objects


def _default_overlay() -> str:
    """k8s/overlays/cpu of the working directory, else of the checkout crl runs from."""
    if os.path.isdir(DEFAULT_OVERLAY):
        return DEFAULT_OVERLAY
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        DEFAULT_OVERLAY)
    return here if os.path.isdir(here) else DEFAULT_OVERLAY


def _config_map(objects) -> Dict[str, Any]:
    for o in objects:
        name = o.get("metadata", {}).get("name", "")
        if o["kind"] == "ConfigMap" and (name == CONFIG_MAP or name.startswith(CONFIG_MAP + "-")) \
                and CONFIG_KEY in (o.get("data") or {}):
            return o
    raise ClusterError(f"the manifests hold no ConfigMap {CONFIG_MAP}[-hash] with key "
                       f"{CONFIG_KEY}: render them from k8s/")


def resolve_config(manifest_yaml: str, args) -> Tuple[Any, List[str]]:
    """The run's config: the manifests' crl.yaml < --config < --section.field options, with the
    PINNED_FIELDS kept from the manifests. Returns (config, notes)."""
    import yaml
    from crl import config as C
    base = yaml.safe_load(manifest_yaml) or {}
    data = C.to_dict(C.from_dict(base))          # complete tree, manifests' values
    pinned = {f: _get(data, f) for f in PINNED_FIELDS}
    if getattr(args, "config", None):
        try:
            with open(args.config) as f:
                user = yaml.safe_load(f) or {}
        except OSError as e:
            raise C.ConfigError(f"config file {args.config!r}: {e}") from None
        except yaml.YAMLError as e:
            raise C.ConfigError(f"config file {args.config!r} is not valid YAML: {e}") from None
        data = _deep_merge(data, C.to_dict(C.from_dict(user)) if isinstance(user, dict) else user)
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    cfg = C.override(C.from_dict(data), overrides) if overrides else C.from_dict(data)
    notes = []
    data = C.to_dict(cfg)
    for field, value in pinned.items():
        if _get(data, field) != value:
            notes.append(f"{field}: {_get(data, field)!r} -> {value!r} (set by the manifests)")
            _set(data, field, value)
    cfg = C.validate(C.derive_defaults(C.from_dict(data)))
    return cfg, notes


def build_run(objects: List[Dict[str, Any]], args, namespace: str) -> List[Dict[str, Any]]:
    """The objects of the run: namespace, config, actor count, image applied."""
    from crl import config as C
    objects = copy.deepcopy(objects)
    if args.without_monitoring:
        objects = [o for o in objects
                   if o.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")
                   not in MONITORING and not _is_monitoring_config(o)]
    cm = _config_map(objects)
    old_name = cm["metadata"]["name"]
    cfg, notes = resolve_config(cm["data"][CONFIG_KEY], args)
    for n in notes:
        print(f"crl cluster apply: {n}", file=sys.stderr)
    text = C.dumps(cfg)
    new_name = f"{CONFIG_MAP}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    cm["data"] = {CONFIG_KEY: text}
    cm["metadata"]["name"] = new_name
    run = args.name or namespace
    for o in objects:
        # The run label on every object and pod (Prometheus copies it to crl_run), and the
        # run's own labels in the private Prometheus' scrape jobs.
        o.setdefault("metadata", {}).setdefault("labels", {})[RUN_LABEL] = run
        tmpl = (o.get("spec") or {}).get("template")
        if isinstance(tmpl, dict):
            tmpl.setdefault("metadata", {}).setdefault("labels", {})[RUN_LABEL] = run
        if o["kind"] == "ConfigMap" and "prometheus.yml" in (o.get("data") or {}):
            o["data"]["prometheus.yml"] = scrape_config_for_run(o["data"]["prometheus.yml"],
                                                                namespace, run)
    for o in objects:
        md = o.setdefault("metadata", {})
        if o["kind"] == "Namespace":
            md["name"] = namespace
        elif o["kind"] not in CLUSTER_SCOPED:
            md["namespace"] = namespace
        spec = _pod_spec(o)
        if spec is None:
            continue
        for v in spec.get("volumes") or []:
            if (v.get("configMap") or {}).get("name") == old_name:
                v["configMap"]["name"] = new_name
        if o["kind"] == "Job" and md.get("name") == "actor" and args.actors is not None:
            if args.actors < 0:
                raise ClusterError(f"--actors {args.actors}: must be >= 0")
            o["spec"]["parallelism"] = args.actors
        if o["kind"] == "Job" and md.get("name") == "learner":
            _set_learner_gpus(spec, cfg.gpus.learner)
        if args.image:
            for c in spec.get("containers") or []:
                if (c.get("args") or [None])[0] in ("replay", "learner", "actor", "evaluate"):
                    c["image"] = args.image
    if not any(o["kind"] == "Namespace" for o in objects):
        objects.insert(0, {"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": namespace}})
    return sort_for_apply(objects)


CLUSTER_SCOPED = ("Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding")


def _set_learner_gpus(spec: Dict[str, Any], gpus: int) -> None:
    """The learner pod's nvidia.com/gpu = gpus.learner (the field `crl local` places by), where
    the manifests give it GPUs at all (the CPU overlay gives none)."""
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            if "nvidia.com/gpu" in (res.get(part) or {}):
                res[part]["nvidia.com/gpu"] = str(gpus)


def scrape_config_for_run(text: str, namespace: str, run: str) -> str:
    """prometheus.yml with the constant `namespace` and `crl_run` labels of its scrape jobs set
    to this run (the private Prometheus watches its own namespace only)."""
    import yaml
    cfg = yaml.safe_load(text)
    for job in cfg.get("scrape_configs") or []:
        for r in job.get("relabel_configs") or []:
            if r.get("target_label") == "namespace" and "source_labels" not in r:
                r["replacement"] = namespace
            if r.get("target_label") == "crl_run" and "source_labels" not in r:
                r["replacement"] = run
    return yaml.safe_dump(cfg, sort_keys=False)


def _is_monitoring_config(o) -> bool:
    name = o.get("metadata", {}).get("name", "")
    return o["kind"] == "ConfigMap" and name.startswith(("prometheus-", "grafana-"))


def _pod_spec(o) -> Optional[Dict[str, Any]]:
    if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return o.get("spec", {}).get("template", {}).get("spec")
    if o["kind"] == "Pod":
        return o.get("spec")
    return None


APPLY_ORDER = ["Namespace", "PriorityClass", "ServiceAccount", "ConfigMap", "Secret",
               "PersistentVolumeClaim", "Service", "PodDisruptionBudget", "Deployment",
               "StatefulSet", "Job", "NetworkPolicy"]


def sort_for_apply(objects):
    order = {k: i for i, k in enumerate(APPLY_ORDER)}
    return sorted(objects, key=lambda o: order.get(o["kind"], len(order)))


def apply_objects(cl: Cluster, objects: List[Dict[str, Any]]) -> Iterable[str]:
    """Server-side apply of every object (field manager crl-cluster); yields one line each:
    created / configured / unchanged (by resourceVersion)."""
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
    dyn = _dynamic(cl, DynamicClient)
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        ns = o["metadata"].get("namespace")
        try:
            res = dyn.resources.get(api_version=o["apiVersion"], kind=kind)
        except ResourceNotFoundError:
            raise ClusterError(f"the API server at {cl.host} does not serve {o['apiVersion']} "
                               f"{kind} (needed for {name})") from None
        replaced = False
        try:
            before = _current(res, name, ns)
            try:
                got = _server_side_apply(res, o, name, ns)
            except DynamicApiError as e:
                # A Job's pod template cannot change in place (a new config, image or GPU
                # count): the Job is deleted and created anew; its pods restart with the new
                # spec and resume from the checkpoints on their volumes.
                if not (kind == "Job" and e.status == 422 and before is not None):
                    raise
                res.delete(name=name, namespace=ns, body={"propagationPolicy": "Background"},
                           _request_timeout=REQUEST_TIMEOUT_S)
                _wait_gone(res, name, ns)
                got, replaced = _server_side_apply(res, o, name, ns), True
        except DynamicApiError as e:
            raise ClusterError(f"applying {kind.lower()}/{name}: {_dyn_reason(e)}") from None
        except Exception as e:
            if _is_connection_error(e):
                raise ClusterError(f"cannot reach the Kubernetes API server at {cl.host}: "
                                   f"{_short(e)}") from None
            raise
        state = ("created" if before is None else "replaced" if replaced else
                 "unchanged" if _content(before) == _content(got.to_dict()) else "configured")
        yield f"{kind.lower()}/{name}{' -n ' + ns if ns else ''} {state}"


def _server_side_apply(res, o, name, ns):
    return res.server_side_apply(body=o, name=name, namespace=ns, field_manager="crl-cluster",
                                 force_conflicts=True, _request_timeout=REQUEST_TIMEOUT_S)


def _wait_gone(res, name, ns, timeout_s: float = 60.0) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    while _current(res, name, ns) is not None:
        if time.monotonic() > deadline:
            raise ClusterError(f"{res.kind.lower()}/{name} is still being deleted after "
                               f"{timeout_s:.0f} s; apply again once it is gone")
        time.sleep(0.5)


def _dynamic(cl: Cluster, DynamicClient):
    try:
        return DynamicClient(cl.api_client)
    except Exception as e:
        if _is_connection_error(e):
            raise ClusterError(f"cannot reach the Kubernetes API server at {cl.host}: "
                               f"{_short(e)}") from None
        raise ClusterError(f"API discovery at {cl.host} failed: {_short(e)}") from None


def _current(res, name, ns) -> Optional[Dict[str, Any]]:
    from kubernetes.dynamic.exceptions import NotFoundError
    try:
        return res.get(name=name, namespace=ns, _request_timeout=REQUEST_TIMEOUT_S).to_dict()
    except NotFoundError:
        return None


def _content(obj: Dict[str, Any]) -> Dict[str, Any]:
    """The object without its bookkeeping (managedFields, resourceVersion): a server-side apply
    that only re-records field ownership changed nothing."""
    obj = copy.deepcopy(obj)
    md = obj.get("metadata") or {}
    for k in ("managedFields", "resourceVersion"):
        md.pop(k, None)
    return obj


def _dyn_reason(e) -> str:
    try:
        body = json.loads(e.body)
        return f"{body.get('message', e.reason)} (HTTP {e.status})"
    except (TypeError, ValueError, AttributeError):
        return str(e)


def _is_connection_error(e: BaseException) -> bool:
    from urllib3.exceptions import HTTPError
    return isinstance(e, (HTTPError, OSError))


def _get(d: Dict[str, Any], dotted: str):
    for p in dotted.split("."):
        d = d[p]
    return d


def _set(d: Dict[str, Any], dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


# ---------------------------------------------------------------------------------------------
# delete

# What `delete` removes (the run's objects, by label); PersistentVolumeClaims, Secrets and the
# Namespace stay unless --delete-volumes. PriorityClasses are cluster-wide, shared by every run.
DELETED_KINDS = (("batch/v1", "Job"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"),
                 ("v1", "Service"), ("v1", "ConfigMap"),
                 ("networking.k8s.io/v1", "NetworkPolicy"), ("policy/v1", "PodDisruptionBudget"))


def delete(cl: Cluster, args) -> int:
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
    dyn = _dynamic(cl, DynamicClient)
    found = []
    for api_version, kind in DELETED_KINDS:
        try:
            res = dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            continue                     # an old API server without policy/v1: nothing to do
        try:
            items = res.get(namespace=cl.namespace, label_selector=PART_OF,
                            _request_timeout=REQUEST_TIMEOUT_S).items
        except DynamicApiError as e:
            raise ClusterError(f"list {kind}s: {_dyn_reason(e)}") from None
        found += [(res, kind, i.metadata.name) for i in items]
    claims = [p.metadata.name for p in cl.call(cl.core.list_namespaced_persistent_volume_claim,
                                               cl.namespace, what="list volume claims").items]
    if not found and not claims:
        raise ClusterError(f"namespace {cl.namespace!r} holds no CRL run (no object labelled "
                           f"{PART_OF}, no volume claim): nothing to delete")
    if args.delete_volumes:
        if not args.yes:
            raise ClusterError(f"--delete-volumes deletes namespace {cl.namespace!r} with the "
                               f"volume claims {', '.join(claims) or '(none)'} (checkpoints, "
                               "replay, eval history) and the Secrets: add --yes to confirm")
        cl.call(cl.core.delete_namespace, cl.namespace, what=f"delete namespace {cl.namespace}")
        print(f"namespace/{cl.namespace} deleted (with everything in it: {len(found)} objects, "
              f"volume claims {', '.join(claims) or '(none)'}, Secrets)")
        return 0
    for res, kind, name in found:
        try:
            # Background: the garbage collector removes a Job's pods after it.
            res.delete(name=name, namespace=cl.namespace,
                       body={"propagationPolicy": "Background"},
                       _request_timeout=REQUEST_TIMEOUT_S)
        except DynamicApiError as e:
            if e.status != 404:
                raise ClusterError(f"delete {kind.lower()}/{name}: {_dyn_reason(e)}") from None
        print(f"{kind.lower()}/{name} -n {cl.namespace} deleted", flush=True)
    if claims:
        print(f"kept: volume claims {', '.join(claims)} and the Secrets in namespace "
              f"{cl.namespace!r} (apply the run again to resume from them; export them as "
              "docs/deploy.md says; `crl cluster delete --delete-volumes --yes` removes them)")
    return 0


# ---------------------------------------------------------------------------------------------
# create-secrets

def create_secrets(args) -> int:
    """Creates (or replaces) Secret crl-params-tls (type kubernetes.io/tls: tls.crt, tls.key,
    ca.crt) and Secret crl-params-token (key token) in the namespace. Neither the token nor the
    key is ever printed."""
    namespace = namespace_of(args)
    tls, tls_note = _tls_material(args, namespace)          # checked before any cluster call
    token, token_note = _token_material(args)
    cl = Cluster.connect(args.kubeconfig, args.context, namespace, check_namespace=False)
    _ensure_namespace(cl, args.create_namespace)
    labels = {"app.kubernetes.io/name": "crl", "app.kubernetes.io/part-of": "crl",
              "app.kubernetes.io/managed-by": "crl-cluster"}
    secrets = [
        (TLS_SECRET, "kubernetes.io/tls", dict(zip(SECRET_KEYS[TLS_SECRET], tls)), tls_note),
        (TOKEN_SECRET, "Opaque", dict(zip(SECRET_KEYS[TOKEN_SECRET], (token,))), token_note),
    ]
    replaced = []
    for name, kind, data, note in secrets:
        body = {"apiVersion": "v1", "kind": "Secret", "type": kind,
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "data": {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}}
        state = _put_secret(cl, name, kind, body, keep=args.if_missing)
        if state == "replaced":
            replaced.append(name)
        detail = (f"{kind}: {', '.join(data)}; {note}" if state != "kept" else
                  "it exists; --if-missing leaves it as it is")
        print(f"secret/{name} -n {namespace} {state} ({detail})", flush=True)
    if replaced:
        print(f"crl cluster create-secrets: running pods keep the old {' and '.join(replaced)} "
              "until they restart; restart the learner, actors and evaluator together: "
              f"kubectl delete pod -n {namespace} -l 'app.kubernetes.io/name=crl,"
              "app.kubernetes.io/component in (learner,actor,evaluator)' (their Jobs start new "
              "ones)", file=sys.stderr)
    return 0


def _ensure_namespace(cl: "Cluster", create: bool) -> None:
    try:
        cl.call(cl.core.read_namespace, cl.namespace, what="read namespace")
        return
    except ApiError as e:
        if e.status in (401, 403):        # may not read namespaces: the Secret calls will tell
            return
        if e.status != 404:
            raise
    if not create:
        raise ClusterError(
            f"namespace {cl.namespace!r} does not exist on {cl.host}: pass --create-namespace, "
            f"or create it first (`kubectl create namespace {cl.namespace}`), or pass --namespace "
            "(--name RUN for a run made by `crl cluster apply --name RUN`)")
    # Labelled as k8s/base/namespace.yaml: the restricted Pod Security Standard from the start.
    cl.call(cl.core.create_namespace, {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": cl.namespace, "labels": {
            "app.kubernetes.io/part-of": "crl",
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted"}}}, what="create namespace")
    print(f"namespace/{cl.namespace} created", flush=True)


def _put_secret(cl: "Cluster", name: str, kind: str, body: Dict[str, Any], keep: bool) -> str:
    """created / replaced / kept. A Secret of another type is deleted first (type is
    immutable)."""
    try:
        old = cl.call(cl.core.read_namespaced_secret, name, cl.namespace,
                      what=f"read secret/{name}")
    except ApiError as e:
        if e.status != 404:
            raise
        old = None
    if old is not None and keep:
        return "kept"
    if old is not None and old.type == kind:
        cl.call(cl.core.replace_namespaced_secret, name, cl.namespace, body,
                what=f"replace secret/{name}")
        return "replaced"
    if old is not None:
        cl.call(cl.core.delete_namespaced_secret, name, cl.namespace,
                what=f"delete secret/{name} (type {old.type}, not {kind})")
    cl.call(cl.core.create_namespaced_secret, cl.namespace, body, what=f"create secret/{name}")
    return "created" if old is None else "replaced"


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise ClusterError("create-secrets needs the Python package 'cryptography' (a dependency "
                           "of the kubernetes client; pip install cryptography), or create the "
                           "Secrets with openssl and kubectl (docs/deploy.md)") from None
    return x509, hashes, serialization, ec, NameOID


def certificate_names(namespace: str, cluster_domain: str = "cluster.local",
                      extra: Iterable[str] = ()) -> List[str]:
    """The DNS names of a generated certificate: params and learner as `NAME`, `NAME.NS`,
    `NAME.NS.svc` and `NAME.NS.svc.DOMAIN`, then `extra`."""
    names = []
    for host in PARAMS_HOSTS:
        names += [host, f"{host}.{namespace}", f"{host}.{namespace}.svc",
                  f"{host}.{namespace}.svc.{cluster_domain}"]
    for n in extra:
        if n not in names:
            names.append(n)
    return names


def self_signed_certificate(names: List[str], days: int = 365) -> Tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM): a self-signed EC P-256 certificate for `names`."""
    import datetime
    x509, hashes, serialization, ec, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _read_user_file(option: str, path: str) -> bytes:
    from params import read_secret_file
    return read_secret_file(f"{option} {path!r}", path, ClusterError)


def _load_certs(option: str, path: str, data: bytes):
    x509 = _crypto()[0]
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ClusterError(f"{option} {path!r}: not a PEM certificate (no valid '-----BEGIN "
                           "CERTIFICATE-----' block)") from None
    return certs


def _dns_names(cert) -> List[str]:
    x509 = _crypto()[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def _tls_material(args, namespace: str) -> Tuple[Tuple[bytes, bytes, bytes], str]:
    """((tls.crt, tls.key, ca.crt), description), generated or from --cert/--key/--ca, checked."""
    import datetime
    if bool(args.cert) != bool(args.key):
        raise ClusterError("--cert and --key go together (the certificate and its private key)")
    if args.ca and not args.cert:
        raise ClusterError("--ca needs --cert and --key (a generated certificate is its own CA)")
    if not args.server_name or any(c.isspace() for c in args.server_name):
        raise ClusterError(f"--server-name {args.server_name!r}: must be a DNS name")
    if not args.cert:
        if not 0 < args.days <= 3650:
            raise ClusterError(f"--days {args.days}: must be in 1..3650")
        names = certificate_names(namespace, args.cluster_domain,
                                  [args.server_name] + list(args.dns_name))
        cert, key = self_signed_certificate(names, args.days)
        return (cert, key, cert), (f"new self-signed EC P-256 certificate for "
                                   f"{', '.join(names)}; valid {args.days} days")
    x509, hashes, serialization, ec, NameOID = _crypto()
    cert_pem = _read_user_file("--cert", args.cert)
    key_pem = _read_user_file("--key", args.key)
    chain = _load_certs("--cert", args.cert, cert_pem)
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ClusterError(f"--key {args.key!r}: the key is encrypted; give an unencrypted PEM "
                           "key (openssl pkey -in KEY -out PLAIN_KEY)") from None
    except Exception as e:                   # noqa: BLE001 - any parse failure: not a key
        raise ClusterError(f"--key {args.key!r}: not a PEM private key ({type(e).__name__})") \
            from None
    pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*pub) != leaf.public_key().public_bytes(*pub):
        raise ClusterError(f"--key {args.key!r} is not the private key of the certificate in "
                           f"--cert {args.cert!r}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise ClusterError(f"--cert {args.cert!r} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    names = _dns_names(leaf)
    if args.server_name not in names:
        raise ClusterError(
            f"--cert {args.cert!r} names {', '.join(names) or 'no DNS name'}, not "
            f"{args.server_name!r}, the name the actors check (the host of "
            "service.params_address): add it to the certificate's subject alternative names, or "
            "set service.tls_server_name in the overlay's crl.yaml and pass --server-name")
    if args.ca:
        ca_pem = _read_user_file("--ca", args.ca)
        _load_certs("--ca", args.ca, ca_pem)
    else:
        try:
            leaf.verify_directly_issued_by(leaf)
        except Exception:                     # noqa: BLE001 - not self-signed
            raise ClusterError(f"--cert {args.cert!r} is not self-signed: pass --ca with the "
                               "certificate of the CA that signed it (the roots the actors "
                               "trust)") from None
        ca_pem = cert_pem
    return (cert_pem, key_pem, ca_pem), (f"certificate of {args.cert} for {', '.join(names)}, "
                                         f"valid until {leaf.not_valid_after_utc:%Y-%m-%d}")


def _token_material(args) -> Tuple[bytes, str]:
    """(token bytes, description): from --token-file (trailing newline dropped, checked as the
    roles check it) or a new random one. The description never holds the token."""
    if not args.token_file:
        import secrets
        return secrets.token_urlsafe(32).encode("ascii"), \
            "a new random token (its value is not shown)"
    raw = _read_user_file("--token-file", args.token_file)
    from params import check_token
    try:
        token = check_token(raw.decode("ascii", errors="replace").strip(),
                            f"--token-file {args.token_file!r}")
    except ValueError as e:
        raise ClusterError(str(e)) from None
    return token.encode("ascii"), f"the token of {args.token_file} (its value is not shown)"


# ---------------------------------------------------------------------------------------------
# probe (inside the pods: `python -m app.cluster probe --params 127.0.0.1:18001 [--ready]`)

def probe(args) -> int:
    """Health RPC of the ParameterService: exit 0 if serving (and, with --ready, a version is
    published), else 1. With --config, the address is 127.0.0.1 at the port of
    service.params_address and TLS follows the config (service.tls_*, when the config has them);
    Health needs no token."""
    import grpc
    from protos import params_pb2, params_pb2_grpc
    tls = None
    if args.config:
        from crl import config as C
        svc = C.load(args.config).service
        host, _, port = svc.params_address.rpartition(":")
        address = args.params or f"127.0.0.1:{port}"
        if getattr(svc, "tls_cert", ""):
            ca_path = getattr(svc, "tls_ca", "") or svc.tls_cert
            try:
                with open(ca_path, "rb") as f:
                    ca = f.read()
            except OSError as e:
                raise ClusterError(f"probe: cannot read the TLS roots {ca_path!r}: {e}") from None
            tls = (ca, getattr(svc, "tls_server_name", "") or host)
    elif args.params:
        address = args.params
    else:
        raise ClusterError("probe: give --config FILE (the role's config) or --params HOST:PORT")
    if tls:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls[0]),
                                      options=[("grpc.ssl_target_name_override", tls[1])])
    else:
        channel = grpc.insecure_channel(address)
    try:
        stub = params_pb2_grpc.ParameterServiceStub(channel)
        reply = stub.Health(params_pb2.HealthRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"params {address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    ok = reply.serving and (reply.ready or not args.ready)
    print(f"params {address}: serving={reply.serving} ready={reply.ready} "
          f"version={reply.version}")
    return 0 if ok else 1


def _standalone(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cluster", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from crl import config as C
    try:
        return main(args)
    except C.ConfigError as e:
        print(f"crl cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_standalone())
