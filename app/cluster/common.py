"""What every `crl cluster` command shares: the names of the deployment, the connection to
the cluster (`Cluster`), errors, the namespace of a run, and the dynamic-client helpers."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Optional

DEFAULT_NAMESPACE = "crl"
CONFIG_MAP = "crl-config"          # ConfigMap (name prefix; kustomize adds a hash) with crl.yaml
CONFIG_KEY = "crl.yaml"
PART_OF = "app.kubernetes.io/part-of=crl"
RUN_LABEL = "app.kubernetes.io/instance"   # the run; Prometheus copies it to series as crl_run
CRL_ROLES = ("replay", "learner", "actor", "evaluator")
MONITORING = ("prometheus", "grafana")
ROLES = CRL_ROLES + MONITORING
PROMETHEUS_SERVICE = "prometheus:web"
METRICS_PORT_NAME = "metrics"
DEFAULT_OVERLAY = os.path.join("k8s", "overlays", "cpu")
REQUEST_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """A user-facing failure: printed as `crl cluster: <message>`, exit status 2."""


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


def _table(header: List[str], rows: List[List[Any]]) -> List[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]

