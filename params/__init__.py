"""The params service (a stop of the data flow: learner -> params -> actors, evaluator).

ParameterService: the learner publishes versioned params; actors and the evaluator fetch them.

Small, Acme-style interface over gRPC (protos/params.proto); no JAX in the wire format.

    server = ParameterServer("0.0.0.0:18001", max_message_mb=4, token=None).start()
    server.publish(params, version=7)          # versions strictly increase, else ValueError
    ...
    client = ParameterClient("learner:18001", timeout_s=10.0, template=params_template)
    got = client.get(min_version=6, subset="actor")   # (7, {"actor": {...}}) or None
    client.health()                                    # {"serving": True, "version": 7, ...}
    client.wait_for_version(-1, deadline_s=60.0)       # first params, polling with backoff

Actors and the evaluator follow the params through params.follower.PolicyFollower: the template
(actor params + progress), a background refresh with a deadline on every RPC (newest version
wins), one form for RPC errors (describe_error: "CODE: cause"), and the run's final version.

Wire format. The pytree is flattened with `jax.tree_util.tree_flatten_with_path` into named leaves
("actor/trunk/blocks_0/kernel": dict keys, sequence indices and attribute names joined by "/"),
each stored as C-contiguous little-endian bytes, concatenated in flatten order. `publish`
serialises once into an immutable snapshot (payload, leaf specs) and swaps it in under a lock, so
readers never wait for a publish and a stream always comes from one version. GetParams streams a
header (version, leaf specs, total bytes, sha256 of the streamed payload) and then the payload in
chunks of at most `max_message_mb` MiB (or the client's smaller limit). Per version, each
requested subset (and wire dtype) is checksummed and serialised into ready-made gRPC messages
once, at its first fetch, and every stream of it sends those bytes (_View). Clients copy each
chunk once, into the buffer their arrays view, and hash it as it arrives.

Optional: `wire_dtype="bfloat16"` (float32 leaves sent as bfloat16: half the bytes) and a
per-host cache (`host_cache`: one network fetch per host and version; _HostCache).

Subsets select top-level keys: "actor", ["actor", "alpha"], or "all". The result keeps the
top-level keys: `get(subset="actor")` returns `(version, {"actor": {...}})`.

"Not modified" convention: `min_version` is exclusive. If the server's version is not greater
(or nothing was published yet), the stream is a single header with `not_modified=true` and the
server's version (-1 if none), with status OK; `ParameterClient.get` returns None.

Errors: INVALID_ARGUMENT (malformed request, unknown subset), FAILED_PRECONDITION (expected
signature differs; `ParameterClient` raises ParamsMismatchError naming the first differing leaf
and both shapes), UNAUTHENTICATED (token missing or wrong), RESOURCE_EXHAUSTED (request over the
message limit). Transport failures (UNAVAILABLE, DEADLINE_EXCEEDED) surface as grpc.RpcError.
Every client RPC carries a deadline of `timeout_s`.

Auth: with `token` set, GetParams requires metadata `authorization: Bearer <token>`. Health is
left open so that liveness/readiness probes work without secrets (it reveals only the version).
The token is compared in constant time and never logged or put in an error message.

TLS: `ParameterServer(..., tls_cert=PEM, tls_key=PEM)` serves over TLS only;
`ParameterClient(..., tls_ca=PEM, tls_server_name=None)` connects over TLS, trusting `tls_ca`.
`security_from_config(cfg.service)` reads both and the token from the files / env var the config
names (a Kubernetes Secret mounts them), raising ConfigError naming the field if one is unusable.

Protocol version: requests carry `protocol_version` (PROTOCOL_VERSION); a client newer than the
server gets FAILED_PRECONDITION naming both versions; 0 (unset) reads as 1.
"""
from params.client import ParameterClient, describe_error
from params.security import (
                             Security,
                             check_token,
                             client_from_config,
                             read_secret_file,
                             security_from_config,
                             server_from_config,
)
from params.server import ParameterServer
from params.wire import (
                             ALL,
                             PROTOCOL_VERSION,
                             WIRE_DTYPES,
                             ParamsIntegrityError,
                             ParamsMismatchError,
                             first_difference,
                             flatten,
                             normalize_subset,
                             signature_hash,
                             specs_of,
)

# The follower needs crl.learning (optax, flax: seconds to import), which the launcher and the
# cluster commands do not: loaded on first use (PEP 562).
_FOLLOWER = ("Policy", "PolicyFollower", "policy_template")


def __getattr__(name: str):
    if name in _FOLLOWER:
        from params import follower
        return getattr(follower, name)
    raise AttributeError(f"module 'params' has no attribute {name!r}")


__all__ = ["ALL", "PROTOCOL_VERSION", "WIRE_DTYPES", "ParameterClient", "ParameterServer",
           "ParamsIntegrityError", "ParamsMismatchError", "Policy", "PolicyFollower", "Security",
           "check_token", "client_from_config", "describe_error", "first_difference", "flatten",
           "normalize_subset", "policy_template", "read_secret_file", "security_from_config",
           "server_from_config", "signature_hash", "specs_of"]
