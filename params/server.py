"""ParameterServer: serves the newest published version (see params/__init__.py).
"""
from __future__ import annotations

import contextlib
import hmac
import json
import math
import threading
import time
import weakref
from concurrent import futures
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import grpc
import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from params.wire import (
    _AUTH_KEY,
    _BF16,
    _MIN_CHUNK_BYTES,
    _MISMATCH_KEY,
    _MSG_MARGIN,
    ALL,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    MiB,
    _check_subset,
    _mismatch_message,
    _serialize,
    _Snapshot,
    check_token,
    first_difference,
)
from protos import params_pb2, params_pb2_grpc

# The standard gRPC health service (grpc.health.v1) beside the project's Health RPC: "" answers
# SERVING while the server runs (liveness); SERVICE_NAME answers SERVING once a version is
# published (readiness). No token needed, like Health. Kubernetes' native `grpc:` probes and
# grpc_health_probe speak it.
SERVICE_NAME = "crl.params.ParameterService"


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        kw = dict(registry=registry)
        self.version = Gauge("crl_params_version",
                             "Latest published params version (-1: none yet)", **kw)
        self.version.set(-1)
        self.publish_duration = Histogram(
            "crl_params_publish_duration_seconds",
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
        self.request_duration = Histogram(
            "crl_params_request_duration_seconds", "ParameterService request duration",
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
            self._s._metrics.request_duration.labels("GetParams").observe(time.monotonic() - t0)

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
        self._s._metrics.request_duration.labels("Health").observe(time.monotonic() - t0)
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
        self._health = None              # grpc_health.v1 HealthServicer while started
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
            SERVICE_NAME, {
                "GetParams": grpc.unary_stream_rpc_method_handler(
                    servicer.GetParams,
                    request_deserializer=params_pb2.GetParamsRequest.FromString,
                    response_serializer=_serialize_chunk),
                "Health": grpc.unary_unary_rpc_method_handler(
                    servicer.Health, request_deserializer=params_pb2.HealthRequest.FromString,
                    response_serializer=params_pb2.HealthReply.SerializeToString)}),))
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self._health = health.HealthServicer()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING
                         if self._current() is not None
                         else health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
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
        if self._health is not None:
            self._health.enter_graceful_shutdown()     # every service: NOT_SERVING
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
        m.publish_duration.observe(time.perf_counter() - t0)
        if self._health is not None and self._serving:
            from grpc_health.v1 import health_pb2
            self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
