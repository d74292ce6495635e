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
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import threading
import time
import weakref
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import jax
import numpy as np
from google.protobuf.message import DecodeError
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
_BF16 = "bfloat16"
WIRE_DTYPES = ("", _BF16)               # GetParamsRequest.wire_dtype: as published, or bfloat16
_DATA_TAG = b"\x12"                     # ParamsChunk.data: field 2, length-delimited
_MAX_VIEWS = 16                         # memoised (subset, wire dtype) views per version
_MAX_EXTRA = 2                          # memoised copies (bf16, serialised) <= 2 x the payload
_HASH_BLOCK = 1 << 20                   # client: copy then hash in 1 MiB blocks (cache-hot)
_METHOD = "/crl.params.ParameterService/"

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


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _encode_data(part) -> bytes:
    """The serialised ParamsChunk{data: part} (byte for byte what protobuf writes), in one copy."""
    return b"".join((_DATA_TAG, _varint(len(part)), part))


class _View:
    """What one (subset, wire dtype) streams from a snapshot, built once per version: the leaves
    as streamed, the byte ranges of `payload` they occupy, the sha256 of those bytes, the
    signature of the specs as published, and (memoised per chunk size) the stream header and the
    serialised data messages, so that a stream only hands ready-made bytes to gRPC."""

    def __init__(self, published: Tuple[_Leaf, ...], wire: Tuple[_Leaf, ...],
                 payload: memoryview, ranges: Tuple[Tuple[int, int], ...], digest: bytes,
                 wire_dtype: str, version: int, keys: Tuple[str, ...]):
        self.published_specs = [(l.name, l.shape, l.dtype) for l in published]
        self.signature = signature_hash(self.published_specs)
        self.leaves, self.payload, self.ranges, self.digest = wire, payload, ranges, digest
        self.total_bytes = sum(b - a for a, b in ranges)
        self.wire_dtype, self.version, self.keys = wire_dtype, version, keys
        self._headers: Dict[int, params_pb2.ParamsHeader] = {}
        self._encoded: Dict[int, Tuple[Tuple[bytes, int], ...]] = {}
        self._lock = threading.Lock()
        self.memoised = False          # kept by its snapshot (else built for one request)

    def header(self, chunk_bytes: int) -> params_pb2.ParamsHeader:
        """The stream header (memoised; treat as read-only)."""
        with self._lock:
            h = self._headers.get(chunk_bytes)
            if h is None:
                n_chunks = sum(math.ceil((b - a) / chunk_bytes) for a, b in self.ranges)
                h = self._headers[chunk_bytes] = params_pb2.ParamsHeader(
                    not_modified=False, version=self.version,
                    leaves=[params_pb2.LeafSpec(name=l.name, shape=l.shape, dtype=l.dtype,
                                                nbytes=l.nbytes) for l in self.leaves],
                    total_bytes=self.total_bytes, sha256=self.digest, num_chunks=n_chunks,
                    signature_sha256=self.signature, subset=list(self.keys),
                    wire_dtype=self.wire_dtype)
            return h

    def _parts(self, chunk_bytes: int) -> Iterator[memoryview]:
        for a, b in self.ranges:
            for s in range(a, b, chunk_bytes):
                yield self.payload[s:min(b, s + chunk_bytes)]

    def messages(self, chunk_bytes: int, memo: bool) -> Iterator[Tuple[bytes, int]]:
        """(serialised ParamsChunk{data}, payload bytes in it) in stream order. memo=True keeps
        them for the next stream of this version (built once, under the lock, by the first)."""
        if memo:
            with self._lock:
                enc = self._encoded.get(chunk_bytes)
                if enc is None:
                    enc = self._encoded[chunk_bytes] = tuple(
                        (_encode_data(p), p.nbytes) for p in self._parts(chunk_bytes))
            yield from enc
        else:
            for p in self._parts(chunk_bytes):
                yield _encode_data(p), p.nbytes


