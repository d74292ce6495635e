"""`crl cluster delete`: remove a run (its volumes and Secrets kept unless asked)."""
from __future__ import annotations

from app.cluster.common import (
    PART_OF, REQUEST_TIMEOUT_S, Cluster, ClusterError, _dyn_reason, _dynamic)

# What `delete` removes (the run's objects, by label); PersistentVolumeClaims, Secrets and the
# Namespace stay unless --delete-volumes. PriorityClasses are cluster-wide, shared by every run.
DELETED_KINDS = (("batch/v1", "Job"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"),
                 ("v1", "Service"), ("v1", "ConfigMap"),
                 ("networking.k8s.io/v1", "NetworkPolicy"), ("policy/v1", "PodDisruptionBudget"))


def add_parser(sub, common) -> None:
    p = sub.add_parser("delete", parents=[common],
                       help="remove a run: its workloads, Services, config and policies; its "
                            "volumes (checkpoints, replay, eval history) and Secrets are kept "
                            "unless --delete-volumes")
    p.add_argument("--delete-volumes", action="store_true",
                   help="delete the whole namespace, volumes and Secrets included (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --delete-volumes")


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

