"""ParameterService: the learner publishes versioned params; actors and the evaluator fetch them.

Small, Acme-style interface over gRPC (protos/params.proto); no JAX in the wire format.

    server = ParameterServer("0.0.0.0:18001", max_message_mb=4, token=None).start()
    server.publish(params, version=7)          # versions strictly increase, else ValueError
    ...
    client = ParameterClient("learner:18001", timeout_s=10.0, template=params_template)
    got = client.get(min_version=6, subset="actor")   # (7, {"actor": {...}}) or None
    client.health()                                    # {"serving": True, "version": 7, ...}
    client.wait_for_version(-1, deadline_s=60.0)       # first params, polling with backoff

Wire format. The pytree is flattened with `jax.tree_util.tree_flatten_with_path` into named leaves
("actor/trunk/blocks_0/kernel": dict keys, sequence indices and attribute names joined by "/"),
each stored as C-contiguous little-endian bytes, concatenated in flatten order. `publish`
serialises once into an immutable snapshot (payload, leaf specs, sha256) and swaps it in under a
lock, so readers never wait for a publish and a stream always comes from one version. GetParams
streams a header (version, leaf specs, total bytes, sha256 of the streamed payload) and then the
payload in chunks of at most `max_message_mb` MiB (or the client's smaller limit).

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
from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
import weakref
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import jax
import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from protos import params_pb2, params_pb2_grpc

MiB = 1 << 20
_MSG_MARGIN = 64 * 1024             # protobuf framing on top of a data chunk
_MIN_CHUNK_BYTES = 64 * 1024
_MAX_SUBSET_KEYS = 64
_MAX_KEY_CHARS = 256
_AUTH_KEY = "authorization"
_MISMATCH_KEY = "crl-params-mismatch"   # trailing metadata: JSON of the first differing leaf
ALL = "all"
PROTOCOL_VERSION = 1                    # wire protocol spoken (protos/params.proto)

Subset = Union[str, Sequence[str], None]
Spec = Tuple[str, Tuple[int, ...], str]          # (name, shape, dtype name)


class ParamsMismatchError(ValueError):
    """The params' leaf names/shapes/dtypes differ from what the caller expects (its template)."""

    def __init__(self, message: str, leaf: Optional[str] = None,
                 server_shape: Optional[Tuple[int, ...]] = None,
                 expected_shape: Optional[Tuple[int, ...]] = None,
                 server_dtype: Optional[str] = None, expected_dtype: Optional[str] = None):
        super().__init__(message)
        self.leaf = leaf
        self.server_shape = server_shape
        self.expected_shape = expected_shape
        self.server_dtype = server_dtype
        self.expected_dtype = expected_dtype


class ParamsIntegrityError(RuntimeError):
    """A params stream was malformed: wrong size, bad checksum, or out-of-order messages."""


# ---------------------------------------------------------------------------------------------
# Flattening and signatures (shared by server and client).

def _key_str(k: Any) -> str:
    tu = jax.tree_util
    if isinstance(k, tu.DictKey):
        s = str(k.key)
    elif isinstance(k, tu.SequenceKey):
        s = str(k.idx)
    elif isinstance(k, tu.GetAttrKey):
        s = str(k.name)
    elif isinstance(k, tu.FlattenedIndexKey):
        s = str(k.key)
    else:
        s = str(k)
    if not s or "/" in s:
        raise ValueError(f"params key {s!r}: keys must be non-empty and must not contain '/'")
    return s


