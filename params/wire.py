"""The params wire format, both ways: flattening and leaf specs, signatures, subsets, the
serialised snapshot of a version and its ready-made gRPC messages (_View), chunk decoding.
The format itself is described in params/__init__.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import grpc
import jax
import numpy as np
from google.protobuf.message import DecodeError

from protos import params_pb2

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


def unflatten(names: Sequence[str], leaves: Sequence[Any]) -> Dict[str, Any]:
    """Nested dicts from '/'-joined names: the inverse of `flatten` for trees of dicts (used
    where no template gives the structure)."""
    root: Dict[str, Any] = {}
    for name, leaf in zip(names, leaves):
        node = root
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return root


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
# The shared token (gRPC metadata).

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
