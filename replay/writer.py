"""SegmentWriter: what an actor uses to put trajectory segments into replay.

Write pattern (measured across processes, server in another process, 2 loaded CPU cores): each
env's whole segment is appended as ONE cell per field (arrays [T, ...]) and the item references
that single cell, so an item is exactly the segment with shapes [T, ...] = the table signature.
Chunks hold one segment (max_chunk_length 1), so sampling never ships neighbouring segments.
For T=100, state_dim=29, action_dim=8, 64 envs per write, one writer process: ~7,600 segments/s
(~760k env steps/s), against ~370 segments/s (37k env steps/s) for the per-step pattern
(T appends per segment, item = history[-T:]).

Stream mode (`unroll_length` U < T, the paper's schedule: windows of T = 1,000 steps created every
U = 62 steps): each write brings U new steps of each of N envs. Each env's unroll is appended ONCE
as one cell per field ([U, ...]) to a per-env stream (one TrajectoryWriter, 5 columns per env, one
chunk per cell) and, once an env's stream holds k = ceil(T / U) unrolls, one item per env
references its last k cells (stored [k, U, ...]; the learner's sampler keeps the last T steps,
crl.segments.window_of): consecutive items of an env share k - 1 chunks, so no step is copied
(server memory ~ one copy of every step still referenced; each step sits in k items). The first
item of a stream comes after k unrolls. Measured (T=1000, U=62, ant dims, 32 envs per write,
server in another process, 2 loaded cores; benchmark in docs/design.md): one cell per STEP
(items of 1,000 refs per column) ran ~2,800 env steps/s (CreateItem ~7 ms per item: pybind
converts every ref); one cell per UNROLL ~100x faster. The writer keeps the last k confirmed
unrolls of every env on the host so that after `reconnect()` the fresh stream is primed with them
(appended, no items) and the next item is complete again: nothing is lost to a replay restart but
the unconfirmed unroll, which the caller writes again.

Every write ends with a flush bounded by `timeout_s`: when the rate limiter holds inserts (the
learner is not sampling) or the server is unreachable, `ReplayTimeout` is raised instead of
hanging. The unconfirmed items stay queued in this writer (they are sent first by the next
write/flush); `reconnect()` drops them and builds a fresh client and writer. Note (Reverb): after
a reconnect the old stream may already have delivered some items, so duplicates are possible.

ReconnectingWriter (what actors write through) wraps a SegmentWriter so that it reconnects by
itself: retries with backoff while replay is down, waits in bounded slices while the rate limiter
holds inserts, probes replay when flushes stay held, and gives the last writes of a stopping (or
finished) actor one shared deadline (its docstring).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from replay import TABLE, ReplayError, ReplayTimeout, ReplayUnavailable

log = logging.getLogger("crl.replay.writer")


def _unavailable(e: BaseException) -> bool:
    s = str(e)
    return any(t in s for t in ("navailable", "UNAVAILABLE", "Socket closed", "Connection reset",
                                "failed to connect", "Cancelled", "CANCELLED"))


class SegmentWriter:
    """Writes batches of segments {field: [N, T, ...]} to the replay table, one item per env.

    SegmentWriter(address, cfg_or_spec, timeout_s, state_dim=..., action_dim=...):
      - cfg_or_spec: a crl Config (then state_dim and action_dim are required: they come from the
        env) or a spec dict {field: (shape, dtype)} as returned by crl.segments.segment_spec.
      - timeout_s: bound on every flush and server call (actor.write_timeout_s).
      - unroll_length: None = cfg.unroll_length for a Config, else T. U < T = stream mode (module
        docstring): write() takes unrolls {field: [N, U, ...]} and creates the overlapping items.
    """

    def __init__(self, address: str, cfg_or_spec: Any, timeout_s: float = 30.0, *,
                 state_dim: Optional[int] = None, action_dim: Optional[int] = None,
                 table: str = TABLE, priority: float = 1.0, check_server_signature: bool = True,
                 unroll_length: Optional[int] = None):
        from crl.segments import FIELDS, cells_per_window, segment_spec
        if isinstance(cfg_or_spec, Mapping):
            spec = dict(cfg_or_spec)
        else:
            if state_dim is None or action_dim is None:
                raise ValueError("SegmentWriter(address, cfg, ...) needs state_dim= and "
                                 "action_dim= (from the env)")
            spec = segment_spec(state_dim, action_dim, cfg_or_spec.segment_length)
            if unroll_length is None:
                unroll_length = cfg_or_spec.unroll_length
        if set(spec) != set(FIELDS):
            raise ValueError(f"segment spec fields {sorted(spec)} != {sorted(FIELDS)}")
        self.spec: Dict[str, Tuple[tuple, np.dtype]] = {
            k: (tuple(spec[k][0]), np.dtype(spec[k][1])) for k in FIELDS}
        self.fields = FIELDS
        self.segment_length = T = self.spec["state"][0][0]
        self.unroll_length = U = int(unroll_length or T)
        if not 1 <= U <= T:
            raise ValueError(f"unroll_length = {U}: must be in 1..{T} (the segment length)")
        self.streaming = U < T
        # What write() takes: segments [N, T, ...], or in stream mode unrolls [N, U, ...].
        self.write_spec = {k: ((U,) + shape[1:], dt) for k, (shape, dt) in self.spec.items()}
        self.cells_per_item = cells_per_window(T, U) if self.streaming else 1
        # What the table stores ([k, U, ...] in stream mode), checked against the server.
        self.stored_spec = {k: (tuple(v[0]), np.dtype(v[1])) for k, v in segment_spec(
            self.spec["state"][0][1], self.spec["action"][0][1], T, U).items()}
        self._columns = tuple(sorted(FIELDS))   # the order Reverb flattens the signature in
        # Stream mode: the last k confirmed unrolls (host copies, to prime a fresh stream), the
        # appended but unconfirmed one, and per column the refs of its last k cells.
        self._hist: collections.deque = collections.deque(maxlen=self.cells_per_item)
        self._pending: Optional[Dict[str, np.ndarray]] = None
        self._refs = None
        self.stream_steps = 0             # steps appended to the current stream
        self.address = address
        self.table = table
        self.priority = float(priority)
        self.timeout_s = float(timeout_s)
        self._check_server_signature = check_server_signature
        self._client = None
        self._writer = None
        self._verified = False
        self.segments_written = 0      # confirmed by a successful flush
        self.unconfirmed = 0           # appended to the current stream, not yet confirmed
        self.reconnects = 0
        self.last_flush_s = 0.0
        self._connect()

    # -- connection -----------------------------------------------------------------------------

    def _connect(self) -> None:
        import reverb
        self._client = reverb.Client(self.address)   # lazy: no RPC until used
        self._writer = None
        self._verified = False
        self.unconfirmed = 0
        self._pending = None
        self._refs = None
        self.stream_steps = 0

    def _ensure_writer(self):
        """The TrajectoryWriter, created after the (bounded) server check.

        Reverb's own item validation is off: with it on, creating the writer fetches the table
        signature with NO deadline (hangs forever when the server is unreachable). We validate
        against segment_spec ourselves and compare with the server's signature (bounded) instead.
        """
        if self._writer is None:
            from reverb import pybind, trajectory_writer
            self._verify_server()
            if self.streaming:
                # One cell per env and unroll, one chunk per cell; the last k cells alive.
                self._writer = self._client._client.NewTrajectoryWriter(
                    pybind.ConstantChunkerOptions(max_chunk_length=1,
                                                  num_keep_alive_refs=self.cells_per_item),
                    False)
                self._refs, self.stream_steps = None, 0
            else:
                # One cell per segment, one chunk per cell (see the module docstring).
                self._writer = trajectory_writer.TrajectoryWriter(
                    self._client._client.NewTrajectoryWriter(
                        pybind.ConstantChunkerOptions(max_chunk_length=1, num_keep_alive_refs=1),
                        False))
        return self._writer

    def _verify_server(self) -> None:
        """Checks once per connection that the server's table matches our spec (bounded)."""
        import reverb
        if self._verified:
            return
        try:
            infos = self._client.server_info(max(1, math.ceil(self.timeout_s)))
        except Exception as e:
            if isinstance(e, reverb.errors.DeadlineExceededError) or "eadline" in str(e):
                raise ReplayTimeout(f"replay server at {self.address} did not answer within "
                                    f"{self.timeout_s:g}s") from e
            raise ReplayUnavailable(f"replay server at {self.address} unreachable: {e}") from e
        if self.table not in infos:
            raise ReplayError(f"replay server at {self.address} has no table {self.table!r} "
                              f"(tables: {sorted(infos)})")
        sig = infos[self.table].signature or {}
        for k, (shape, dtype) in (self.stored_spec.items() if self._check_server_signature
                                  else ()):
            if k not in sig or tuple(sig[k].shape) != shape or sig[k].dtype.as_numpy_dtype != dtype:
                got = (f"{tuple(sig[k].shape)} {sig[k].dtype.name}" if k in sig else "absent")
                raise ValueError(
                    f"replay table {self.table!r} at {self.address} expects field {k!r} as {got}, "
                    f"but this writer is set up for {shape} {dtype.name}: actor and replay "
                    "disagree on env dims or segment length")
        self._verified = True

    def reconnect(self) -> None:
        """Drops the current client/writer (and any unconfirmed items) and builds fresh ones.

        Cheap and non-blocking: the server is contacted (bounded) on the next write."""
        old = self._writer
        self._writer = None
        if old is not None:
            try:
                (old.Close if self.streaming else old.close)()   # cancels the stream; does not wait for confirmations
            except Exception:
                pass
        self.reconnects += 1
        self._connect()

    # -- validation -----------------------------------------------------------------------------

    def validate(self, segments: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """Checks {field: [N, T, ...]} ([N, U, ...] in stream mode) against the spec; returns
        numpy arrays.

        Raises ValueError naming the field, the expected and the actual shape/dtype.
        """
        if not isinstance(segments, Mapping):
            raise ValueError(f"segments must be a dict {{field: array}}, got {type(segments).__name__}")
        missing = [k for k in self.fields if k not in segments]
        extra = sorted(k for k in segments if k not in self.spec)
        if missing or extra:
            raise ValueError(f"segment fields mismatch: missing {missing}, unexpected {extra}; "
                             f"expected exactly {list(self.fields)}")
        out, n = {}, None
        for k in self.fields:
            v = np.asarray(segments[k])
            shape, dtype = self.write_spec[k]
            if v.ndim != len(shape) + 1 or tuple(v.shape[1:]) != shape or v.dtype != dtype:
                raise ValueError(
                    f"segment field {k!r}: expected [N, {', '.join(map(str, shape))}] {dtype.name}, "
                    f"got {list(v.shape)} {v.dtype.name}")
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                raise ValueError(f"segment field {k!r}: batch size {v.shape[0]} differs from "
                                 f"{n} (field {self.fields[0]!r})")
            out[k] = v
        return out

    # -- writing --------------------------------------------------------------------------------

    def write(self, segments: Mapping[str, Any]) -> int:
        """Validates, then writes N segments as N items and flushes (bounded by timeout_s).

        Returns N. Raises ValueError (bad shapes/dtypes, nothing written), ReplayTimeout (flush not
        confirmed in time; the items stay queued) or ReplayUnavailable (connection failed).
        """
        data = self.validate(segments)
        n = data[self.fields[0]].shape[0]
        w = self._ensure_writer()
        if self.streaming:
            return self._write_unroll(w, data)
        with self._connection_errors():
            for i in range(n):
                w.append({k: data[k][i] for k in self.fields})
                hist = w.history
                w.create_item(self.table, self.priority, {k: hist[k][-1] for k in self.fields})
                self.unconfirmed += 1
        self.flush()
        return n

    @contextlib.contextmanager
    def _connection_errors(self):
        """A connection failure inside the block raises ReplayUnavailable (ReplayError and any
        other error pass unchanged)."""
        try:
            yield
        except ReplayError:
            raise
        except Exception as e:
            if _unavailable(e):
                raise ReplayUnavailable(f"replay server at {self.address}: {e}") from e
            raise

    def _append_unroll(self, w, data: Dict[str, np.ndarray]) -> None:
        """Appends one unroll {field: [N, U, ...]}: one cell per env and field."""
        cols = self._columns
        n = data[cols[0]].shape[0]
        if self._refs is None:
            self._refs = [collections.deque(maxlen=self.cells_per_item)
                          for _ in range(n * len(cols))]
        fields = [data[k] for k in cols]
        cells = [f[e] for e in range(n) for f in fields]   # env-major, fields in sorted order
        for q, r in zip(self._refs, w.Append(cells)):
            q.append(r)
        self.stream_steps += self.unroll_length

    def _write_unroll(self, w, data: Dict[str, np.ndarray]) -> int:
        """Stream mode: appends one unroll, one item per env once its stream holds k unrolls."""
        ncol = len(self._columns)
        n = data[self.fields[0]].shape[0]
        if self._hist and self._hist[0][self.fields[0]].shape[0] != n:
            raise ValueError(f"stream mode: {n} envs in this write, "
                             f"{self._hist[0][self.fields[0]].shape[0]} before (one stream per env)")
        items = 0
        with self._connection_errors():
            if self.stream_steps == 0:
                for old in self._hist:     # a fresh stream: prime it with the last k unrolls
                    self._append_unroll(w, old)
            self._append_unroll(w, data)
            self._pending = data
            if len(self._refs[0]) == self.cells_per_item:
                squeeze = [False] * ncol
                for e in range(n):
                    w.CreateItem(self.table, self.priority,
                                 [list(self._refs[e * ncol + c]) for c in range(ncol)], squeeze)
                    self.unconfirmed += 1
                    items += 1
        self.flush()
        return items

    def _confirmed(self) -> None:
        """Stream mode: the pending unroll is confirmed: keep it to prime a fresh stream."""
        if self._pending is not None:
            self._hist.append(self._pending)
            self._pending = None

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Waits (bounded) until every queued item is confirmed by the server.

        On success `unconfirmed` drops to 0 (and `segments_written` grows by as much); on
        ReplayTimeout the items stay queued and `unconfirmed` says how many."""
        import reverb
        t = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        if self._writer is None:
            return
        try:
            if self.streaming:
                try:
                    self._writer.Flush(0, max(1, int(t * 1000)))
                except RuntimeError as e:
                    if "Timeout exceeded" in str(e):
                        raise reverb.errors.DeadlineExceededError(str(e)) from e
                    raise
            else:
                self._writer.flush(timeout_ms=max(1, int(t * 1000)))
            self.segments_written += self.unconfirmed
            self.unconfirmed = 0
            self._confirmed()
        except reverb.errors.DeadlineExceededError as e:
            raise ReplayTimeout(
                f"replay write to {self.address} not confirmed within {t:g}s (rate limiter holding "
                "inserts because the learner is not sampling, or the server is unreachable); the "
                "items stay queued: write/flush again, or reconnect() to drop them") from e
        except Exception as e:
            if _unavailable(e):
                raise ReplayUnavailable(f"replay server at {self.address}: {e}") from e
            raise
        finally:
            self.last_flush_s = time.monotonic() - t0

    def close(self) -> None:
        """Closes the writer without waiting (flush first to be sure everything landed)."""
        if self._writer is not None:
            try:
                (self._writer.Close if self.streaming else self._writer.close)()
            except Exception:
                pass
            self._writer = None
        self.unconfirmed = 0
        self._pending = None
        self._refs, self.stream_steps = None, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Reconnecting by itself: what an actor writes through.

FLUSH_SLICE_S = 2.0      # longest single flush wait (stop responsiveness)
PROBE_AFTER_S = 4.0      # flushes held this long: ask replay (1 s bound) whether it is up at all
FINAL_FLUSH_S = 10.0     # after a stop request: how long the remaining writes may still take


def replay_answers(address: str, timeout_s: int = 1) -> bool:
    """True if replay answers a server-info call within timeout_s."""
    import reverb
    try:
        reverb.Client(address).server_info(timeout_s)
        return True
    except Exception:
        return False


class ReconnectingWriter:
    """A SegmentWriter that survives replay restarts: write() returns once replay confirmed the
    segments, reconnecting by itself (crl.metrics.Backoff) while replay is down.

    ReconnectingWriter(address, cfg, stop, write_timeout_s=..., state_dim=..., action_dim=...)
    (the SegmentWriter arguments, plus `stop`). Each flush waits at most
    min(write_timeout_s, FLUSH_SLICE_S), so a stop request is noticed soon; a flush that timed out
    is retried as a flush (the items stay queued in the writer), never by writing the segments
    again, which would duplicate them. While the rate limiter holds inserts (the learner is
    behind) write() waits, in those slices, logged: that wait is what keeps the update-to-data
    ratio. Held for PROBE_AFTER_S, it asks replay whether it answers at all: Reverb's writer
    reconnects by itself only after its own backoff (~10 s measured), so once replay was seen
    down and answers again, a fresh stream re-sends the unconfirmed segments (in stream mode the
    SegmentWriter primes it with each env's last unrolls, so the next item is whole again).

    write(segments) returns the number of items replay confirmed (>= 0: in stream mode the first
    unrolls of a stream make none). After `stop` is set, or after final_flush() was called, all
    remaining writes share one deadline, final_s (default FINAL_FLUSH_S); a write not confirmed by then returns None (the
    caller counts it as dropped).

    Counters: `reconnects` (fresh streams after replay was unreachable) and `held` (flushes held
    by the rate limiter or an unanswering replay); on_reconnect() / on_held() are called as each
    grows (the actor's metrics).
    """

    def __init__(self, address: str, cfg_or_spec: Any, stop, *, write_timeout_s: float = 30.0,
                 final_s: Optional[float] = None, log=None,
                 on_reconnect: Optional[Callable[[], None]] = None,
                 on_held: Optional[Callable[[], None]] = None, **writer_kwargs):
        from crl.metrics import Backoff
        self.address, self.stop = address, stop
        self.log = log or logging.getLogger("crl.replay.writer")
        self.final_s = float(FINAL_FLUSH_S if final_s is None else final_s)
        self._new_writer = lambda: SegmentWriter(address, cfg_or_spec,
                                                 min(write_timeout_s, FLUSH_SLICE_S),
                                                 **writer_kwargs)
        self.writer: Optional[SegmentWriter] = None
        self.backoff = Backoff()
        self.reconnects = self.held = 0
        self.on_reconnect, self.on_held = on_reconnect, on_held
        self._last_held_log = 0.0
        self._final_deadline: Optional[float] = None

    def final_flush(self) -> None:
        """From now on the remaining writes share final_s (as after a stop request)."""
        if self._final_deadline is None:
            self._final_deadline = time.monotonic() + self.final_s

    def _past_final_deadline(self) -> bool:
        if self.stop.is_set():
            self.final_flush()
        return self._final_deadline is not None and time.monotonic() > self._final_deadline

    def _reconnected(self) -> None:
        self.reconnects += 1
        if self.on_reconnect is not None:
            self.on_reconnect()

    def _drop_stream(self) -> None:
        """Drops the writer's stream; its unconfirmed items are written again on a fresh one."""
        if self.writer is not None:
            try:
                self.writer.reconnect()
            except Exception:
                self.writer = None

    def write(self, segments) -> Optional[int]:
        queued = False   # appended to the writer, waiting for confirmation: retry as a flush
        held_since = None
        last_probe, replay_was_down = 0.0, False
        while not self._past_final_deadline():
            try:
                if self.writer is None:
                    self.writer = self._new_writer()
                if queued:
                    items = self.writer.unconfirmed
                    self.writer.flush()
                else:
                    items = self.writer.write(segments)
                self.backoff.reset()
                return items
            except ReplayTimeout:
                # Appended and not yet confirmed if the writer got past its server check.
                queued = self.writer.unconfirmed > 0
                self.held += 1
                if self.on_held is not None:
                    self.on_held()
                now = time.monotonic()
                held_since = held_since or now
                if now - held_since >= 10.0 and now - self._last_held_log > 30.0:
                    self.log.info("replay has held inserts for %.0fs (learner behind or "
                                  "restarting, or replay busy); still waiting", now - held_since)
                    self._last_held_log = now
                if now - held_since >= PROBE_AFTER_S and now - last_probe >= FLUSH_SLICE_S:
                    last_probe = now
                    up = replay_answers(self.address)
                    if not up and not replay_was_down:
                        self.log.warning("replay at %s does not answer; waiting for it",
                                         self.address)
                    elif up and replay_was_down:
                        self.log.info("replay answers again; reconnecting the writer (queued "
                                      "segments are written again)")
                        self._reconnected()
                        self._drop_stream()
                        queued = False
                    replay_was_down = not up
            except (ReplayUnavailable, ConnectionError, OSError) as e:
                self._reconnected()
                delay = self.backoff.next()
                self.log.warning("replay unavailable (%s); reconnecting in %.1fs", e, delay)
                self._drop_stream()
                queued = False   # unconfirmed items are written again
                if self.stop.is_set() or self._final_deadline is not None:
                    time.sleep(min(delay, 0.5))   # finishing: keep trying until the deadline
                else:
                    self.stop.wait(delay)
        return None

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self.log.warning("closing the writer: %s", e)
        self.writer = None