def flatten(tree: Any) -> Tuple[List[str], List[Any], Any]:
    """(names, leaves, treedef) of a pytree; names are '/'-joined paths in flatten order."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names, leaves = [], []
    for path, leaf in path_leaves:
        if not path:
            raise ValueError("params must be a pytree with named leaves (e.g. a dict of arrays), "
                             "not a bare array")
        names.append("/".join(_key_str(k) for k in path))
        leaves.append(leaf)
    if len(set(names)) != len(names):
        raise ValueError("params leaf names collide after '/'-joining paths")
    return names, leaves, treedef


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # installed with jax; bfloat16, float8 types
        try:
            return np.dtype(getattr(ml_dtypes, name))
        except AttributeError:
            raise ParamsIntegrityError(f"unknown dtype {name!r} in params header") from None


def specs_of(tree: Any) -> List[Spec]:
    """[(name, shape, dtype)] of a pytree of arrays / jax.ShapeDtypeStruct / anything with shape
    and dtype (or array-likes)."""
    names, leaves, _ = flatten(tree)
    out = []
    for name, leaf in zip(names, leaves):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)
        out.append((name, tuple(int(d) for d in leaf.shape), _dtype_name(leaf.dtype)))
    return out


def signature_hash(specs: Sequence[Spec]) -> str:
    """Hex sha256 of leaf specs in order: one 'name|d0,d1|dtype' line per leaf."""
    h = hashlib.sha256()
    for name, shape, dtype in specs:
        h.update(f"{name}|{','.join(str(int(d)) for d in shape)}|{dtype}\n".encode())
    return h.hexdigest()


def first_difference(server: Sequence[Spec], expected: Sequence[Spec]) -> Optional[Dict[str, Any]]:
    """The first leaf (in server order, then expected-only leaves) whose presence, shape or dtype
    differs; None if the specs match exactly (including order)."""
    exp = {n: (tuple(s), d) for n, s, d in expected}
    srv = {n: (tuple(s), d) for n, s, d in server}
    for name, shape, dtype in server:
        if name not in exp:
            return dict(leaf=name, server_shape=list(shape), server_dtype=dtype,
                        expected_shape=None, expected_dtype=None)
        eshape, edtype = exp[name]
        if tuple(shape) != eshape or dtype != edtype:
            return dict(leaf=name, server_shape=list(shape), server_dtype=dtype,
                        expected_shape=list(eshape), expected_dtype=edtype)
    for name, shape, dtype in expected:
        if name not in srv:
            return dict(leaf=name, server_shape=None, server_dtype=None,
                        expected_shape=list(shape), expected_dtype=dtype)
    if [n for n, _, _ in server] != [n for n, _, _ in expected]:
        return dict(leaf=None, server_shape=None, server_dtype=None, expected_shape=None,
                    expected_dtype=None)
    return None


def _describe(shape, dtype) -> str:
    return "absent" if shape is None else f"shape {tuple(shape)} {dtype}"


def _mismatch_message(d: Dict[str, Any], version: Optional[int] = None) -> str:
    where = f" (version {version})" if version is not None else ""
    if d.get("leaf") is None:
        return f"params mismatch{where}: same leaves in a different order"
    return (f"params mismatch{where} at leaf {d['leaf']!r}: server has "
            f"{_describe(d['server_shape'], d['server_dtype'])}, template expects "
            f"{_describe(d['expected_shape'], d['expected_dtype'])}")


def _mismatch_error(d: Dict[str, Any], message: Optional[str] = None) -> ParamsMismatchError:
    t = lambda s: None if s is None else tuple(s)  # noqa: E731
    return ParamsMismatchError(message or _mismatch_message(d), leaf=d.get("leaf"),
                               server_shape=t(d.get("server_shape")),
                               expected_shape=t(d.get("expected_shape")),
                               server_dtype=d.get("server_dtype"),
                               expected_dtype=d.get("expected_dtype"))


def _check_subset(subset: Sequence[str]) -> Optional[str]:
    """An error message for a malformed subset list, or None."""
    if len(subset) > _MAX_SUBSET_KEYS:
        return f"subset has {len(subset)} keys; at most {_MAX_SUBSET_KEYS} allowed"
    for k in subset:
        if not k or len(k) > _MAX_KEY_CHARS or "/" in k or not k.isprintable():
            return (f"malformed subset key {k[:80]!r}: must be a non-empty top-level key "
                    f"(at most {_MAX_KEY_CHARS} printable characters, no '/')")
    if len(set(subset)) != len(subset):
        return f"subset {list(subset)} repeats a key"
    if ALL in subset and len(subset) > 1:
        return f"subset {list(subset)}: 'all' cannot be combined with other keys"
    return None


def normalize_subset(subset: Subset) -> Tuple[str, ...]:
    """() for everything, else the requested top-level keys. Raises ValueError if malformed."""
    if subset is None:
        return ()
    keys = (subset,) if isinstance(subset, str) else tuple(subset)
    if not all(isinstance(k, str) for k in keys):
        raise ValueError(f"subset must be a string or a list of strings, got {subset!r}")
    err = _check_subset(keys)
    if err:
        raise ValueError(err)
    return () if keys in ((), (ALL,)) else keys


# ---------------------------------------------------------------------------------------------
# Server side.

@dataclass(frozen=True)
class _Leaf:
    name: str
    key: str
    shape: Tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass
class _Snapshot:
    """One published version; never mutated after construction except for memo caches."""
    version: int
    leaves: Tuple[_Leaf, ...]
    keys: Tuple[str, ...]                           # top-level keys, payload order
    payload: memoryview                             # read-only
    published_unix_s: float
    _memo: Dict[Tuple[str, ...], Tuple] = field(default_factory=dict)
    _headers: Dict[Tuple[Tuple[str, ...], int], params_pb2.ParamsHeader] = \
        field(default_factory=dict)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total_bytes(self) -> int:
        return self.payload.nbytes

    def _resolve(self, keys: Tuple[str, ...]) -> Tuple[str, ...]:
        """The requested top-level keys in payload order; () means all."""
        wanted = set(keys or self.keys)
        return tuple(k for k in self.keys if k in wanted)

    def select(self, keys: Tuple[str, ...]):
        """(leaves, byte ranges, sha256 digest, signature hash) for a subset; memoised so that
        each subset is hashed once per version."""
        keys = self._resolve(keys)
        with self._memo_lock:
            hit = self._memo.get(keys)
            if hit is None:
                leaves = tuple(l for l in self.leaves if l.key in set(keys))
                ranges: List[List[int]] = []
                for l in leaves:
                    if ranges and ranges[-1][1] == l.offset:
                        ranges[-1][1] += l.nbytes
                    else:
                        ranges.append([l.offset, l.offset + l.nbytes])
                h = hashlib.sha256()
                for a, b in ranges:
                    h.update(self.payload[a:b])
                sig = signature_hash([(l.name, l.shape, l.dtype) for l in leaves])
                hit = (leaves, tuple(map(tuple, ranges)), h.digest(), sig)
                self._memo[keys] = hit
            return hit

    def header(self, keys: Tuple[str, ...], chunk_bytes: int) -> params_pb2.ParamsHeader:
        """The stream header for a subset (memoised; treat as read-only)."""
        leaves, ranges, digest, sig = self.select(keys)
        keys = self._resolve(keys)
        with self._memo_lock:
            h = self._headers.get((keys, chunk_bytes))
        if h is None:
            n_chunks = sum(math.ceil((b - a) / chunk_bytes) for a, b in ranges)
            h = params_pb2.ParamsHeader(
                not_modified=False, version=self.version,
                leaves=[params_pb2.LeafSpec(name=l.name, shape=l.shape, dtype=l.dtype,
                                            nbytes=l.nbytes) for l in leaves],
                total_bytes=sum(b - a for a, b in ranges), sha256=digest, num_chunks=n_chunks,
                signature_sha256=sig, subset=list(keys))
            with self._memo_lock:
                h = self._headers.setdefault((keys, chunk_bytes), h)
        return h

    def chunks(self, keys: Tuple[str, ...], chunk_bytes: int) -> Iterator[bytes]:
        _, ranges, _, _ = self.select(keys)
        for a, b in ranges:
            for s in range(a, b, chunk_bytes):
                yield self.payload[s:min(b, s + chunk_bytes)].tobytes()


def _serialize(params: Any, version: int) -> _Snapshot:
    names, leaves, _ = flatten(params)
    leaves = jax.device_get(leaves)                 # one batched device->host transfer
    arrays = []
    for name, leaf in zip(names, leaves):
        a = np.asarray(leaf)
        if a.dtype.kind not in "biufc" and \
                not getattr(a.dtype.type, "__module__", "").startswith("ml_dtypes"):
            raise ValueError(f"params leaf {name!r} has dtype {a.dtype}; only numeric arrays")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays.append(np.asarray(a, order="C"))   # (ascontiguousarray makes 0-d arrays 1-d)
    keys: List[str] = []
    meta: List[_Leaf] = []
    off = 0
    for name, a in zip(names, arrays):
        key = name.split("/", 1)[0]
        if key == ALL:
            raise ValueError("params top-level key 'all' is reserved (it means the whole tree)")
        if not keys or keys[-1] != key:
            if key in keys:   # jax flattens dicts in sorted order, so this means an odd pytree
                raise ValueError(f"leaves of top-level key {key!r} are not contiguous")
            keys.append(key)
        meta.append(_Leaf(name, key, tuple(int(d) for d in a.shape), _dtype_name(a.dtype),
                          off, a.nbytes))
        off += a.nbytes
    buf = np.empty(off, np.uint8)
    for l, a in zip(meta, arrays):
        if l.nbytes:
            buf[l.offset:l.offset + l.nbytes] = a.reshape(-1).view(np.uint8)
    buf.flags.writeable = False
    snap = _Snapshot(version, tuple(meta), tuple(keys), memoryview(buf), time.time())
    snap.select(())                                 # hash the whole payload once, at publish
    return snap


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        kw = dict(registry=registry)
        self.version = Gauge("crl_params_version",
                             "Latest published params version (-1: none yet)", **kw)
        self.version.set(-1)
        self.publish_latency = Histogram(
            "crl_params_publish_latency_seconds",
            "Time to serialise, checksum and swap in one params version",
            buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), **kw)
        self.payload_bytes = Gauge("crl_params_payload_bytes",
                                   "Bytes of the latest published params payload", **kw)
        self.leaves = Gauge("crl_params_leaves", "Leaves in the latest published params", **kw)
        self.requests = Counter("crl_params_requests_total",
                                "ParameterService requests by method and result",
                                ["method", "result"], **kw)
        self.sent_bytes = Counter("crl_params_sent_bytes_total",
                                  "Params payload bytes streamed to clients", **kw)
        self.request_latency = Histogram(
            "crl_params_request_latency_seconds", "ParameterService request duration",
            ["method"], buckets=(.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), **kw)


_METRICS: "weakref.WeakKeyDictionary[CollectorRegistry, _Metrics]" = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    """One metric set per registry, shared by every server that uses it (no duplicate errors)."""
    with _METRICS_LOCK:
        m = _METRICS.get(registry)
        if m is None:
            m = _METRICS[registry] = _Metrics(registry)
        return m


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, result: str,
                 trailing: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code, self.message, self.result, self.trailing = code, message, result, trailing


class _Servicer(params_pb2_grpc.ParameterServiceServicer):
    def __init__(self, server: "ParameterServer"):
        self._s = server

    def _authorize(self, context) -> None:
        token = self._s._token
        if token is None:
            return
        got = ""
        for k, v in context.invocation_metadata() or ():
            if k == _AUTH_KEY:
                got = v if isinstance(v, str) else v.decode(errors="replace")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(got.encode(), expected.encode()):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                         "missing or invalid params token: send metadata "
                         "'authorization: Bearer <token>'", "unauthenticated")

    def _validate(self, req) -> Tuple[Tuple[str, ...], int]:
        if req.protocol_version > PROTOCOL_VERSION:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"client speaks params protocol version {req.protocol_version}, this "
                         f"server speaks {PROTOCOL_VERSION}: run the same crl release in every "
                         "role", "bad_version")
        if req.min_version < -1:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"min_version = {req.min_version}: must be >= -1 (-1 = any version)",
                         "invalid_argument")
        err = _check_subset(tuple(req.subset))
        if err:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, err, "invalid_argument")
        sig = req.expected_signature_sha256
        if sig and (len(sig) != 64 or any(c not in "0123456789abcdef" for c in sig)):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "expected_signature_sha256 must be 64 lowercase hex characters "
                         f"(got {sig[:80]!r})", "invalid_argument")
        for l in req.expected_leaves:
            if not l.name or any(d < 0 for d in l.shape) or not l.dtype:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"malformed expected leaf {l.name[:80]!r}: needs a name, "
                             "non-negative dims and a dtype", "invalid_argument")
        chunk = self._s._chunk_bytes
        if req.max_chunk_bytes:
            if req.max_chunk_bytes < _MIN_CHUNK_BYTES:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"max_chunk_bytes = {req.max_chunk_bytes}: must be 0 or >= "
                             f"{_MIN_CHUNK_BYTES}", "invalid_argument")
            chunk = min(chunk, req.max_chunk_bytes)
        keys = tuple(req.subset)
        return (() if keys in ((), (ALL,)) else keys), chunk

    def _stream(self, req, context, state: "_RequestState") -> Iterator[params_pb2.ParamsChunk]:
        self._authorize(context)
        keys, chunk = self._validate(req)
        snap = self._s._current()
        unknown = [k for k in keys if snap is not None and k not in snap.keys]
        if unknown:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"unknown params subset {unknown[0]!r}; top-level keys of version "
                         f"{snap.version} are {list(snap.keys)} (or 'all')", "invalid_argument")
        if snap is None or snap.version <= req.min_version:
            # Nothing published yet (subset names cannot be checked) or nothing newer.
            state.result = "not_modified"
            yield params_pb2.ParamsChunk(header=params_pb2.ParamsHeader(
                not_modified=True, version=-1 if snap is None else snap.version))
            return
        header = snap.header(keys, chunk)
        if req.expected_leaves:
            served = [(l.name, tuple(l.shape), l.dtype) for l in header.leaves]
            expected = [(l.name, tuple(l.shape), l.dtype) for l in req.expected_leaves]
            d = first_difference(served, expected)
            if d is not None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             _mismatch_message(d, snap.version), "mismatch",
                             ((_MISMATCH_KEY, json.dumps(d)),))
        elif req.expected_signature_sha256 and \
                req.expected_signature_sha256 != header.signature_sha256:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"params signature mismatch (version {snap.version}, subset "
                         f"{list(header.subset)}): expected {req.expected_signature_sha256}, "
                         f"server has {header.signature_sha256}; send expected_leaves to get "
                         "the first differing leaf", "mismatch")
        state.result = "cancelled"     # until the last chunk is out
        yield params_pb2.ParamsChunk(header=header)
        for data in snap.chunks(keys, chunk):
            yield params_pb2.ParamsChunk(data=data)
            self._s._metrics.sent_bytes.inc(len(data))
        state.result = "ok"

    def GetParams(self, request, context):
        t0 = time.monotonic()
        state = _RequestState()
        try:
            yield from self._stream(request, context, state)
        except _Abort as e:
            state.result = e.result
            if e.trailing:
                context.set_trailing_metadata(e.trailing)
            context.abort(e.code, e.message)
        finally:
            self._s._metrics.requests.labels("GetParams", state.result).inc()
            self._s._metrics.request_latency.labels("GetParams").observe(time.monotonic() - t0)

    def Health(self, request, context):
        t0 = time.monotonic()
        snap = self._s._current()
        reply = params_pb2.HealthReply(
            serving=self._s._serving, ready=self._s._serving and snap is not None,
            version=-1 if snap is None else snap.version,
            payload_bytes=0 if snap is None else snap.total_bytes,
            num_leaves=0 if snap is None else len(snap.leaves),
            keys=[] if snap is None else list(snap.keys),
            published_unix_s=0.0 if snap is None else snap.published_unix_s,
            uptime_s=time.monotonic() - self._s._started_at if self._s._started_at else 0.0,
            protocol_version=PROTOCOL_VERSION)
        self._s._metrics.requests.labels("Health", "ok").inc()
        self._s._metrics.request_latency.labels("Health").observe(time.monotonic() - t0)
        return reply


class _RequestState:
    """Per-request result label for the requests counter (the servicer is shared)."""
    __slots__ = ("result",)

    def __init__(self):
        self.result = "error"


class ParameterServer:
    """Serves the latest published params to any number of clients.

    `address` is host:port; port 0 picks a free port (see `.port` / `.address` after start).
    `max_message_mb` bounds every gRPC message: data chunks are at most that many MiB.
    `token`: shared secret; GetParams then requires metadata 'authorization: Bearer <token>'.
    `tls_cert`, `tls_key`: PEM bytes of the server certificate (chain) and its key; with them the
    port speaks TLS only.
    """

    def __init__(self, address: str, max_message_mb: int = 4, token: Optional[str] = None,
                 registry: CollectorRegistry = REGISTRY, max_workers: int = 16,
                 tls_cert: Optional[bytes] = None, tls_key: Optional[bytes] = None):
        if not isinstance(max_message_mb, int) or max_message_mb <= 0:
            raise ValueError(f"max_message_mb = {max_message_mb!r}: must be a positive integer")
        if token is not None:
            check_token(token, "token")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key must be given together (PEM bytes)")
        self._tls = (tls_key, tls_cert) if tls_cert else None
        self._requested_address = address
        self._chunk_bytes = max_message_mb * MiB
        self._msg_limit = self._chunk_bytes + _MSG_MARGIN
        self._token = token
        self._metrics = _metrics_for(registry)
        self._max_workers = max_workers
        self._lock = threading.Lock()           # guards the snapshot pointer only
        self._publish_lock = threading.Lock()   # serialises publishers
        self._snapshot: Optional[_Snapshot] = None
        self._server: Optional[grpc.Server] = None
        self._serving = False
        self._started_at = 0.0
        self.port: Optional[int] = None
        self.address: Optional[str] = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "ParameterServer":
        if self._server is not None:
            raise RuntimeError("ParameterServer already started")
        options = [("grpc.max_send_message_length", self._msg_limit),
                   ("grpc.max_receive_message_length", self._msg_limit),
                   ("grpc.so_reuseport", 0)]      # a taken port must fail, not be shared
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                                        thread_name_prefix="params-rpc"),
                             options=options)
        params_pb2_grpc.add_ParameterServiceServicer_to_server(_Servicer(self), server)
        host = self._requested_address.rpartition(":")[0]
        try:
            if self._tls is not None:
                creds = grpc.ssl_server_credentials([self._tls])
                port = server.add_secure_port(self._requested_address, creds)
            else:
                port = server.add_insecure_port(self._requested_address)
        except RuntimeError as e:
            raise RuntimeError(f"ParameterServer cannot bind {self._requested_address!r}: {e}") \
                from None
        if not port:
            raise RuntimeError(f"ParameterServer cannot bind {self._requested_address!r}")
        server.start()
        self._server, self.port = server, port
        self.address = f"{host}:{port}"
        self._started_at = time.monotonic()
        self._serving = True
        return self

    @property
    def tls(self) -> bool:
        return self._tls is not None

    def stop(self, grace: Optional[float] = None) -> None:
        """Stops serving; in-flight streams get `grace` seconds to finish (None: cancel now)."""
        self._serving = False
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()

    def __enter__(self) -> "ParameterServer":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop(None)

    # -- publishing -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        snap = self._current()
        return -1 if snap is None else snap.version

    def _current(self) -> Optional[_Snapshot]:
        with self._lock:
            return self._snapshot

    def publish(self, params: Any, version: int) -> None:
        """Makes `params` (a pytree of arrays) the served version. `version` must be an int
        greater than every version published before (ValueError otherwise). Serialises and
        checksums once (the arrays are copied, so the caller may reuse them); readers are never
        blocked by the work, only by the pointer swap. Safe to call before `start()`."""
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise ValueError(f"params version must be an int, got {version!r}")
        version = int(version)
        if version < 0:
            raise ValueError(f"params version {version}: must be >= 0")
        t0 = time.perf_counter()
        with self._publish_lock:
            current = self.version
            if version <= current:
                raise ValueError(f"params version {version} is not newer than the published "
                                 f"version {current}; versions must strictly increase")
            snap = _serialize(params, version)
            header = snap.header((), self._chunk_bytes)
            if header.ByteSize() > self._chunk_bytes:
                raise ValueError(f"params header ({header.ByteSize()} bytes for "
                                 f"{len(snap.leaves)} leaves) exceeds max_message_mb = "
                                 f"{self._chunk_bytes // MiB}; raise service.max_message_mb")
            with self._lock:
                self._snapshot = snap
        m = self._metrics
        m.version.set(version)
        m.payload_bytes.set(snap.total_bytes)
        m.leaves.set(len(snap.leaves))
        m.publish_latency.observe(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Client side.

def _unflatten_names(names: Sequence[str], arrays: Sequence[np.ndarray]) -> Dict[str, Any]:
    """Nested dicts from '/'-joined names (used when the client has no template)."""
    root: Dict[str, Any] = {}
    for name, arr in zip(names, arrays):
        node = root
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = arr
    return root


class ParameterClient:
    """Fetches params from a ParameterServer. Thread-safe; every RPC has a `timeout_s` deadline.

    `template`: optional pytree of arrays / jax.ShapeDtypeStruct describing what the caller's
    network expects. With it, `get` asks the server to check the signature, rejects any payload
    whose names/shapes/dtypes differ (ParamsMismatchError naming the first differing leaf and both
    shapes), and rebuilds results with the template's tree structure. If the template has more
    top-level keys than the requested subset, only the requested keys are compared, so actors may
    pass the full params template and ask for subset="actor". Without a template, results are
    nested dicts of numpy arrays keyed by path.
    """

    def __init__(self, address: str, timeout_s: float = 10.0, template: Any = None,
                 token: Optional[str] = None, max_message_mb: int = 4,
                 tls_ca: Optional[bytes] = None, tls_server_name: Optional[str] = None):
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s = {timeout_s!r}: must be > 0")
        if token is not None:
            check_token(token, "token")
        if not isinstance(max_message_mb, int) or max_message_mb <= 0:
            raise ValueError(f"max_message_mb = {max_message_mb!r}: must be a positive integer")
        self.address = address
        self.timeout_s = float(timeout_s)
        self._chunk_bytes = max_message_mb * MiB
        limit = self._chunk_bytes + _MSG_MARGIN
        options = [("grpc.max_send_message_length", limit),
                   ("grpc.max_receive_message_length", limit)]
        if tls_ca:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self.tls = bool(tls_ca)
        self._stub = params_pb2_grpc.ParameterServiceStub(self._channel)
        self._metadata = ((_AUTH_KEY, f"Bearer {token}"),) if token else ()
        self._template = template
        self._expected: Dict[Tuple[str, ...], Tuple[List[Spec], str, Any]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ParameterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- template handling --------------------------------------------------------------------
    def _expected_for(self, keys: Tuple[str, ...]):
        """(specs, signature hash, restricted template) for a subset, or None without template."""
        if self._template is None:
            return None
        with self._lock:
            hit = self._expected.get(keys)
            if hit is None:
                t = self._template
                if keys and isinstance(t, Mapping) and all(k in t for k in keys):
                    t = {k: t[k] for k in keys}
                specs = specs_of(t)
                hit = self._expected[keys] = (specs, signature_hash(specs), t)
            return hit

    # -- RPCs --------------------------------------------------------------------------------
    def health(self, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """{'serving', 'ready', 'version', 'payload_bytes', 'num_leaves', 'keys',
        'published_unix_s', 'uptime_s'}; raises grpc.RpcError if the server cannot be reached."""
        r = self._stub.Health(params_pb2.HealthRequest(), timeout=timeout_s or self.timeout_s,
                              metadata=self._metadata)
        return dict(serving=r.serving, ready=r.ready, version=r.version,
                    payload_bytes=r.payload_bytes, num_leaves=r.num_leaves, keys=list(r.keys),
                    published_unix_s=r.published_unix_s, uptime_s=r.uptime_s)

    def get(self, min_version: int = -1, subset: Subset = "actor",
            timeout_s: Optional[float] = None) -> Optional[Tuple[int, Any]]:
        """(version, params) if the server has a version > min_version, else None.

        `subset`: "actor", a list of top-level keys, or "all"; the result keeps those keys
        ({"actor": {...}}). Verifies size and sha256 (ParamsIntegrityError) and the template
        (ParamsMismatchError). Raises grpc.RpcError for other failures (INVALID_ARGUMENT,
        UNAUTHENTICATED, UNAVAILABLE, DEADLINE_EXCEEDED, ...)."""
        if isinstance(min_version, bool) or not isinstance(min_version, (int, np.integer)):
            raise ValueError(f"min_version must be an int, got {min_version!r}")
        keys = normalize_subset(subset)
        timeout = timeout_s or self.timeout_s
        expected = self._expected_for(keys)
        req = params_pb2.GetParamsRequest(min_version=int(min_version), subset=list(keys),
                                          max_chunk_bytes=self._chunk_bytes,
                                          protocol_version=PROTOCOL_VERSION)
        if expected is not None:
            req.expected_signature_sha256 = expected[1]
        try:
            return self._fetch(req, expected, timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or expected is None:
                raise
            detail = _mismatch_detail(e)
            if detail is None:
                # Only the hash was compared: ask again with the full specs so the server can
                # name the first differing leaf (error path only; the common path sends 64 bytes).
                req.expected_leaves.extend(params_pb2.LeafSpec(name=n, shape=s, dtype=d)
                                           for n, s, d in expected[0])
                try:
                    return self._fetch(req, expected, timeout)
                except grpc.RpcError as e2:
                    if e2.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    e, detail = e2, _mismatch_detail(e2)
            if detail is not None:
                raise _mismatch_error(detail, e.details()) from None
            raise ParamsMismatchError(e.details()) from None

    def _fetch(self, req, expected, timeout: float) -> Optional[Tuple[int, Any]]:
        call = self._stub.GetParams(req, timeout=timeout, metadata=self._metadata)
        try:
            first = next(call, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise ParamsIntegrityError("params stream did not start with a header")
            h = first.header
            if h.not_modified:
                if next(call, None) is not None:
                    raise ParamsIntegrityError("'not modified' header followed by data")
                return None
            specs = [(l.name, tuple(int(d) for d in l.shape), l.dtype) for l in h.leaves]
            if expected is not None:
                d = first_difference(specs, expected[0])
                if d is not None:
                    raise _mismatch_error(d, _mismatch_message(d, h.version))
            dtypes = [_np_dtype(l.dtype) for l in h.leaves]
            offsets, off = [], 0
            for l, (name, shape, _), dt in zip(h.leaves, specs, dtypes):
                want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                if l.nbytes != want:
                    raise ParamsIntegrityError(f"leaf {name!r}: header says {l.nbytes} bytes, "
                                               f"shape {shape} {dt.name} needs {want}")
                offsets.append(off)
                off += want
            total = h.total_bytes
            if off != total:
                raise ParamsIntegrityError(f"header total_bytes {total} != sum of leaves {off}")
            buf = np.empty(total, np.uint8)        # no zero-fill; every byte is written below
            view = memoryview(buf)
            hasher = hashlib.sha256()
            pos = 0
            for msg in call:
                if msg.WhichOneof("kind") != "data":
                    raise ParamsIntegrityError("unexpected second header in params stream")
                data = msg.data
                n = len(data)
                if pos + n > total:
                    raise ParamsIntegrityError(f"params stream longer than {total} bytes")
                view[pos:pos + n] = data
                hasher.update(data)
                pos += n
            if pos != total:
                raise ParamsIntegrityError(f"params stream ended at {pos} of {total} bytes")
            if hasher.digest() != h.sha256:
                raise ParamsIntegrityError(f"params version {h.version}: sha256 mismatch")
        except BaseException:
            call.cancel()
            raise
        arrays = []
        for (name, shape, _), dt, o in zip(specs, dtypes, offsets):
            count = int(np.prod(shape, dtype=np.int64))
            if count == 0:
                arrays.append(np.zeros(shape, dt))
                continue
            a = np.frombuffer(buf, dtype=dt, count=count, offset=o).reshape(shape)
            arrays.append(a if a.flags.aligned else a.copy())
        if expected is not None:
            by_name = dict(zip((s[0] for s in specs), arrays))
            _, _, treedef = flatten(expected[2])
            names = [s[0] for s in expected[0]]
            return int(h.version), jax.tree_util.tree_unflatten(treedef,
                                                                [by_name[n] for n in names])
        return int(h.version), _unflatten_names([s[0] for s in specs], arrays)

    def wait_for_version(self, min_version: int = -1, deadline_s: float = 60.0,
                         subset: Subset = "actor") -> Tuple[int, Any]:
        """Polls `get(min_version, subset)` with exponential backoff (50 ms doubling to 2 s)
        until it returns params; returns (version, params). Unreachable-server errors
        (UNAVAILABLE, DEADLINE_EXCEEDED) are retried; others raise at once. Raises TimeoutError
        after `deadline_s` seconds."""
        end = time.monotonic() + deadline_s
        delay = 0.05
        last: Optional[BaseException] = None
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                got = self.get(min_version, subset, timeout_s=max(0.05, min(self.timeout_s,
                                                                             remaining)))
                if got is not None:
                    return got
                last = None
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = e
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
        why = f"; last error: {last.code().name}: {last.details()}" if last is not None else ""
        raise TimeoutError(f"no params newer than version {min_version} from {self.address} "
                           f"within {deadline_s:g} s{why}")


def _mismatch_detail(err: grpc.RpcError) -> Optional[Dict[str, Any]]:
    try:
        for k, v in err.trailing_metadata() or ():
            if k == _MISMATCH_KEY:
                return json.loads(v)
    except Exception:  # noqa: BLE001 - no structured detail; fall back to the message
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Security from the config: TLS files and the shared token (a Kubernetes Secret mounts them).

_MAX_TOKEN_CHARS = 4096


def check_token(token: str, where: str) -> str:
    """The token if usable as gRPC metadata (printable ASCII, no spaces, 1..4096 chars), else
    ValueError naming `where` (never the token)."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"{where}: the params token is empty")
    if len(token) > _MAX_TOKEN_CHARS:
        raise ValueError(f"{where}: the params token is longer than {_MAX_TOKEN_CHARS} characters")
    if any(not 0x21 <= ord(c) <= 0x7e for c in token):
        raise ValueError(f"{where}: the params token must be printable ASCII without spaces "
                         "(it travels as gRPC metadata)")
    return token


