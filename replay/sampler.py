"""SegmentSampler: what the learner uses to draw batches of segments from replay.

    sampler = SegmentSampler("127.0.0.1:18000", batch_segments=32, timeout_s=10.0, prefetch=2)
    batch = next(sampler)          # SampleBatch(data={field: [32, T, ...]}, info={...})
    sampler.close()

Pipeline: reverb.TrajectoryDataset (gRPC streams, worker threads inside TensorFlow's runtime, the
table signature gives shapes/dtypes) -> .batch(batch_segments) -> .prefetch(1), drained by one
background thread into a bounded queue of `prefetch` numpy batches. Every wait is bounded:
- the dataset passes rate_limiter_timeout_ms = timeout_s to the server, so a sample request
  blocked by the rate limiter (learner ahead of the actors, or prefill not done) ends instead of
  waiting forever; the thread then rebuilds the dataset (the partial batch is dropped);
- `next()` waits at most timeout_s on the queue and raises ReplayTimeout (the caller decides:
  retry, log, stop); errors from the pipeline (server gone: ReplayUnavailable) are raised in
  `next()` in order, and the thread keeps retrying with backoff until close().
Items stored as [k, U, ...] (actor.unroll_length < segment_length, crl/segments.py) come out as
the windows [T, ...] (the last T = `segment_length` steps) when segment_length is given.
Samples in flight: the server counts a sample (rate limiter) when it hands it out, not when the
learner trains on it, so everything this pipeline holds is counted ahead of the learner's SGD
steps. One worker with one batch in flight keeps that to (prefetch + 2) batches; Reverb's default
(auto workers, each with `2 x batch` in flight) held up to workers x 2 batches more (issue 11).
TensorFlow is told to leave GPUs alone (the learner's JAX owns them).

Items that do not match the table signature (another dtype or shape, fields missing or extra):
Reverb's server does not check inserts against the signature (only its clients do, and a raw
client can skip that), so such an item fails the dataset's decode ("incompatible tensor"),
without telling which item it was. The sampler then draws item by item through Reverb's
unchecked client sampler (only as many as the rate limiter allows at that moment, as that call
has no deadline), checks every item against the signature, deletes the ones that do not match
(by key: quarantined, counted in crl_replay_client_items_quarantined_total, logged) and keeps
serving the matching ones, until a whole table's worth of draws came back clean; then the fast
dataset resumes. Such an item is bad data, never "replay unavailable".

Counts that never go backwards: Reverb's insert and sample counts drop when a client resets the
table (to 0) or replay restores an older checkpoint. `MonotonicCount` turns the counts read from
the server into counts that continue from the last value seen; `InsertCount` reads a table's
insert count that way (what the learner's env-step count is derived from).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from typing import Dict, List, NamedTuple, Optional

import numpy as np
from prometheus_client import Counter

from crl.segments import window_of
from replay import TABLE, ReplayError, ReplayTimeout, ReplayUnavailable

log = logging.getLogger("crl.replay.sampler")

INFO_FIELDS = ("key", "probability", "table_size", "priority", "times_sampled")

QUARANTINED = Counter("crl_replay_client_items_quarantined",
                      "Sampled replay items deleted because they do not match the table signature")
# How the dataset op reports an item that does not match its signature (reverb/cc/sampler.cc).
_SIGNATURE_ERRORS = ("Received incompatible tensor", "Inconsistent number of tensors")


def is_signature_mismatch(error: BaseException) -> bool:
    """True if `error` is the dataset's report of an item that does not match the signature."""
    return any(m in str(error) for m in _SIGNATURE_ERRORS)


def signature_problem(flat_data, flat_spec) -> Optional[str]:
    """Why one item's flat columns do not match the flat signature [(name, shape, dtype)], or
    None when they match."""
    if len(flat_data) != len(flat_spec):
        return f"{len(flat_data)} fields, the signature has {len(flat_spec)}"
    for col, (name, shape, dtype) in zip(flat_data, flat_spec):
        col = np.asarray(col)
        if col.dtype != dtype or tuple(col.shape) != shape:
            return (f"field {name!r} is {tuple(col.shape)} {col.dtype}, the signature says "
                    f"{shape} {dtype}")
    return None


