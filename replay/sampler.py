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
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from typing import Dict, NamedTuple, Optional

import numpy as np

from crl.segments import window_of
from replay import TABLE, ReplayError, ReplayTimeout, ReplayUnavailable

log = logging.getLogger("crl.replay.sampler")

INFO_FIELDS = ("key", "probability", "table_size", "priority", "times_sampled")


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
                err = ReplayUnavailable(f"replay sampling from {self.address} failed: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                log.warning("%s; retrying in %.1fs", err, backoff)
                if not self._put(err):
                    return
                if self._closed.wait(backoff):
                    return
                backoff = min(2 * backoff, 5.0)

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