@dataclass(frozen=True, repr=False)
class Security:
    """What a role needs to talk to (or serve) the ParameterService securely. Never logged: repr
    shows only which parts are on."""
    token: Optional[str] = None
    tls_cert: Optional[bytes] = None       # server side
    tls_key: Optional[bytes] = None        # server side
    tls_ca: Optional[bytes] = None         # client side: roots to trust
    tls_server_name: Optional[str] = None  # client side: name to check in the server certificate

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def __repr__(self) -> str:
        return (f"Security(tls={'on' if self.tls else 'off'}, "
                f"token={'set' if self.token else 'none'})")

    def describe(self) -> str:
        return f"TLS {'on' if self.tls else 'off'}, token {'required' if self.token else 'off'}"


def _read_file(field_name: str, path: str) -> bytes:
    from crl.config import ConfigError
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{field_name} = {path!r}: cannot read it ({e.strerror or e})") from None
    if not data.strip():
        raise ConfigError(f"{field_name} = {path!r}: the file is empty")
    return data


def _check_pem(field_name: str, path: str, data: bytes, kind: str) -> bytes:
    from crl.config import ConfigError
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise ConfigError(f"{field_name} = {path!r}: not a PEM {kind} (no '-----BEGIN ... {kind}' "
                          "block)")
    return data