def delete_items(address: str, table: str, keys, timeout_s: float) -> bool:
    """Deletes items from replay by key; bounded (Reverb's call has no deadline of its own).
    Returns False if the deletion failed or did not finish in time."""
    import reverb
    done = []

    def go():
        try:
            reverb.Client(address).mutate_priorities(table, deletes=[int(k) for k in keys])
            done.append(True)
        except Exception as e:
            log.warning("could not delete %d item(s) from replay: %s", len(keys), e)
    t = threading.Thread(target=go, name="replay-delete", daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(done)


class MonotonicCount:
    """A count read from the server, made to never go backwards: when the server's value drops
    (a client reset the table, or replay restored an older checkpoint) the count stays where it
    was and goes on growing with the server's new increments. `drops` counts the drops seen.
    (Increments between the last read before a drop and the drop are not seen.)"""

    def __init__(self):
        self.value: Optional[int] = None
        self.drops = 0
        self._last_raw: Optional[int] = None

    def update(self, raw: int) -> int:
        raw = int(raw)
        if self._last_raw is None:
            self.value = raw
        elif raw < self._last_raw:
            self.drops += 1
        else:
            self.value += raw - self._last_raw
        self._last_raw = raw
        return self.value


class InsertCount:
    """Items ever inserted into `table` at `address` as far as this reader has seen: Reverb's
    insert count through MonotonicCount, so a reset or an older restore never moves it back
    (the learner's env steps = this x unroll_length). read() returns None when replay does not
    answer within timeout_s, and logs each drop."""

    def __init__(self, address: str, table: str = TABLE, timeout_s: float = 10.0):
        self.address, self.table, self.timeout_s = address, table, timeout_s
        self._count = MonotonicCount()
        self._lock = threading.Lock()   # read by a poller thread and by the learner's loop

    def read(self) -> Optional[int]:
        import reverb
        try:
            info = reverb.Client(self.address).server_info(
                max(1, math.ceil(self.timeout_s)))[self.table]
        except Exception:
            return None
        raw = int(info.rate_limiter_info.insert_stats.completed)
        with self._lock:
            drops = self._count.drops
            value = self._count.update(raw)
            dropped = self._count.drops > drops
        if dropped:
            log.warning("replay's insert count dropped to %d (the table was reset or an older "
                        "checkpoint restored); counting on from %d", raw, value)
        return value


class SampleBatch(NamedTuple):
    data: Dict[str, np.ndarray]   # {field: [batch_segments, T, ...]} (crl.segments.FIELDS)
    info: Dict[str, np.ndarray]   # {key, probability, table_size, priority, times_sampled}: [B]


def _hide_gpus_from_tf() -> None:
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):   # TF already initialised its devices
        pass


