"""The replay role: a Reverb server holding trajectory segments, checkpointed, with metrics.

One table, `TABLE` ("segments"): one item = one trajectory window of T = segment_length steps
(crl/segments.py), uniform sampling, FIFO eviction, signature = segment_spec. An actor creates one
item per env every U = unroll_length steps (U = T: disjoint segments; U < T: overlapping windows
sharing chunks, replay/writer.py; stored as [ceil(T / U), U, ...], crl/segments.py), so one item
brings U NEW env steps: the table holds
`capacity_steps // U` items and the prefill is M = ceil(min_size_steps / U) items. (The first
item of each env stream holds T steps but counts U: env steps counted = inserts x U, the actors'
own counters = that + (T - U) per stream.)

Rate limiter (the update-to-data ratio)
---------------------------------------
`SampleToInsertRatio(samples_per_insert=cfg.samples_per_insert, min_size_to_sample=M,
error_buffer=B)` with M = ceil(min_size_steps / U) items. Reverb tracks
diff = samples_per_insert * inserts - samples and lets it move inside [spi*M - B, spi*M + B]:
inserts block when diff would exceed the top, samples block when it would fall below the bottom
(or while fewer than M items are stored). We use

    B = max(2 * max(1, spi),                # Reverb needs B >= max(1, spi); x2 so one insert and
                                            #   one sample always fit (no lock-step)
            segments_per_call,              # one learner call's samples can be served from slack
            min(utd_tolerance * spi * M,    # the tolerance term, capped at one actor write
                spi * num_envs))            #   (num_envs items): see below; a tolerance >= 1
                                            #   is not capped (opens the limiter: benchmarks)

Why it holds the UTD: diff stays in a window of width 2B, so between any two instants
|samples - spi * inserts| <= 2B, and the UTD measured over a window in which W items were
inserted is off by at most 2B / (spi * W), converging to exact over longer windows. Before
(issue 11) B was utd_tolerance * spi * M alone, i.e. 10% of the prefill: with the paper's prefill
(1,000 steps per env) that is 2B = 20% of a prefill's worth of items of play, i.e. the UTD of a
window was only held over windows of twice the prefill (minutes to hours on small machines), and
right after the prefill the actors ran B / spi items ahead before the learner caught up. Now the
window is one learner call or one actor write (num_envs items), whichever is larger, so a
window of W items is within 2 * max(segments_per_call / spi, num_envs) / W: e.g. 2 x 32 envs
writing 62-step unrolls at spi = 1 hold 10% over any window of 640 items (40k env steps).
The learner's own UTD (SGD steps / env steps) additionally lags by the samples its pipeline
holds (prefetched, not yet trained on: replay/sampler.py bounds them). Why it does not deadlock at start:
inserts are free until M items are stored, then may run B / spi items ahead of sampling; samples
start at M items with B samples of credit; a sample always re-opens inserts and an insert always
re-opens samples, so the only waits are the intended ones (actors waiting for the learner to
sample, the learner waiting for data).

Checkpoints
-----------
`reverb.checkpointers.DefaultCheckpointer(checkpoint_dir)`. Reverb (0.14) behaviour, verified:
- On start it restores the newest sub-directory holding a `DONE` file; a checkpoint interrupted
  before `DONE` (e.g. kill -9 mid-save) is skipped, and the previous complete one is still on disk
  because Reverb deletes older checkpoints only after the new `DONE` is written (it keeps 1).
- Reverb keeps only the newest checkpoint: after writing DONE it deletes every other entry of
  checkpoint_dir but the last in NAME order, and names are local-time timestamps (after the clock
  went back, each new checkpoint was deleted right after it was written). So `checkpoint()`
  first moves the checkpoints in checkpoint_dir to `<checkpoint_dir>.previous/` (Reverb then has
  nothing to delete), stamps the new one with a sequence number (SEQUENCE_FILE) and keeps the
  KEEP_PREVIOUS newest previous ones; at start the newest complete checkpoint BY SEQUENCE NUMBER
  is moved back into checkpoint_dir if it is not there, and restored. Put nothing else in that
  directory. (A checkpoint made through Reverb's own checkpoint RPC bypasses this: unstamped, it
  counts as older than any stamped one.)
- Damaged checkpoints: some make `reverb.Server(...)` raise RuntimeError ("corrupted record ..."),
  others load SILENTLY with items missing (a chunks/items file cut to a few bytes or at a record
  boundary). So before starting, ReplayServer verifies the newest complete checkpoint
  (`verify_checkpoint`: decodes all records, item count == inserts - deletes stored with the
  table, every referenced chunk present). A bad one is quarantined (its DONE renamed to
  DONE.corrupt, an error logged, crl_replay_corrupt_checkpoints_total counts it) and the start is
  retried from the next older complete checkpoint (by sequence number) or empty (`on_corrupt_checkpoint="fallback"`,
  the default), or CheckpointError naming the directory is raised (`"error"`). A Reverb load error
  the verification missed is handled the same way.
- The restored table keeps the table options stored IN THE CHECKPOINT (signature, max size, rate
  limiter), not the ones passed in. A checkpoint whose signature differs from this run's
  segment_spec (another env / segment length) is refused with CheckpointError; differing
  capacity or rate-limiter settings are logged as a warning (the checkpoint's settings stay in
  force; the crl_replay_rate_limiter_* gauges show the values actually used).
- A checkpoint blocks inserts and samples while it runs (crl_replay_checkpoint_duration_seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Dict, List, Optional

from replay import TABLE
from replay.sampler import MonotonicCount

log = logging.getLogger("crl.replay")

DONE_FILE = "DONE"
QUARANTINED_DONE_FILE = "DONE.corrupt"


class CheckpointError(RuntimeError):
    """A replay checkpoint cannot be used by this run (corrupt, or made for another env)."""


# ---------------------------------------------------------------------------------------------
# Tables.

def table_signature(state_dim: int, action_dim: int, length: int,
                    unroll_length: Optional[int] = None):
    """{field: tf.TensorSpec} of one item, from crl.segments.segment_spec (the stored layout
    [k, U, ...] when unroll_length < length)."""
    import tensorflow as tf
    from crl.segments import segment_spec
    return {name: tf.TensorSpec(shape, tf.as_dtype(dtype), name=None)
            for name, (shape, dtype)
            in segment_spec(state_dim, action_dim, length, unroll_length).items()}


@dataclasses.dataclass(frozen=True)
class RateLimiterParams:
    samples_per_insert: float
    min_size_to_sample: int      # items
    error_buffer: float          # samples
    min_diff: float
    max_diff: float


def rate_limiter_params(cfg) -> RateLimiterParams:
    """The SampleToInsertRatio parameters for `cfg` (formula in the module docstring)."""
    unroll = cfg.unroll_length
    spi = float(cfg.samples_per_insert)
    min_items = max(1, math.ceil(cfg.replay.min_size_steps / unroll))
    tolerance = cfg.replay.utd_tolerance * spi * min_items
    if cfg.replay.utd_tolerance < 1.0:   # >= 1: the caller opens the limiter on purpose
        tolerance = min(tolerance, spi * cfg.env.num_envs)
    buffer = max(2.0 * max(1.0, spi), float(cfg.learner.segments_per_call), tolerance)
    offset = spi * min_items
    return RateLimiterParams(spi, min_items, buffer, offset - buffer, offset + buffer)


def capacity_items(cfg) -> int:
    """Items held: each brings unroll_length new env steps (module docstring)."""
    return cfg.replay.capacity_steps // cfg.unroll_length


def make_tables(cfg, state_dim: int, action_dim: int) -> list:
    """[the "segments" table] for `cfg` (see the module docstring for the rate limiter)."""
    import reverb
    rl = rate_limiter_params(cfg)
    max_size = capacity_items(cfg)
    if max_size < rl.min_size_to_sample:
        raise ValueError(
            f"replay.capacity_steps = {cfg.replay.capacity_steps} holds {max_size} items of "
            f"{cfg.unroll_length} new steps, fewer than the {rl.min_size_to_sample} items "
            f"replay.min_size_steps = {cfg.replay.min_size_steps} needs before sampling starts: "
            "sampling would never start; raise capacity_steps")
    return [reverb.Table(
        name=TABLE,
        sampler=reverb.selectors.Uniform(),
        remover=reverb.selectors.Fifo(),
        max_size=max_size,
        rate_limiter=reverb.rate_limiters.SampleToInsertRatio(
            samples_per_insert=rl.samples_per_insert,
            min_size_to_sample=rl.min_size_to_sample,
            error_buffer=rl.error_buffer),
        max_times_sampled=0,
        signature=table_signature(state_dim, action_dim, cfg.segment_length, cfg.unroll_length),
    )]


# ---------------------------------------------------------------------------------------------
# Checkpoint directory helpers (Reverb's layout: <dir>/<timestamp>/{DONE, *.tfrecord}).

def complete_checkpoints(checkpoint_dir: str) -> List[str]:
    """Paths of the checkpoints Reverb would consider, oldest first (Reverb's own order)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    paths = sorted(os.path.join(checkpoint_dir, n) for n in os.listdir(checkpoint_dir))
    return [p for p in paths if os.path.isfile(os.path.join(p, DONE_FILE))]


# Reverb names a checkpoint by the local time and, after writing one, deletes every other entry of
# its directory but the last in name order: after the clock went back (a time-zone change) each
# new checkpoint was deleted right after it was written. So ReplayServer.checkpoint() first moves
# the checkpoints there into `<checkpoint_dir>.previous/` (Reverb's directory is then empty and
# deletes nothing), stamps the new one with a sequence number (SEQUENCE_FILE) and keeps the
# KEEP_PREVIOUS newest previous ones by that number: the fallbacks of a corrupt newest one.
SEQUENCE_FILE = "CRL_SEQUENCE"
KEEP_PREVIOUS = 2


def previous_dir(checkpoint_dir: str) -> str:
    return os.path.normpath(checkpoint_dir) + ".previous"


def checkpoint_sequence(path: str) -> int:
    """The sequence number ReplayServer stamped on a checkpoint; -1 if none (written by Reverb's
    own checkpoint RPC or an older version: older than any stamped one)."""
    try:
        with open(os.path.join(path, SEQUENCE_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def ordered_checkpoints(checkpoint_dir: str) -> List[str]:
    """Complete checkpoints in checkpoint_dir and its previous_dir, oldest first by sequence
    number (then by name), never by time."""
    paths = (complete_checkpoints(checkpoint_dir)
             + complete_checkpoints(previous_dir(checkpoint_dir)))
    return sorted(paths, key=lambda p: (checkpoint_sequence(p), os.path.basename(p)))


def _move_into(path: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    dest = os.path.join(directory, os.path.basename(path))
    os.replace(path, dest)
    return dest


def _quarantine(path: str) -> None:
    os.replace(os.path.join(path, DONE_FILE), os.path.join(path, QUARANTINED_DONE_FILE))


def verify_checkpoint(path: str) -> int:
    """Reads a complete Reverb checkpoint and checks it is whole; returns its number of items.

    Needed because Reverb restores some damaged checkpoints silently: a chunks/items file cut
    short at a record boundary (or to a few bytes) loads as fewer items, without an error. Checks:
    the three ZLIB TFRecord files decode (CRCs), the table record exists, the items number
    inserts - deletes of the checkpointed rate limiter, and every chunk an item references exists.
    Raises CheckpointError naming the file and the problem.
    """
    import tensorflow as tf
    from reverb.cc import schema_pb2
    from reverb.cc.checkpointing import checkpoint_pb2

    def records(name, required=True):
        fn = os.path.join(path, name)
        if not os.path.isfile(fn):
            if required:
                raise CheckpointError(f"replay checkpoint file {fn} is missing")
            return []
        try:
            return [r.numpy() for r in tf.data.TFRecordDataset(fn, compression_type="ZLIB")]
        except tf.errors.OpError as e:
            raise CheckpointError(f"replay checkpoint file {fn} is damaged: {e.message}") from None

    try:
        tables = [checkpoint_pb2.PriorityTableCheckpoint.FromString(r)
                  for r in records("tables.tfrecord")]
        if not tables:
            raise CheckpointError(f"replay checkpoint {path} holds no table")
        expected = sum(t.rate_limiter.insert_count - t.rate_limiter.delete_count for t in tables)
        chunk_keys = {schema_pb2.ChunkData.FromString(r).chunk_key
                      for r in records("chunks.tfrecord")}
        items = [i for t in tables for i in t.deprecated_items]
        items += [schema_pb2.PrioritizedItem.FromString(r)
                  for r in records("items.tfrecord", required=False)]
    except CheckpointError:
        raise
    except Exception as e:   # protobuf DecodeError and the like
        raise CheckpointError(f"replay checkpoint {path} does not parse: {e}") from None
    for item in items:
        for col in item.flat_trajectory.columns:
            for sl in col.chunk_slices:
                if sl.chunk_key not in chunk_keys:
                    raise CheckpointError(f"replay checkpoint {path}: item {item.key} references "
                                          f"chunk {sl.chunk_key}, missing from chunks.tfrecord")
    if len(items) != expected:
        raise CheckpointError(f"replay checkpoint {path} holds {len(items)} items but its table "
                              f"record says {expected}: a file was cut short")
    return len(items)


def _spec_str(sig) -> str:
    return "{" + ", ".join(f"{k}: {tuple(v.shape)} {v.dtype.name}" for k, v in sorted(sig.items())) + "}"


# ---------------------------------------------------------------------------------------------
# Metrics.

class _Collector:
    """Prometheus collector over the latest TableInfo snapshot polled by ReplayServer."""

    def __init__(self, server: "ReplayServer"):
        self._s = server

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self._s
        with s._lock:
            info, info_t = s._info, s._info_time
            ck = dict(s._ckpt_stats)
            inserts_total, samples_total = s._inserts.value, s._samples.value
            count_drops = s._inserts.drops
        seg = s.cfg.unroll_length   # NEW env steps per item (= the segment length when U = T)

        def g(name, doc, value):
            m = GaugeMetricFamily(name, doc)
            m.add_metric([], float(value))
            return m

        def c(name, doc, value):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], float(value))
            return m

        fresh = info is not None and time.time() - info_t < max(5.0, 5 * s._poll_s)
        yield g("crl_replay_up", "1 if the last table poll succeeded recently", 1 if fresh else 0)
        yield g("crl_replay_segment_length_env_steps", "env steps per item (segment)",
                s.segment_length)
        yield g("crl_replay_unroll_length_env_steps", "new env steps per item (unroll)", seg)
        yield c("crl_replay_checkpoints", "checkpoints written since start", ck["count"])
        yield c("crl_replay_checkpoint_failures", "checkpoint attempts that failed", ck["failures"])
        yield g("crl_replay_checkpoint_duration_seconds", "duration of the last checkpoint "
                "(inserts and samples block meanwhile)", ck["last_duration"])
        yield g("crl_replay_last_checkpoint_timestamp_seconds", "unix time of the last checkpoint",
                ck["last_time"])
        yield g("crl_replay_restored_items", "items restored from a checkpoint at start",
                s.restored_items)
        yield c("crl_replay_corrupt_checkpoints", "checkpoints found corrupt at start and skipped",
                len(s.corrupt_checkpoints))
        yield c("crl_replay_table_count_drops", "times the table's insert count went back (a "
                "client reset the table); the insert/sample counters continue across them",
                count_drops)
        if info is None:
            return
        yield g("crl_replay_info_age_seconds", "age of the table snapshot below", time.time() - info_t)
        rl = info.rate_limiter_info
        size = info.current_size
        inserts = rl.insert_stats.completed
        samples = rl.sample_stats.completed
        spi = rl.samples_per_insert
        diff = spi * inserts - samples
        yield g("crl_replay_table_size_items", "items (segments) in the table", size)
        yield g("crl_replay_table_size_env_steps", "env steps in the table", size * seg)
        yield g("crl_replay_table_capacity_items", "max items (FIFO eviction beyond)", info.max_size)
        yield g("crl_replay_table_capacity_env_steps", "max env steps", info.max_size * seg)
        yield g("crl_replay_table_unique_sampled_items",
                "items in the table sampled at least once", info.num_unique_samples)
        yield c("crl_replay_inserts", "items inserted (rate limiter count; survives restore; "
                "never goes back, not even after a client's reset)", inserts_total)
        yield c("crl_replay_inserted_env_steps", "env steps inserted", inserts_total * seg)
        yield c("crl_replay_samples", "items sampled (rate limiter count; survives restore; "
                "never goes back)", samples_total)
        yield g("crl_replay_rate_limiter_samples_per_insert", "samples per insert in force", spi)
        yield g("crl_replay_rate_limiter_min_size_to_sample_items", "items before sampling starts",
                rl.min_size_to_sample)
        yield g("crl_replay_rate_limiter_min_diff_samples", "lower bound of diff", rl.min_diff)
        yield g("crl_replay_rate_limiter_max_diff_samples", "upper bound of diff", rl.max_diff)
        yield g("crl_replay_rate_limiter_diff_samples",
                "samples_per_insert * inserts - samples", diff)
        yield g("crl_replay_rate_limiter_inserts_blocked",
                "1 if one more insert would wait for sampling",
                1 if (size + 1 > rl.min_size_to_sample and diff + spi > rl.max_diff) else 0)
        yield g("crl_replay_rate_limiter_samples_blocked",
                "1 if one more sample would wait for inserts",
                1 if (size < rl.min_size_to_sample or diff - 1 < rl.min_diff) else 0)
        wt = info.table_worker_time
        yield c("crl_replay_insert_wait_seconds",
                "table worker time with inserts blocked by the rate limiter (waiting for sampling)",
                wt.waiting_for_sampling_ms / 1000.0)
        yield c("crl_replay_sample_wait_seconds",
                "table worker time with samples blocked by the rate limiter (waiting for inserts)",
                wt.waiting_for_inserts_ms / 1000.0)
        yield c("crl_replay_table_worker_running_seconds", "table worker busy time",
                wt.running_ms / 1000.0)


# ---------------------------------------------------------------------------------------------
# The server.

class ReplayServer:
    """A Reverb server on `port` with the segments table, periodic checkpoints and metrics.

    Starts in the constructor (restoring the newest complete checkpoint in `checkpoint_dir`,
    see the module docstring); `checkpoint()` saves now (also every checkpoint_interval_s, default
    cfg.replay.checkpoint_interval_s, 0 = never); `stop()` saves and shuts down. Metrics are
    served on `metrics_host:metrics_port` when metrics_port is not None (0 = pick a free port).
    The gRPC port (None/0 = pick one) listens on all interfaces (Reverb binds [::]).
    Attributes: port, address, metrics_port, restored_items, restored_from, corrupt_checkpoints,
    checkpoint_stats.
    """

    def __init__(self, cfg, state_dim: int, action_dim: int, port: Optional[int],
                 checkpoint_dir: str, *, metrics_port: Optional[int] = None,
                 metrics_host: str = "127.0.0.1", checkpoint_interval_s: Optional[float] = None,
                 metrics_poll_s: float = 1.0, on_corrupt_checkpoint: str = "fallback",
                 verify_checkpoints: bool = True):
        import reverb
        if on_corrupt_checkpoint not in ("fallback", "error"):
            raise ValueError("on_corrupt_checkpoint must be 'fallback' or 'error', "
                             f"got {on_corrupt_checkpoint!r}")
        self.cfg = cfg
        self.segment_length = cfg.segment_length
        self.checkpoint_dir = os.path.abspath(checkpoint_dir)
        self.checkpoint_interval_s = (cfg.replay.checkpoint_interval_s
                                      if checkpoint_interval_s is None else checkpoint_interval_s)
        self._rpc_timeout_s = cfg.service.rpc_timeout_s
        self._poll_s = metrics_poll_s
        self._lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._stop_event = threading.Event()
        self._stopped = False
        self._info = None
        self._info_time = 0.0
        self._ckpt_stats = {"count": 0, "failures": 0, "last_duration": 0.0, "last_time": 0.0}
        self._inserts, self._samples = MonotonicCount(), MonotonicCount()
        self.corrupt_checkpoints: List[str] = []
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        expected_sig = table_signature(state_dim, action_dim, self.segment_length,
                                       cfg.unroll_length)

        # Start, quarantining corrupt checkpoints (each retry skips one more).
        def bad_checkpoint(path, why, cause=None):
            if on_corrupt_checkpoint == "error":
                raise CheckpointError(
                    f"replay checkpoint {path} cannot be restored ({why}); delete it (or point "
                    "replay.checkpoint_dir elsewhere) to start from the previous checkpoint or "
                    "empty") from cause
            log.error("replay checkpoint %s is corrupt (%s): quarantined (DONE renamed to %s); "
                      "restoring the previous complete checkpoint or starting empty",
                      path, why, QUARANTINED_DONE_FILE)
            _quarantine(path)
            self.corrupt_checkpoints.append(path)

        expected_items = None
        while True:
            self._promote_newest_checkpoint()
            candidates = complete_checkpoints(self.checkpoint_dir)
            if candidates and verify_checkpoints:
                t0 = time.perf_counter()
                try:
                    expected_items = verify_checkpoint(candidates[-1])
                except CheckpointError as e:
                    bad_checkpoint(candidates[-1], str(e), e)
                    continue
                log.info("replay checkpoint %s verified (%d items) in %.2fs", candidates[-1],
                         expected_items, time.perf_counter() - t0)
            tables = make_tables(cfg, state_dim, action_dim)
            try:
                self._server = reverb.Server(
                    tables=tables, port=port or None,
                    checkpointer=reverb.checkpointers.DefaultCheckpointer(self.checkpoint_dir))
                break
            except (RuntimeError, ValueError) as e:
                msg = str(e)
                if "BuildAndStart" in msg:
                    raise RuntimeError(f"replay server could not listen on port {port} (in use by "
                                       f"another process?): {msg}") from e
                if not candidates:
                    raise RuntimeError(f"replay server failed to start on port {port}: {msg}") from e
                bad_checkpoint(candidates[-1], msg, e)
        self.port = self._server.port
        self.address = f"127.0.0.1:{self.port}"
        self._client = reverb.Client(self.address)
        try:
            info = self._client.server_info(self._timeout_int())[TABLE]
        except Exception:
            self._server.stop()
            raise
        self.restored_items = int(info.current_size)
        self.restored_from = candidates[-1] if candidates else None
        self._sequence = max([checkpoint_sequence(p)
                              for p in ordered_checkpoints(self.checkpoint_dir)] + [0])
        self._check_restored(info, expected_sig)
        if expected_items is not None and self.restored_items != expected_items:
            log.warning("replay restored %d items from %s, which holds %d", self.restored_items,
                        self.restored_from, expected_items)
        self._record(info)
        log.info("replay server on port %d (table %r, %d items restored from %s)", self.port, TABLE,
                 self.restored_items, self.restored_from or "nothing")

        self._threads = [threading.Thread(target=self._poll_loop, name="replay-metrics-poll",
                                          daemon=True)]
        if self.checkpoint_interval_s and self.checkpoint_interval_s > 0:
            self._threads.append(threading.Thread(target=self._checkpoint_loop,
                                                  name="replay-checkpoint", daemon=True))
        for t in self._threads:
            t.start()

        self.metrics_port = None
        self._http = None
        if metrics_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(_Collector(self))
            self._http, _ = start_http_server(metrics_port, addr=metrics_host,
                                              registry=self.registry)
            self.metrics_port = self._http.server_port
            log.info("replay metrics on http://%s:%d/metrics", metrics_host, self.metrics_port)

    # -- checks ---------------------------------------------------------------------------------

    def _timeout_int(self) -> int:
        return max(1, math.ceil(self._rpc_timeout_s))

    def _check_restored(self, info, expected_sig) -> None:
        got = info.signature or {}
        same = (set(got) == set(expected_sig) and all(
            tuple(got[k].shape) == tuple(expected_sig[k].shape) and got[k].dtype == expected_sig[k].dtype
            for k in expected_sig))
        if not same:
            self._server.stop()
            raise CheckpointError(
                f"replay checkpoint {self.restored_from} holds table {TABLE!r} with signature "
                f"{_spec_str(got)}, but this run expects {_spec_str(expected_sig)} (env, "
                "state/action dims or segment length changed). Point replay.checkpoint_dir at a "
                "fresh directory or delete the old checkpoints.")
        want = rate_limiter_params(self.cfg)
        rl = info.rate_limiter_info
        diffs = []
        if info.max_size != capacity_items(self.cfg):
            diffs.append(f"max_size {info.max_size} (config: {capacity_items(self.cfg)})")
        for name, have, exp in (("samples_per_insert", rl.samples_per_insert, want.samples_per_insert),
                                ("min_size_to_sample", rl.min_size_to_sample, want.min_size_to_sample),
                                ("min_diff", rl.min_diff, want.min_diff),
                                ("max_diff", rl.max_diff, want.max_diff)):
            if not math.isclose(have, exp, rel_tol=1e-9, abs_tol=1e-9):
                diffs.append(f"{name} {have} (config: {exp})")
        if diffs:
            log.warning("the restored replay table keeps the settings stored in checkpoint %s, "
                        "which differ from the config: %s. Start from a fresh checkpoint_dir for "
                        "the new settings to apply.", self.restored_from, "; ".join(diffs))

    # -- checkpoint order (see SEQUENCE_FILE) ----------------------------------------------------

    def _promote_newest_checkpoint(self) -> None:
        """At start: if the newest complete checkpoint by sequence number is a previous one
        (the newest save failed or was quarantined), move it back where Reverb loads from."""
        ordered = ordered_checkpoints(self.checkpoint_dir)
        if not ordered or os.path.dirname(ordered[-1]) == self.checkpoint_dir:
            return
        for path in complete_checkpoints(self.checkpoint_dir):
            _move_into(path, previous_dir(self.checkpoint_dir))
        log.info("replay: restoring %s, the newest complete checkpoint by sequence number",
                 _move_into(ordered[-1], self.checkpoint_dir))

    def _archive_checkpoints(self) -> None:
        """Before a save: complete (and quarantined) checkpoints move to previous_dir, the rest
        (a save that was interrupted) is deleted, so Reverb's cleanup after the save has
        nothing to delete."""
        import shutil
        for name in os.listdir(self.checkpoint_dir):
            path = os.path.join(self.checkpoint_dir, name)
            if any(os.path.isfile(os.path.join(path, f))
                   for f in (DONE_FILE, QUARANTINED_DONE_FILE)):
                try:
                    _move_into(path, previous_dir(self.checkpoint_dir))
                except OSError as e:   # e.g. checkpoint_dir is a mount point (EXDEV)
                    log.error("could not move replay checkpoint %s to %s (%s): Reverb keeps "
                              "only its newest checkpoint by name until this is fixed", path,
                              previous_dir(self.checkpoint_dir), e)
            elif os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    def _prune_previous(self) -> None:
        import shutil
        prev = previous_dir(self.checkpoint_dir)
        old = sorted(complete_checkpoints(prev), key=lambda p: (checkpoint_sequence(p), p))
        for path in old[:-KEEP_PREVIOUS]:
            shutil.rmtree(path, ignore_errors=True)

    # -- background threads ---------------------------------------------------------------------

    def _poll_loop(self):
        while not self._stop_event.wait(self._poll_s):
            self._poll_once()

    def _poll_once(self) -> None:
        try:
            info = self._client.server_info(self._timeout_int())[TABLE]
        except Exception as e:   # server busy (checkpoint) or stopping: keep the last snapshot
            log.debug("replay metrics poll failed: %s", e)
            return
        self._record(info)

    def _record(self, info) -> None:
        """Keeps the snapshot; the exported counts never go back (a client's reset() empties
        the table and sets Reverb's counts to 0: logged and counted)."""
        rl = info.rate_limiter_info
        with self._lock:
            drops = self._inserts.drops
            self._inserts.update(rl.insert_stats.completed)
            self._samples.update(rl.sample_stats.completed)
            self._info, self._info_time = info, time.time()
            dropped = self._inserts.drops > drops
        if dropped:
            log.warning("replay table %r: Reverb's insert count went back to %d (a client reset "
                        "the table: its items are gone); the exported insert/sample counters "
                        "continue from %d", TABLE, rl.insert_stats.completed, self._inserts.value)

    def _checkpoint_loop(self):
        while not self._stop_event.wait(self.checkpoint_interval_s):
            try:
                self.checkpoint()
            except Exception as e:
                log.error("periodic replay checkpoint failed: %s", e)

    # -- public ---------------------------------------------------------------------------------

    @property
    def checkpoint_stats(self) -> Dict[str, float]:
        """{count, failures, last_duration, last_time} of checkpoints written by this server."""
        with self._lock:
            return dict(self._ckpt_stats)

    def info(self):
        """The live reverb TableInfo of the segments table."""
        return self._client.server_info(self._timeout_int())[TABLE]

    def checkpoint(self) -> str:
        """Writes a checkpoint now (blocks inserts/samples meanwhile); returns its path."""
        with self._ckpt_lock:
            t0 = time.perf_counter()
            try:
                self._archive_checkpoints()
                path = self._client.checkpoint()
                self._sequence += 1
                with open(os.path.join(path, SEQUENCE_FILE), "w") as f:
                    f.write(f"{self._sequence}\n")
                self._prune_previous()
            except Exception:
                with self._lock:
                    self._ckpt_stats["failures"] += 1
                raise
            dt = time.perf_counter() - t0
            with self._lock:
                self._ckpt_stats.update(count=self._ckpt_stats["count"] + 1, last_duration=dt,
                                        last_time=time.time())
        log.info("replay checkpoint %s written in %.3fs", path, dt)
        return path

    def stop(self, checkpoint: bool = True) -> None:
        """Stops the threads, writes a final checkpoint (unless told not to) and the server."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_event.set()
        try:
            if checkpoint:
                try:
                    self.checkpoint()
                except Exception as e:
                    log.error("final replay checkpoint failed: %s", e)
        finally:
            for t in self._threads:
                t.join(timeout=self._rpc_timeout_s)
            self._poll_once()   # the final figures: after the last insert and the final checkpoint
            self._server.stop()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------
# Entry points.

def default_checkpoint_dir(cfg) -> str:
    return cfg.replay.checkpoint_dir or os.path.join(cfg.run.run_dir, "replay_checkpoints")


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def run(cfg, state_dim: int, action_dim: int, *, port: Optional[int] = None,
        metrics_port: Optional[int] = None, metrics_host: Optional[str] = None,
        checkpoint_dir: Optional[str] = None, ready_file: Optional[str] = None) -> int:
    """Serves replay until SIGTERM/SIGINT, then checkpoints, stops and returns 0.

    port: default the port of cfg.service.replay_address; metrics_port: default
    cfg.service.metrics_port; checkpoint_dir: default replay.checkpoint_dir or
    <run_dir>/replay_checkpoints. ready_file: written ("<port> <metrics_port>") once serving.
    Must run in the main thread (signal handlers).
    """
    done = threading.Event()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = ReplayServer(
            cfg, state_dim, action_dim,
            port=_port_of(cfg.service.replay_address) if port is None else port,
            checkpoint_dir=checkpoint_dir or default_checkpoint_dir(cfg),
            metrics_port=cfg.service.metrics_port if metrics_port is None else metrics_port,
            metrics_host=metrics_host or cfg.service.host)
        try:
            if ready_file:
                tmp = ready_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(f"{server.port} {server.metrics_port}\n")
                os.replace(tmp, ready_file)
            while not done.wait(1.0):
                pass
            log.info("replay: signal received, checkpointing and stopping")
        finally:
            server.stop()
        # After the final checkpoint (its counters included); the collector reads cached figures.
        from crl.metrics import write_final_metrics
        write_final_metrics(cfg.run.run_dir, "replay", log, server.registry)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def main(argv=None) -> int:
    """`python -m replay.server --state-dim 29 --action-dim 8 [--config f.yaml] [--set k=v ...]`."""
    from crl import config as config_lib
    p = argparse.ArgumentParser(prog="python -m replay.server", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--state-dim", type=int, required=True)
    p.add_argument("--action-dim", type=int, required=True)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--ready-file", default=None)
    a = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    cfg = config_lib.load(a.config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(cfg, a.state_dim, a.action_dim, port=a.port, metrics_port=a.metrics_port,
               checkpoint_dir=a.checkpoint_dir, ready_file=a.ready_file)


if __name__ == "__main__":
    raise SystemExit(main())
