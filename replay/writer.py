"""SegmentWriter: what an actor uses to put trajectory segments into replay.

Write pattern (measured across processes, server in another process, 2 loaded CPU cores): each
env's whole segment is appended as ONE cell per field (arrays [T, ...]) and the item references
that single cell, so an item is exactly the segment with shapes [T, ...] = the table signature.
Chunks hold one segment (max_chunk_length 1), so sampling never ships neighbouring segments.
For T=100, state_dim=29, action_dim=8, 64 envs per write, one writer process: ~7,600 segments/s
(~760k env steps/s), against ~370 segments/s (37k env steps/s) for the per-step pattern
(T appends per segment, item = history[-T:]).

Every write ends with a flush bounded by `timeout_s`: when the rate limiter holds inserts (the
learner is not sampling) or the server is unreachable, `ReplayTimeout` is raised instead of
hanging. The unconfirmed items stay queued in this writer (they are sent first by the next
write/flush); `reconnect()` drops them and builds a fresh client and writer. Note (Reverb): after
a reconnect the old stream may already have delivered some items, so duplicates are possible.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Mapping, Optional, Tuple

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
    """

    def __init__(self, address: str, cfg_or_spec: Any, timeout_s: float = 30.0, *,
                 state_dim: Optional[int] = None, action_dim: Optional[int] = None,
                 table: str = TABLE, priority: float = 1.0, check_server_signature: bool = True):
        from crl.segments import FIELDS, segment_spec
        if isinstance(cfg_or_spec, Mapping):
            spec = dict(cfg_or_spec)
        else:
            if state_dim is None or action_dim is None:
                raise ValueError("SegmentWriter(address, cfg, ...) needs state_dim= and "
                                 "action_dim= (from the env)")
            spec = segment_spec(state_dim, action_dim, cfg_or_spec.segment_length)
        if set(spec) != set(FIELDS):
            raise ValueError(f"segment spec fields {sorted(spec)} != {sorted(FIELDS)}")
        self.spec: Dict[str, Tuple[tuple, np.dtype]] = {
            k: (tuple(spec[k][0]), np.dtype(spec[k][1])) for k in FIELDS}
        self.fields = FIELDS
        self.segment_length = self.spec["state"][0][0]
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

    def _ensure_writer(self):
        """The TrajectoryWriter, created after the (bounded) server check.

        Reverb's own item validation is off: with it on, creating the writer fetches the table
        signature with NO deadline (hangs forever when the server is unreachable). We validate
        against segment_spec ourselves and compare with the server's signature (bounded) instead.
        """
        if self._writer is None:
            from reverb import pybind, trajectory_writer
            self._verify_server()
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
        for k, (shape, dtype) in (self.spec.items() if self._check_server_signature else ()):
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
                old.close()   # cancels the stream; does not wait for confirmations
            except Exception:
                pass
        self.reconnects += 1
        self._connect()

    # -- validation -----------------------------------------------------------------------------

    def validate(self, segments: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """Checks {field: [N, T, ...]} against the segment spec; returns numpy arrays.

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
            shape, dtype = self.spec[k]
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
        try:
            for i in range(n):
                w.append({k: data[k][i] for k in self.fields})
                hist = w.history
                w.create_item(self.table, self.priority, {k: hist[k][-1] for k in self.fields})
                self.unconfirmed += 1
        except ReplayError:
            raise
        except Exception as e:
            if _unavailable(e):
                raise ReplayUnavailable(f"replay server at {self.address}: {e}") from e
            raise
        self.flush()
        return n

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
            self._writer.flush(timeout_ms=max(1, int(t * 1000)))
            self.segments_written += self.unconfirmed
            self.unconfirmed = 0
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
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        self.unconfirmed = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