class SegmentSampler:
    """Iterator of SampleBatch from table `table` at `address` (see the module docstring)."""

    def __init__(self, address: str, batch_segments: int, timeout_s: float = 10.0,
                 prefetch: int = 2, *, table: str = TABLE, num_workers: int = 1,
                 max_in_flight_samples_per_worker: Optional[int] = None,
                 segment_length: Optional[int] = None):
        if batch_segments < 1:
            raise ValueError(f"batch_segments = {batch_segments}: must be >= 1")
        if prefetch < 1:
            raise ValueError(f"prefetch = {prefetch}: must be >= 1")
        import reverb
        _hide_gpus_from_tf()
        self.address = address
        self.table = table
        self.batch_segments = int(batch_segments)
        self.timeout_s = float(timeout_s)
        self.prefetch = int(prefetch)
        self._num_workers = num_workers
        self._max_in_flight = max_in_flight_samples_per_worker or self.batch_segments
        self.segment_length = segment_length
        try:
            infos = reverb.Client(address).server_info(max(1, math.ceil(self.timeout_s)))
        except Exception as e:
            if isinstance(e, reverb.errors.DeadlineExceededError) or "eadline" in str(e):
                raise ReplayTimeout(f"replay server at {address} did not answer within "
                                    f"{self.timeout_s:g}s") from e
            raise ReplayUnavailable(f"replay server at {address} unreachable: {e}") from e
        if table not in infos or not infos[table].signature:
            raise ReplayError(f"replay server at {address} has no table {table!r} with a "
                              f"signature (tables: {sorted(infos)})")
        self.signature = infos[table].signature
        import tree
        names = tree.flatten({k: k for k in self.signature})   # Reverb's flat column order
        self._flat_spec = [(k, tuple(self.signature[k].shape),
                            np.dtype(self.signature[k].dtype.as_numpy_dtype)) for k in names]
        self._flat_names = names
        self.quarantined = 0          # items deleted because they did not match the signature
        self._checked_draws_left = 0  # draws still to check item by item (module docstring)
        self._checked_rows: List = []
        self._queue: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        self._closed = threading.Event()
        self.batches = 0
        self.rebuilds = 0
        self._thread = threading.Thread(target=self._run, name="replay-sampler", daemon=True)
        self._thread.start()

    # -- background thread ----------------------------------------------------------------------

    def _dataset(self):
        import reverb
        ds = reverb.TrajectoryDataset(
            server_address=self.address, table=self.table,
            dtypes={k: v.dtype for k, v in self.signature.items()},
            shapes={k: v.shape for k, v in self.signature.items()},
            max_in_flight_samples_per_worker=self._max_in_flight,
            num_workers_per_iterator=self._num_workers,
            rate_limiter_timeout_ms=max(1, int(self.timeout_s * 1000)))
        return ds.batch(self.batch_segments, drop_remainder=True).prefetch(1)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        backoff = 0.1
        while not self._closed.is_set():
            try:
                if self._checked_draws_left > 0:
                    batch = self._checked_batch()
                    if batch is not None and not self._put(batch):
                        return
                    continue
                for sample in self._dataset():
                    info = {k: getattr(sample.info, k).numpy() for k in INFO_FIELDS}
                    data = {k: v.numpy() for k, v in sample.data.items()}
                    if self.segment_length:
                        data = window_of(data, self.segment_length)
                    if not self._put(SampleBatch(data, info)):
                        return
                    backoff = 0.1
                # End of sequence: the rate limiter kept samples waiting for timeout_s. The caller
                # already sees ReplayTimeout from the queue; rebuild and keep waiting.
                self.rebuilds += 1
                log.debug("replay sampler: rate limiter timeout, rebuilding the dataset")
            except Exception as e:   # tf.errors.* from the reverb op (server gone, ...)
                if self._closed.is_set():
                    return
                self.rebuilds += 1
                if is_signature_mismatch(e):
                    self._start_checking(e)
                    continue
                err = ReplayUnavailable(f"replay sampling from {self.address} failed: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                log.warning("%s; retrying in %.1fs", err, backoff)
                if not self._put(err):
                    return
                if self._closed.wait(backoff):
                    return
                backoff = min(2 * backoff, 5.0)

    def _start_checking(self, error) -> None:
        import reverb
        try:
            size = reverb.Client(self.address).server_info(
                max(1, math.ceil(self.timeout_s)))[self.table].current_size
        except Exception:   # unreachable now: check one batch, the next mismatch extends it
            size = 0
        self._checked_draws_left = max(int(size), self.batch_segments)
        log.warning("an item in replay does not match the table signature (%s); checking the "
                    "next %d draws item by item", str(error).splitlines()[0][:300],
                    self._checked_draws_left)

    def _samples_allowed(self, client) -> int:
        """How many samples the rate limiter lets through now (Reverb's CanSample)."""
        info = client.server_info(max(1, math.ceil(self.timeout_s)))[self.table]
        rl = info.rate_limiter_info
        if info.current_size < rl.min_size_to_sample:
            return 0
        slack = (rl.insert_stats.completed * rl.samples_per_insert
                 - rl.sample_stats.completed - rl.min_diff)
        return max(0, int(math.floor(slack + 1e-9)))

    def _checked_batch(self) -> Optional[SampleBatch]:
        """Draws through Reverb's unchecked sampler, quarantines items that do not match the
        signature, and returns a batch once batch_segments matching items are collected (None
        while collecting or while the rate limiter holds samples)."""
        import reverb
        client = reverb.Client(self.address)
        want = self.batch_segments - len(self._checked_rows)
        n = min(want, self._samples_allowed(client))
        if n <= 0:   # rate limited: wait a little (the caller's next() times out meanwhile)
            self._closed.wait(min(0.2, self.timeout_s))
            return None
        bad = {}
        for s in client.sample(self.table, num_samples=n, emit_timesteps=False):
            problem = signature_problem(s.data, self._flat_spec)
            if problem is None:
                self._checked_rows.append(s)
            else:
                bad[int(s.info.key)] = problem
        self._checked_draws_left -= n
        if bad:
            self._quarantine(bad)
            self._checked_draws_left = max(self._checked_draws_left, int(s.info.table_size))
        if len(self._checked_rows) < self.batch_segments:
            return None
        rows, self._checked_rows = self._checked_rows, []
        if self._checked_draws_left <= 0:
            log.info("replay sampler: a table's worth of draws matched the signature; back to "
                     "the dataset")
        data = {name: np.stack([np.asarray(r.data[i]) for r in rows])
                for i, name in enumerate(self._flat_names)}
        if self.segment_length:
            data = window_of(data, self.segment_length)
        info = {k: np.array([getattr(r.info, k) for r in rows]) for k in INFO_FIELDS}
        return SampleBatch(data, info)

    def _quarantine(self, bad: Dict[int, str]) -> None:
        deleted = delete_items(self.address, self.table, list(bad), self.timeout_s)
        self.quarantined += len(bad)
        QUARANTINED.inc(len(bad))
        for key, problem in list(bad.items())[:8]:
            log.error("replay item %d does not match the table signature (%s): %s", key,
                      problem, "deleted from replay (quarantined)" if deleted
                      else "NOT deleted (replay did not answer); skipped")

    # -- public ---------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> SampleBatch:
        return self.sample()

    def sample(self, timeout_s: Optional[float] = None) -> SampleBatch:
        """The next batch; waits at most timeout_s (default: the constructor's)."""
        if self._closed.is_set():
            raise ReplayError("sampler is closed")
        t = self.timeout_s if timeout_s is None else timeout_s
        try:
            item = self._queue.get(timeout=t)
        except queue.Empty:
            raise ReplayTimeout(
                f"no batch of {self.batch_segments} segments from {self.address} within {t:g}s "
                "(replay below its prefill size, the rate limiter waiting for actors' inserts, "
                "or the server unreachable)") from None
        if isinstance(item, BaseException):
            raise item
        self.batches += 1
        return item

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Stops the background thread: waits at most timeout_s (default: the sampler's timeout
        + 1 s, enough for a blocked sample request to end); it is a daemon either way."""
        if timeout_s is None:
            timeout_s = self.timeout_s + 1.0
        self._closed.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