@dataclass
class _Snapshot:
    """One published version; never mutated after construction except for memo caches."""
    version: int
    leaves: Tuple[_Leaf, ...]
    keys: Tuple[str, ...]                           # top-level keys, payload order
    payload: memoryview                             # read-only
    published_unix_s: float
    _views: Dict[Tuple[Tuple[str, ...], str], _View] = field(default_factory=dict)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock)
    _build_lock: threading.Lock = field(default_factory=threading.Lock)
    _extra_bytes: int = 0                           # held by memoised copies
    _reserved: Dict[Tuple[int, int], bool] = field(default_factory=dict)

    def reserve(self, view: "_View", what: int, nbytes: int) -> bool:
        """Whether `view` may keep a copy of `nbytes` (`what`: 0 = bf16 payload, else the chunk
        size of serialised messages): memoised copies stay within _MAX_EXTRA x the payload, so
        that requests for many subsets cannot make the server hold many copies."""
        with self._memo_lock:
            key = (id(view), what)
            if key not in self._reserved:
                ok = self._extra_bytes + nbytes <= _MAX_EXTRA * self.total_bytes
                self._reserved[key] = ok
                self._extra_bytes += nbytes if ok else 0
            return self._reserved[key]

    @property
    def total_bytes(self) -> int:
        return self.payload.nbytes

    def _resolve(self, keys: Tuple[str, ...]) -> Tuple[str, ...]:
        """The requested top-level keys in payload order; () means all."""
        wanted = set(keys or self.keys)
        return tuple(k for k in self.keys if k in wanted)

    def view(self, keys: Tuple[str, ...], wire_dtype: str = "") -> _View:
        """The _View of a subset and wire dtype; memoised (at most _MAX_VIEWS per version) so
        that each is converted and hashed once per version, however many clients fetch it."""
        keys = self._resolve(keys)
        with self._memo_lock:
            v = self._views.get((keys, wire_dtype))
        if v is not None:
            return v
        with self._build_lock:     # concurrent first fetches build it once; the rest wait
            with self._memo_lock:
                v = self._views.get((keys, wire_dtype))
            if v is None:
                v = self._build_view(keys, wire_dtype)
                extra = v.payload.nbytes if v.payload is not self.payload else 0
                with self._memo_lock:
                    keep = len(self._views) < _MAX_VIEWS
                if keep and (not extra or self.reserve(v, 0, extra)):
                    v.memoised = True
                    with self._memo_lock:
                        self._views[(keys, wire_dtype)] = v
            return v

    def _build_view(self, keys: Tuple[str, ...], wire_dtype: str) -> _View:
        wanted = set(keys)
        leaves = tuple(l for l in self.leaves if l.key in wanted)
        if wire_dtype == _BF16:
            return self._bf16_view(leaves, keys)
        ranges: List[List[int]] = []
        for l in leaves:
            if ranges and ranges[-1][1] == l.offset:
                ranges[-1][1] += l.nbytes
            elif l.nbytes:
                ranges.append([l.offset, l.offset + l.nbytes])
        h = hashlib.sha256()
        for a, b in ranges:
            h.update(self.payload[a:b])
        return _View(leaves, leaves, self.payload, tuple(map(tuple, ranges)), h.digest(), "",
                     self.version, keys)

    def _bf16_view(self, leaves: Tuple[_Leaf, ...], keys: Tuple[str, ...]) -> _View:
        """float32 leaves rounded to bfloat16 (nearest even) into a new contiguous payload."""
        bf16 = _np_dtype(_BF16)
        wire, off = [], 0
        for l in leaves:
            conv = l.dtype == "float32"
            nbytes = l.nbytes // 2 if conv else l.nbytes
            wire.append(_Leaf(l.name, l.key, l.shape, _BF16 if conv else l.dtype, off, nbytes))
            off += nbytes
        buf = np.empty(off, np.uint8)
        h = hashlib.sha256()
        for l, w in zip(leaves, wire):
            if not w.nbytes:
                continue
            src = np.frombuffer(self.payload, np.uint8, l.nbytes, l.offset)
            dst = buf[w.offset:w.offset + w.nbytes]
            if w.dtype == l.dtype:
                dst[:] = src
            else:
                np.copyto(dst.view(bf16), src.view(np.float32), casting="unsafe")
            h.update(dst)
        buf.flags.writeable = False
        return _View(leaves, tuple(wire), memoryview(buf), ((0, off),) if off else (),
                     h.digest(), _BF16, self.version, keys)


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
    return snap


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        kw = dict(registry=registry)
        self.version = Gauge("crl_params_version",
                             "Latest published params version (-1: none yet)", **kw)
        self.version.set(-1)
        self.publish_latency = Histogram(
            "crl_params_publish_latency_seconds",
            "Time to serialise and swap in one params version (each subset is checksummed "
            "once, at its first fetch)",
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
        self.refused_streams = Counter(
            "crl_params_refused_streams_total",
            "GetParams streams refused: the client or the server held too many", **kw)
        self.expired_streams = Counter(
            "crl_params_expired_streams_total",
            "GetParams streams cancelled at their send deadline (a client stopped reading)", **kw)


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


def _serialize_chunk(msg: Union[bytes, params_pb2.ParamsChunk]) -> bytes:
    return msg if type(msg) is bytes else msg.SerializeToString()


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
        if req.wire_dtype not in WIRE_DTYPES:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"wire_dtype = {req.wire_dtype[:80]!r}: must be '' (as published) or "
                         f"{_BF16!r}", "invalid_argument")
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
        view = snap.view(keys, req.wire_dtype)
        header = view.header(chunk)
        if req.expected_leaves:
            expected = [(l.name, tuple(l.shape), l.dtype) for l in req.expected_leaves]
            d = first_difference(view.published_specs, expected)
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
        with self._s._gate.stream(context):
            yield from self._payload(req, snap, view, header, chunk, state)

    def _payload(self, req, snap, view, header, chunk,
                 state: "_RequestState") -> Iterator[params_pb2.ParamsChunk]:
        yield params_pb2.ParamsChunk(header=header)
        # Data messages are serialised once per version and chunk size (the server's own size,
        # which clients with the same max_message_mb ask for) and handed to gRPC as bytes.
        sent = self._s._metrics.sent_bytes
        memo = chunk == self._s._chunk_bytes and view.memoised and \
            snap.reserve(view, chunk, view.total_bytes)
        for msg, n in view.messages(chunk, memo=memo):
            yield msg
            sent.inc(n)
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