def security_from_config(service, *, server: bool = False, environ=None) -> Security:
    """Reads the token and TLS material named by `cfg.service` (ServiceConfig).

    server=True: the learner (reads tls_cert and tls_key); else a client (reads tls_ca, or
    tls_cert when tls_ca is empty, which suits a self-signed certificate). Token: the file
    service.token_file if set, else the env var service.token_env if set and non-empty.
    Raises ConfigError naming the field if a file is unreadable or not PEM, the token is
    malformed, or service.require_token is set and no token is found. The token is never part
    of a message.
    """
    import os
    from crl.config import ConfigError
    environ = os.environ if environ is None else environ
    token = None
    if service.token_file:
        raw = _read_file("service.token_file", service.token_file)
        try:
            token = check_token(raw.decode("ascii", errors="replace").strip(),
                                f"service.token_file = {service.token_file!r}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif service.token_env and environ.get(service.token_env, "").strip():
        try:
            token = check_token(environ[service.token_env].strip(),
                                f"env var {service.token_env} (service.token_env)")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if service.require_token and token is None:
        raise ConfigError(
            "service.require_token = true but no params token was found: service.token_file is "
            f"empty and env var {service.token_env or '(none)'} is unset or empty (mount the "
            "Secret, see docs/reliability.md)")
    cert = key = ca = None
    if server and service.tls_cert:
        cert = _check_pem("service.tls_cert", service.tls_cert,
                          _read_file("service.tls_cert", service.tls_cert), "CERTIFICATE")
        key = _check_pem("service.tls_key", service.tls_key,
                         _read_file("service.tls_key", service.tls_key), "PRIVATE KEY")
    if not server and (service.tls_ca or service.tls_cert):
        name = "service.tls_ca" if service.tls_ca else "service.tls_cert"
        path = service.tls_ca or service.tls_cert
        ca = _check_pem(name, path, _read_file(name, path), "CERTIFICATE")
    return Security(token=token, tls_cert=cert, tls_key=key, tls_ca=ca,
                    tls_server_name=service.tls_server_name or None)


def client_from_config(cfg, template: Any = None, security: Optional[Security] = None,
                       timeout_s: Optional[float] = None) -> ParameterClient:
    """A ParameterClient for cfg.service.params_address with the config's TLS and token."""
    sec = security if security is not None else security_from_config(cfg.service)
    return ParameterClient(cfg.service.params_address,
                           timeout_s=timeout_s or cfg.service.rpc_timeout_s, template=template,
                           token=sec.token, max_message_mb=cfg.service.max_message_mb,
                           tls_ca=sec.tls_ca, tls_server_name=sec.tls_server_name)


def server_from_config(cfg, bind: str, security: Optional[Security] = None,
                       registry: CollectorRegistry = REGISTRY) -> ParameterServer:
    """A (not started) ParameterServer on `bind` with the config's TLS and token."""
    sec = security if security is not None else security_from_config(cfg.service, server=True)
    return ParameterServer(bind, max_message_mb=cfg.service.max_message_mb, token=sec.token,
                           registry=registry, tls_cert=sec.tls_cert, tls_key=sec.tls_key)
