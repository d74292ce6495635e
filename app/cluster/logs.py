"""`crl cluster logs ROLE`: the logs of every pod of a role (or one, followed)."""
from __future__ import annotations

import sys

from app.cluster.common import ROLES, ApiError, Cluster, ClusterError


def add_parser(sub, common) -> None:
    p = sub.add_parser("logs", parents=[common], help="logs of the pods of one role")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--pod", default=None, help="only this pod (default: every pod of the role)")
    p.add_argument("--tail", type=int, default=100, help="lines per pod (default: 100; -1 = all)")
    p.add_argument("-f", "--follow", action="store_true", help="stream (one pod)")
    p.add_argument("--previous", action="store_true", help="the previous (crashed) container")
    p.add_argument("--since", type=int, default=None, metavar="SECONDS")


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