class _StreamGate:
    """What one client can hold of the server's RPC threads (a GetParams stream holds one until
    its last chunk is read; 70 slow, unread streams once pinned them all and Health timed out
    for everyone):

      - at most `per_peer` streams per connection (gRPC peer), and at most `max_workers -
        HEALTH_RESERVE` in all: a stream beyond either is refused at once with
        RESOURCE_EXHAUSTED (clients poll again; every actor already does), so threads stay free
        for Health and for "not modified" answers;
      - every stream has a send deadline, `deadline_s`: one still running then (a client that
        stopped reading) is cancelled, freeing its thread.
    """
    HEALTH_RESERVE = 4

    def __init__(self, max_workers: int, per_peer: int, deadline_s: float, metrics):
        self.capacity = max(1, max_workers - self.HEALTH_RESERVE)
        self.per_peer, self.deadline_s, self._metrics = per_peer, deadline_s, metrics
        self._lock = threading.Lock()
        self._total = 0
        self._by_peer: Dict[str, int] = {}

    @contextlib.contextmanager
    def stream(self, context):
        peer = context.peer() or "?"
        with self._lock:
            held = self._by_peer.get(peer, 0)
            if held >= self.per_peer or self._total >= self.capacity:
                which = (f"{held} streams of this client (limit {self.per_peer})"
                         if held >= self.per_peer else
                         f"{self._total} streams in flight (limit {self.capacity})")
                refused = True
            else:
                refused = False
                self._by_peer[peer] = held + 1
                self._total += 1
        if refused:
            self._metrics.refused_streams.inc()
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"too many params streams: {which}; read the streams you hold, or "
                         "retry later", "resource_exhausted")
        timer = threading.Timer(self.deadline_s, self._expire, (context,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            with self._lock:
                self._total -= 1
                left = self._by_peer[peer] - 1
                if left:
                    self._by_peer[peer] = left
                else:
                    del self._by_peer[peer]

    def _expire(self, context) -> None:
        if context.is_active():
            self._metrics.expired_streams.inc()
            context.cancel()


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
    `max_workers`: RPC threads. A GetParams stream holds one for its duration; at most
    `max_workers - 4` streams run at once (4 threads stay free for Health and "not modified"
    answers) and at most `streams_per_client` per client connection: a stream beyond either is
    refused with RESOURCE_EXHAUSTED, and one not finished after `stream_deadline_s` (a client
    that stopped reading) is cancelled (_StreamGate). Size max_workers to at least the number
    of actors and evaluators + 4 (service.params_max_workers).
    """

    def __init__(self, address: str, max_message_mb: int = 4, token: Optional[str] = None,
                 registry: CollectorRegistry = REGISTRY, max_workers: int = 64,
                 tls_cert: Optional[bytes] = None, tls_key: Optional[bytes] = None,
                 streams_per_client: int = 4, stream_deadline_s: float = 120.0):
        if not isinstance(max_message_mb, int) or max_message_mb <= 0:
            raise ValueError(f"max_message_mb = {max_message_mb!r}: must be a positive integer")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
            raise ValueError(f"max_workers = {max_workers!r}: must be a positive integer")
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
        self._gate = _StreamGate(max_workers, streams_per_client, stream_deadline_s,
                                 self._metrics)
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
        servicer = _Servicer(self)
        # The generated add_ParameterServiceServicer_to_server, except that GetParams may yield
        # ready-serialised ParamsChunk bytes (same wire format; see _View.messages).
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "crl.params.ParameterService", {
                "GetParams": grpc.unary_stream_rpc_method_handler(
                    servicer.GetParams,
                    request_deserializer=params_pb2.GetParamsRequest.FromString,
                    response_serializer=_serialize_chunk),
                "Health": grpc.unary_unary_rpc_method_handler(
                    servicer.Health, request_deserializer=params_pb2.HealthRequest.FromString,
                    response_serializer=params_pb2.HealthReply.SerializeToString)}),))
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
        greater than every version published before (ValueError otherwise). Serialises once (the
        arrays are copied, so the caller may reuse them; checksums are computed at the first
        fetch of each subset); readers are never blocked by the work, only by the pointer swap.
        Safe to call before `start()`."""
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
            header = params_pb2.ParamsHeader(     # the largest header of this version
                version=version, leaves=[params_pb2.LeafSpec(name=l.name, shape=l.shape,
                                                             dtype=max(l.dtype, _BF16, key=len),
                                                             nbytes=l.nbytes)
                                         for l in snap.leaves],
                total_bytes=snap.total_bytes, sha256=bytes(32),
                num_chunks=math.ceil(snap.total_bytes / self._chunk_bytes),
                signature_sha256="0" * 64, subset=list(snap.keys), wire_dtype=_BF16)
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

    `wire_dtype="bfloat16"`: the server sends float32 leaves rounded to bfloat16 (half the
    bytes) and they come back as bfloat16 arrays; the template is still given (and checked) in
    the published dtypes. A server that predates the option sends float32, which is returned.
    `host_cache`: a private directory (e.g. /dev/shm/crl-params) shared by the clients of one
    host: one of them fetches each version and the others read it from there (_HostCache).
    """

    def __init__(self, address: str, timeout_s: float = 10.0, template: Any = None,
                 token: Optional[str] = None, max_message_mb: int = 4,
                 tls_ca: Optional[bytes] = None, tls_server_name: Optional[str] = None,
                 wire_dtype: Optional[str] = None, host_cache: Optional[str] = None):
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s = {timeout_s!r}: must be > 0")
        if wire_dtype in (None, "", "float32"):
            wire_dtype = ""
        elif wire_dtype != _BF16:
            raise ValueError(f"wire_dtype = {wire_dtype!r}: must be None/'float32' (as "
                             f"published) or {_BF16!r}")
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
        # GetParams with the messages left as bytes: data chunks are read in place (_chunk_data)
        # instead of being parsed and copied twice by protobuf.
        self._get_params = self._channel.unary_stream(
            _METHOD + "GetParams",
            request_serializer=params_pb2.GetParamsRequest.SerializeToString,
            response_deserializer=None)
        self.wire_dtype = wire_dtype
        self._cache = _HostCache(host_cache) if host_cache else None
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
                                          protocol_version=PROTOCOL_VERSION,
                                          wire_dtype=self.wire_dtype)
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
        if self._cache is not None:
            return self._fetch_via_cache(req, expected, timeout)
        got = self._fetch_verified(req, expected, timeout)
        return None if got is None else self._tree(*got, expected)

    def _fetch_verified(self, req, expected, timeout: float):
        """(header, layout, payload buffer) of the next version, size- and sha256-checked; None
        if not modified."""
        call = self._get_params(req, timeout=timeout, metadata=self._metadata)
        try:
            raw = next(call, None)
            first = None if raw is None else _parse_chunk(raw)
            if first is None or first.WhichOneof("kind") != "header":
                raise ParamsIntegrityError("params stream did not start with a header")
            h = first.header
            if h.not_modified:
                if next(call, None) is not None:
                    raise ParamsIntegrityError("'not modified' header followed by data")
                return None
            layout = _layout(h, expected, req.wire_dtype)
            total = h.total_bytes
            # One copy per byte, into the buffer the arrays view; each block is hashed right
            # after it is copied, while it is in cache (the sha256 covers the whole stream, so
            # a corrupt, missing, extra or reordered chunk fails the check below).
            buf = np.empty(total, np.uint8)        # no zero-fill; every byte is written below
            view = memoryview(buf)
            hasher = hashlib.sha256()
            pos = 0
            for raw in call:
                data = _chunk_data(raw)
                n = data.nbytes
                if pos + n > total:
                    raise ParamsIntegrityError(f"params stream longer than {total} bytes")
                for s in range(0, n, _HASH_BLOCK):
                    e = min(n, s + _HASH_BLOCK)
                    dst = view[pos + s:pos + e]
                    dst[:] = data[s:e]
                    hasher.update(dst)
                pos += n
                del data, raw
            if pos != total:
                raise ParamsIntegrityError(f"params stream ended at {pos} of {total} bytes")
            if hasher.digest() != h.sha256:
                raise ParamsIntegrityError(f"params version {h.version}: sha256 mismatch")
        except BaseException:
            call.cancel()
            raise
        return h, layout, buf

    def _fetch_via_cache(self, req, expected, timeout: float) -> Optional[Tuple[int, Any]]:
        """One network fetch per host and version: whoever takes the cache's lock fetches (and
        verifies) it and stores it; the others wait for the file and read it."""
        deadline = time.monotonic() + timeout
        server_version = self.health(timeout_s=timeout)["version"]
        if server_version <= req.min_version:
            return None
        cache = self._cache
        key = cache.key(self.address, tuple(req.subset), req.wire_dtype,
                        req.expected_signature_sha256)
        wait_until = time.monotonic() + timeout / 2
        while True:
            got = self._from_cache(key, server_version, expected, req.wire_dtype)
            if got is not None:
                return got
            lock = cache.try_lock(key)
            if lock is not None:
                try:
                    got = self._from_cache(key, server_version, expected, req.wire_dtype)
                    if got is not None:
                        return got
                    fetched = self._fetch_verified(req, expected,
                                                   max(0.05, deadline - time.monotonic()))
                    if fetched is None:
                        return None
                    cache.store(key, fetched[0], fetched[2])
                    return self._tree(*fetched, expected)
                finally:
                    cache.unlock(lock)
            if time.monotonic() > wait_until:
                # The fetching process is slow or stuck: fetch for ourselves.
                got = self._fetch_verified(req, expected, max(0.05, deadline - time.monotonic()))
                return None if got is None else self._tree(*got, expected)
            time.sleep(0.01)

    def _from_cache(self, key: str, min_version: int, expected, wire_dtype: str):
        """The cached params if they are of version >= min_version and pass the same header
        checks as a stream; else None."""
        hit = self._cache.load(key, min_version)
        if hit is None:
            return None
        h, buf = hit
        try:
            layout = _layout(h, expected, wire_dtype)
        except (ParamsIntegrityError, ParamsMismatchError):
            return None       # a stale or foreign entry: fetch over the network instead
        return self._tree(h, layout, buf, expected)

    def _tree(self, h, layout, buf: np.ndarray, expected) -> Tuple[int, Any]:
        specs, dtypes, offsets = layout
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


def _layout(h: params_pb2.ParamsHeader, expected, wire_dtype: str):
    """(specs, numpy dtypes, payload offsets) of a params header, after checking it against the
    template (ParamsMismatchError) and for consistency (ParamsIntegrityError)."""
    if h.wire_dtype not in ("", wire_dtype):
        raise ParamsIntegrityError(f"params header has wire_dtype {h.wire_dtype!r}; requested "
                                   f"{wire_dtype!r}")
    specs = [(l.name, tuple(int(d) for d in l.shape), l.dtype) for l in h.leaves]
    if expected is not None:
        want = expected[0]
        if h.wire_dtype == _BF16:     # float32 leaves arrive as bfloat16
            want = [(n, s, _BF16 if d == "float32" else d) for n, s, d in want]
        d = first_difference(specs, want)
        if d is not None:
            raise _mismatch_error(d, _mismatch_message(d, h.version))
    dtypes = [_np_dtype(l.dtype) for l in h.leaves]
    offsets, off = [], 0
    for l, (name, shape, _), dt in zip(h.leaves, specs, dtypes):
        want_bytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if l.nbytes != want_bytes:
            raise ParamsIntegrityError(f"leaf {name!r}: header says {l.nbytes} bytes, "
                                       f"shape {shape} {dt.name} needs {want_bytes}")
        offsets.append(off)
        off += want_bytes
    if off != h.total_bytes:
        raise ParamsIntegrityError(f"header total_bytes {h.total_bytes} != sum of leaves {off}")
    return specs, dtypes, offsets


class _HostCache:
    """Params shared by the processes of one host (actors on one machine): one network fetch
    per version, subset and wire dtype, instead of one per process.

    The process that takes an entry's lock (flock, released by the kernel if it dies) fetches
    the version over gRPC, checks its size and sha256 as usual, writes the header and payload to
    a temporary file in `directory` and renames it over the entry, so readers see a whole file or
    the previous one. The others read the file (one copy) instead of streaming and hashing it:
    the sha256 is verified once per host, at the network boundary, and the directory must be
    private (owned by this user, no group/other write), as the processes' own memory is.
    Readers still check the header against their template and the file's size, and map the
    file copy-on-write (their arrays are writable and private, and cost no copy: the 16 actors
    of a host share one copy of the params in memory).
    """

    MAGIC = b"CRLPARAMS\x01\n\x00"         # 12 bytes; then u32 header length, then the header
    ALIGN = 64

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ValueError(f"params host cache {directory!r}: must be a directory owned by "
                             "this user and not writable by group or others")
        self.directory = directory
        self.stores_failed = 0

    def key(self, address: str, subset: Tuple[str, ...], wire_dtype: str, signature: str) -> str:
        ident = json.dumps([PROTOCOL_VERSION, address, list(subset), wire_dtype, signature])
        return hashlib.sha256(ident.encode()).hexdigest()[:40]

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}.{suffix}")

    def try_lock(self, key: str) -> Optional[int]:
        import fcntl
        fd = os.open(self._path(key, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)                       # closing releases the flock

    def load(self, key: str, min_version: int):
        """(header, payload) of the entry if its version >= min_version and the file is whole;
        else None."""
        import mmap
        import struct
        try:
            f = open(self._path(key, "params"), "rb")
        except FileNotFoundError:
            return None
        with f:
            try:
                pre = f.read(len(self.MAGIC) + 4)
                if len(pre) != len(self.MAGIC) + 4 or not pre.startswith(self.MAGIC):
                    return None
                (n,) = struct.unpack("<I", pre[len(self.MAGIC):])
                h = params_pb2.ParamsHeader.FromString(f.read(n))
                if h.not_modified or h.version < min_version:
                    return None
                start = self._payload_offset(n)
                size = os.fstat(f.fileno()).st_size
                if size != start + h.total_bytes:
                    return None
                # Copy-on-write: no copy and no new memory until the caller writes to an array;
                # writes stay private to this process. The entry is never changed in place
                # (a new version is a new file renamed over it), so the mapping stays valid.
                m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, DecodeError, struct.error):
                return None
        return h, np.frombuffer(m, np.uint8, count=h.total_bytes, offset=start)

    def _payload_offset(self, header_len: int) -> int:
        n = len(self.MAGIC) + 4 + header_len
        return -(-n // self.ALIGN) * self.ALIGN

    def store(self, key: str, header: params_pb2.ParamsHeader, buf: np.ndarray) -> bool:
        """Writes the entry (caller holds the lock). A failure (e.g. a full /dev/shm) is logged
        and leaves the previous entry; readers then fetch over the network."""
        import glob
        import logging
        import struct
        final = self._path(key, "params")
        for stale in glob.glob(glob.escape(final) + ".tmp.*"):   # from writers that died
            try:
                os.unlink(stale)
            except OSError:
                pass
        tmp = f"{final}.tmp.{os.getpid()}"
        raw = header.SerializeToString()
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(self.MAGIC + struct.pack("<I", len(raw)) + raw)
                f.write(b"\x00" * (self._payload_offset(len(raw)) - f.tell()))
                f.write(memoryview(buf))
            os.replace(tmp, final)
            return True
        except OSError as e:
            self.stores_failed += 1
            logging.getLogger(__name__).warning(
                "params host cache %s: cannot store version %d (%s); fetching over the network",
                self.directory, header.version, e.strerror or e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False


def _parse_chunk(raw: bytes) -> params_pb2.ParamsChunk:
    try:
        return params_pb2.ParamsChunk.FromString(raw)
    except DecodeError as e:
        raise ParamsIntegrityError(f"malformed message in params stream: {e}") from None


def _chunk_data(raw: bytes) -> memoryview:
    """The payload bytes of a serialised ParamsChunk that holds data, without copying them.

    The fast path reads the one encoding the server writes (tag, varint length, bytes, nothing
    else); anything else goes through the protobuf parser, so every valid encoding is read
    alike. A header here is a protocol error."""
    if raw[:1] == _DATA_TAG:
        n = shift = 0
        for p in range(1, min(len(raw), 11)):
            b = raw[p]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if p + 1 + n == len(raw):
                    return memoryview(raw)[p + 1:]
                break
    msg = _parse_chunk(raw)
    if msg.WhichOneof("kind") != "data":
        raise ParamsIntegrityError("unexpected second header in params stream")
    return memoryview(msg.data)


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


def read_secret_file(what: str, path: str, error=None) -> bytes:
    """The bytes of a certificate, key or token file; `error` (default ConfigError) naming
    `what` (e.g. "service.tls_cert = '/p'") if it cannot be read or is empty."""
    if error is None:
        from crl.config import ConfigError as error
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{what}: cannot read it ({e.strerror or e})") from None
    if not data.strip():
        raise error(f"{what}: the file is empty")
    return data


def _read_file(field_name: str, path: str) -> bytes:
    return read_secret_file(f"{field_name} = {path!r}", path)


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
                           tls_ca=sec.tls_ca, tls_server_name=sec.tls_server_name,
                           wire_dtype=cfg.service.params_wire_dtype,
                           host_cache=cfg.service.params_host_cache or None)


def server_from_config(cfg, bind: str, security: Optional[Security] = None,
                       registry: CollectorRegistry = REGISTRY) -> ParameterServer:
    """A (not started) ParameterServer on `bind` with the config's TLS and token."""
    sec = security if security is not None else security_from_config(cfg.service, server=True)
    return ParameterServer(bind, max_message_mb=cfg.service.max_message_mb, token=sec.token,
                           registry=registry, tls_cert=sec.tls_cert, tls_key=sec.tls_key,
                           max_workers=cfg.service.params_max_workers)
