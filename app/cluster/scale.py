"""`crl cluster scale-actors N`: the parallelism of job/actor, the exploration knob."""
from __future__ import annotations

from app.cluster.common import ApiError, Cluster, ClusterError


def add_parser(sub, common) -> None:
    p = sub.add_parser("scale-actors", parents=[common],
                       help="set the parallelism of job/actor (the exploration knob)")
    p.add_argument("replicas", type=int, metavar="N")


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

