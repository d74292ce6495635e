"""`crl cluster apply`: the manifests with a given config as one run in its own namespace
(server-side apply; a Job whose pod template changed is replaced)."""
from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import shutil
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

from app.cluster.common import (
    CONFIG_KEY, CONFIG_MAP, DEFAULT_OVERLAY, MONITORING, REQUEST_TIMEOUT_S, RUN_LABEL, ApiError,
    Cluster, ClusterError, _content, _current, _dyn_reason, _dynamic, _is_connection_error, _short,
    namespace_of)

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


def add_parser(sub, common) -> None:
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
    p.add_argument("--image", default=None,
                   help="image of the crl containers (default: manifests')")
    p.add_argument("--without-monitoring", action="store_true",
                   help="leave out the run's own Prometheus and Grafana")
    p.add_argument("--dry-run", action="store_true",
                   help="print the objects that would be applied; contact no cluster")
    from app.cli import add_config_options   # --config FILE and one --section.field per field
    add_config_options(p)


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
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(checkout, DEFAULT_OVERLAY)
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
        user = C.read_yaml_file(args.config) or {}   # the same rules as every --config
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

