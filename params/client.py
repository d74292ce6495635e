"""ParameterClient: fetches, verifies and rebuilds params (see params/__init__.py).
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import grpc
import grpc.experimental
import jax
import numpy as np

from params.host_cache import _HostCache
from params.wire import (
    _AUTH_KEY,
    _BF16,
    _HASH_BLOCK,
    _METHOD,
    _MSG_MARGIN,
    PROTOCOL_VERSION,
    MiB,
    ParamsIntegrityError,
    ParamsMismatchError,
    Spec,
    Subset,
    _chunk_data,
    _mismatch_detail,
    _mismatch_error,
    _mismatch_message,
    _np_dtype,
    _parse_chunk,
    check_token,
    first_difference,
    flatten,
    normalize_subset,
    signature_hash,
    specs_of,
    unflatten,
)
from protos import params_pb2, params_pb2_grpc

# ---------------------------------------------------------------------------------------------
# Client side.

# Causes gRPC reports inside UNAVAILABLE's details, and what each means for this service.
_TRANSPORT_CAUSES = (
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the server's certificate failed verification against "
                                  "the trusted CA (service.tls_ca: wrong CA, or expired)"),
    ("is not in peer certificate", "TLS: the server's certificate does not hold the name "
                                   "checked (set service.tls_server_name to a name it holds)"),
    ("WRONG_VERSION_NUMBER", "TLS handshake failed: the server does not speak TLS (is "
                             "service.tls_cert set on the learner?)"),
    ("Ssl handshake failed", "TLS handshake failed ({details})"),
    ("Connection refused", "nothing listens there (learner down or restarting)"),
    ("Socket closed", "the server closed the connection (if the learner serves TLS, this "
                      "plaintext client must trust it: set service.tls_ca)"),
    ("DNS resolution failed", "the host name does not resolve"),
)


def describe_error(e: BaseException, address: str, timeout_s: Optional[float] = None,
                   tls: bool = False) -> str:
    """One line for a failed params call: the status code's name, then its cause (a TLS failure
    names the certificate problem, UNAVAILABLE names the address). Never holds the token."""
    if isinstance(e, (ParamsMismatchError, ParamsIntegrityError)):
        return f"{type(e).__name__}: {e}"
    if not isinstance(e, grpc.RpcError) or not callable(getattr(e, "code", None)):
        return f"{type(e).__name__}: {e} (params server at {address})"
    code = e.code()
    details = (e.details() or "") if callable(getattr(e, "details", None)) else ""
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        cause = next((why for marker, why in _TRANSPORT_CAUSES if marker in details), None)
        if cause is not None and "Socket closed" in details and tls:
            cause = "the server closed the connection"
        return (f"{name}: params server at {address} unreachable: "
                f"{(cause or '{details}').format(details=details)}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout_s:g} s" if timeout_s else ""
        return f"{name}: no answer from the params server at {address}{within}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"{name}: the params server at {address} refused the token (missing or wrong: "
                "service.token_file / service.token_env must hold the learner's token)")
    if code == grpc.StatusCode.CANCELLED:
        return f"{name}: the call to {address} was cancelled (client closed)"
    return f"{name}: {details} (params server at {address})"

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
        # SingleThreadedUnaryStream: GetParams streams are read on the calling thread. With
        # gRPC's default (a channel thread) a GetParams on a channel whose server had stopped or
        # died hung past its deadline, and past cancel(), for good (seen in and across
        # processes with grpcio 1.62; tests/test_params_follower.py); with it the call fails at
        # once with UNAVAILABLE. Measured no slower: 70M params to 1 client on loopback, 2.5 s
        # against 3.4 s with the default (2 loaded cores, benchmarks/params.py).
        options = [("grpc.max_send_message_length", limit),
                   ("grpc.max_receive_message_length", limit),
                   (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
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

    @property
    def template(self) -> Any:
        """The pytree of shapes/dtypes every payload is checked against (None: unchecked)."""
        return self._template

    def describe(self, e: BaseException) -> str:
        """describe_error for this client's address, deadline and TLS setting."""
        return describe_error(e, self.address, self.timeout_s, self.tls)

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
        return int(h.version), unflatten([s[0] for s in specs], arrays)

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
        why = f"; last error: {self.describe(last)}" if last is not None else ""
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
