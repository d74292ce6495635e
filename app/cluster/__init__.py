"""`crl cluster`: operate a CRL deployment on Kubernetes through the official `kubernetes` client.

    crl cluster status [--prometheus-url URL] [--json]   progress / finished, roles, pods, UTD
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
import sys

from app.cluster import apply, delete, logs, probe, scale, secrets, status
from app.cluster.common import DEFAULT_NAMESPACE, Cluster, ClusterError, namespace_of
# Public names of the commands (tests, app.research, users).
from app.cluster.apply import PINNED_FIELDS, build_run  # noqa: F401
from app.cluster.secrets import (  # noqa: F401
    SECRET_KEYS, TLS_SECRET, TOKEN_SECRET, certificate_names, self_signed_certificate)
from app.cluster.status import (  # noqa: F401
    format_run_state, format_status, read_metrics, run_state)

HELP = ("operate a Kubernetes deployment: status, scale-actors N, apply a config as a run, "
        "logs ROLE, create-secrets, delete")


# Each command's module: add_parser(sub, common) defines its arguments; its function runs it.
COMMANDS = {"status": status, "scale-actors": scale, "apply": apply, "logs": logs,
            "create-secrets": secrets, "delete": delete, "probe": probe}   # --help order


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
    for module in COMMANDS.values():
        module.add_parser(sub, common)


def main(args: argparse.Namespace) -> int:
    try:
        cmd = args.cluster_command
        if cmd == "probe":
            return probe.probe(args)
        if cmd == "apply":
            return apply.apply(args)
        if cmd == "create-secrets":
            return secrets.create_secrets(args)
        cl = Cluster.connect(args.kubeconfig, args.context, namespace_of(args))
        if cmd == "status":
            return status.status(cl, args)
        if cmd == "scale-actors":
            return scale.scale_actors(cl, args.replicas)
        if cmd == "logs":
            return logs.logs(cl, args)
        if cmd == "delete":
            return delete.delete(cl, args)
        raise ClusterError(f"unknown command {cmd!r}")
    except ClusterError as e:
        print(f"crl cluster: {e}", file=sys.stderr)
        return 2
