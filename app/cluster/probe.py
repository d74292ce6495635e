"""`crl cluster probe` / `python -m app.cluster probe`: the learner pod's health probe (the
ParameterService Health RPC on 127.0.0.1, over TLS as the role's config says). No cluster."""
from __future__ import annotations

import sys

from app.cluster.common import ClusterError


def add_parser(sub, common) -> None:
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
        channel = grpc.secure_channel(address,
                                      grpc.ssl_channel_credentials(root_certificates=tls[0]),
                                      options=[("grpc.ssl_target_name_override", tls[1])])
    else:
        channel = grpc.insecure_channel(address)
    try:
        stub = params_pb2_grpc.ParameterServiceStub(channel)
        reply = stub.Health(params_pb2.HealthRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        from params.client import describe_error   # the one form of a params RPC error
        print(f"params {address}: {describe_error(e, address, args.timeout, tls=bool(tls))}",
              file=sys.stderr)
        return 1
    finally:
        channel.close()
    ok = reply.serving and (reply.ready or not args.ready)
    print(f"params {address}: serving={reply.serving} ready={reply.ready} "
          f"version={reply.version}")
    return 0 if ok else 1

