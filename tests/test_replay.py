"""Replay role: a real Reverb server in a separate process, clients over real gRPC on 127.0.0.1.

Every server process is started by the test, stopped by its own PID in teardown, and every wait is
bounded. The small table used here: segments of T=10 steps, state_dim 3, action_dim 2,
samples_per_insert 2, min size 4 items, error buffer 4 samples => diff window [4, 12]:
inserts are free up to 4 items, then at most 6 items without sampling; K items allow
2K - 4 samples.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from crl import config as config_lib
from crl.segments import FIELDS, segment_spec
from helpers import free_port, wait_for
from replay import TABLE, ReplayError, ReplayTimeout

REPO = Path(__file__).resolve().parents[1]
STATE_DIM, ACTION_DIM, T = 3, 2, 10
OVERRIDES = {
    "replay.segment_length": 10, "replay.min_size_steps": 40, "replay.capacity_steps": 1000,
    "replay.utd": 0.05, "learner.segments_per_call": 4, "learner.minibatches_per_call": 1,
    "algo.batch_size": 8, "replay.checkpoint_interval_s": 1000.0,
}
SPI, MIN_ITEMS, MIN_DIFF, MAX_DIFF = 2.0, 4, 4.0, 12.0
START_TIMEOUT_S = 90.0


def cfg_with(**extra):
    return config_lib.load(None, {**OVERRIDES, **extra})


def make_segments(ids):
    """Segments whose every value encodes (segment id, position): id * 1000 + flat index."""
    out = {}
    for k, (shape, dtype) in segment_spec(STATE_DIM, ACTION_DIM, T).items():
        idx = np.arange(int(np.prod(shape))).reshape(shape)
        out[k] = np.stack([(i * 1000 + idx) for i in ids]).astype(dtype)
    return out


def check_batch(batch, allowed_ids):
    """Every sampled segment equals the written one with its id; returns the ids."""
    ids = []
    for b in range(batch.data["episode_id"].shape[0]):
        sid = int(batch.data["episode_id"][b, 0]) // 1000
        assert sid in allowed_ids, (sid, allowed_ids)
        want = make_segments([sid])
        for k in FIELDS:
            assert batch.data[k][b].dtype == want[k].dtype
            np.testing.assert_array_equal(batch.data[k][b], want[k][0], err_msg=k)
        ids.append(sid)
    return ids


class ServerProc:
    """`python -m replay.server` in its own process; stopped by PID."""

    def __init__(self, tmp: Path, ckpt_dir: Path, port: int | None = None,
                 overrides: dict | None = None):
        self.port = port or free_port()
        self.ckpt_dir = ckpt_dir
        ready = tmp / f"ready-{self.port}-{time.monotonic_ns()}"
        self.log_path = tmp / f"server-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "replay.server", "--state-dim", str(STATE_DIM),
               "--action-dim", str(ACTION_DIM), "--port", str(self.port), "--metrics-port", "0",
               "--checkpoint-dir", str(ckpt_dir), "--ready-file", str(ready)]
        for k, v in {**OVERRIDES, **(overrides or {})}.items():
            cmd += ["--set", f"{k}={v}"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"replay server did not start:\n{self.log()}")
            time.sleep(0.1)
        self.metrics_port = int(ready.read_text().split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def kill(self):
        """SIGKILL by PID (kill -9), bounded wait."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def terminate(self, timeout_s=30.0) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout_s)
        self._log.close()
        return rc

    def metrics(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture
def spawn(tmp_path):
    procs = []

    def _spawn(ckpt_dir, port=None, overrides=None):
        p = ServerProc(tmp_path, ckpt_dir, port, overrides)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.proc.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    p = ServerProc(tmp, tmp / "ckpt")
    yield p
    if p.proc.poll() is None:
        p.kill()


@pytest.fixture
def server(module_server):
    """The module's server with an empty table and a reset rate limiter."""
    import reverb
    assert module_server.proc.poll() is None, module_server.log()
    reverb.Client(module_server.address).reset(TABLE)
    return module_server


def table_size(address) -> int:
    import reverb
    return reverb.Client(address).server_info(10)[TABLE].current_size


def samples_done(address) -> int:
    import reverb
    return reverb.Client(address).server_info(10)[TABLE].rate_limiter_info.sample_stats.completed


def new_writer(address, timeout_s=10.0):
    from replay.writer import SegmentWriter
    return SegmentWriter(address, cfg_with(), timeout_s, state_dim=STATE_DIM, action_dim=ACTION_DIM)


def new_sampler(address, batch, timeout_s):
    from replay.sampler import SegmentSampler
    return SegmentSampler(address, batch, timeout_s, prefetch=2, num_workers=1,
                          max_in_flight_samples_per_worker=1)


# ---------------------------------------------------------------------------------------------


def test_rate_limiter_params_formula():
    from replay.server import rate_limiter_params
    rl = rate_limiter_params(cfg_with())
    assert (rl.samples_per_insert, rl.min_size_to_sample) == (SPI, MIN_ITEMS)
    assert (rl.min_diff, rl.max_diff) == (MIN_DIFF, MAX_DIFF)
    # Defaults (point_maze_u, T=100): spi 20, 128 items, tolerance term 0.1 * 20 * 128 = 256.
    rl = rate_limiter_params(config_lib.load())
    assert (rl.samples_per_insert, rl.min_size_to_sample, rl.error_buffer) == (20.0, 128, 256.0)


def test_write_sample_round_trip_and_metrics(server):
    w = new_writer(server.address)
    assert w.write(make_segments(range(1, 7))) == 6
    assert table_size(server.address) == 6

    m = wait_for(lambda: (lambda m: m if m.get("crl_replay_table_size_items") == 6 else None)(
        server.metrics()), 15, "metrics to show 6 items")
    assert all(k.startswith("crl_replay_") for k in m)
    assert m["crl_replay_table_size_env_steps"] == 6 * T
    assert m["crl_replay_up"] == 1
    assert m["crl_replay_rate_limiter_samples_per_insert"] == SPI
    for name in ("crl_replay_inserts_total", "crl_replay_samples_total",
                 "crl_replay_checkpoint_duration_seconds", "crl_replay_checkpoints_total",
                 "crl_replay_insert_wait_seconds_total", "crl_replay_sample_wait_seconds_total",
                 "crl_replay_rate_limiter_inserts_blocked", "crl_replay_rate_limiter_samples_blocked"):
        assert name in m, name

    # 6 items allow 2 * 6 - 4 = 8 samples: two batches of 4, every value round-trips.
    s = new_sampler(server.address, 4, timeout_s=2.0)
    try:
        seen = []
        for _ in range(2):
            batch = s.sample()
            assert batch.data["state"].shape == (4, T, STATE_DIM)
            assert batch.info["key"].shape == (4,)
            seen += check_batch(batch, set(range(1, 7)))
        assert len(seen) == 8
        t0 = time.monotonic()
        with pytest.raises(ReplayTimeout):   # the rate limiter holds the 9th sample: bounded wait
            s.sample()
        assert time.monotonic() - t0 < 6
    finally:
        s.close()
        w.close()
    wait_for(lambda: server.metrics().get("crl_replay_samples_total") == 8, 15,
             "metrics to show 8 samples")
    assert server.metrics()["crl_replay_rate_limiter_samples_blocked"] == 1


def test_writer_refuses_mismatched_segments(server):
    w = new_writer(server.address)
    good = make_segments([1, 2])
    bad = dict(good, episode_id=good["episode_id"].astype(np.int64))
    with pytest.raises(ValueError, match=r"'episode_id'.*int32.*int64"):
        w.write(bad)
    bad = dict(good, state=np.zeros((2, T, STATE_DIM + 1), np.float32))
    with pytest.raises(ValueError, match=r"'state'.*\[N, 10, 3\].*\[2, 10, 4\]"):
        w.write(bad)
    bad = dict(good, action=good["action"][:, :-1])
    with pytest.raises(ValueError, match="'action'"):
        w.write(bad)
    bad = {k: v for k, v in good.items() if k != "truncation"}
    with pytest.raises(ValueError, match="truncation"):
        w.write(bad)
    bad = dict(good, truncation=good["truncation"][:1])
    with pytest.raises(ValueError, match="'truncation'.*batch size"):
        w.write(bad)
    # A writer set up for other dims is refused by the server's table signature, naming the field.
    from replay.writer import SegmentWriter
    other = SegmentWriter(server.address, segment_spec(STATE_DIM + 1, ACTION_DIM, T), 10.0)
    spec4 = segment_spec(STATE_DIM + 1, ACTION_DIM, T)
    with pytest.raises(ValueError, match="'state'"):
        other.write({k: np.zeros((1,) + s, d) for k, (s, d) in spec4.items()})
    assert table_size(server.address) == 0
    w.write(good)
    assert table_size(server.address) == 2
    w.close()
    other.close()


def test_rate_limiter_holds_samples_per_insert(server):
    w = new_writer(server.address)
    s = new_sampler(server.address, 1, timeout_s=1.5)
    got = 0

    def drain():
        n = 0
        while True:
            try:
                check_batch(s.sample(), set(range(100)))
            except ReplayTimeout:
                return n
            n += 1

    try:
        # Phase 1: K = 6 items (no sampling yet) then sample until blocked: 2K - 4 = 8 samples.
        w.write(make_segments(range(6)))
        got = drain()
        assert got == SPI * 6 - MIN_DIFF == samples_done(server.address)
        # Phase 2 (steady state): every further insert buys exactly SPI samples.
        for k in (4, 3):
            start = samples_done(server.address)
            w.write(make_segments(range(10 + 10 * k, 10 + 11 * k)))
            n = drain()
            assert samples_done(server.address) - start == SPI * k, k
            assert n == SPI * k
    finally:
        s.close()
        w.close()


def test_flush_timeout_when_inserts_blocked(server):
    w = new_writer(server.address, timeout_s=1.5)
    try:
        w.write(make_segments(range(6)))           # diff = 12 = max: the next insert must wait
        t0 = time.monotonic()
        with pytest.raises(ReplayTimeout, match="rate limiter"):
            w.write(make_segments([6]))
        assert time.monotonic() - t0 < 5
        assert table_size(server.address) == 6
        # Sampling makes room; the queued item goes through on the next flush (no duplicate).
        s = new_sampler(server.address, 2, timeout_s=5.0)
        try:
            check_batch(s.sample(), set(range(7)))
        finally:
            s.close()
        w.flush(timeout_s=5.0)
        assert table_size(server.address) == 7
    finally:
        w.close()
    wait_for(lambda: server.metrics().get("crl_replay_insert_wait_seconds_total", 0) > 0, 15,
             "insert wait time in metrics")


def test_checkpoint_kill9_restart_reconnect_sigterm(spawn, tmp_path):
    import reverb
    ckpt = tmp_path / "ckpt"
    s1 = spawn(ckpt)
    w = new_writer(s1.address, timeout_s=3.0)
    w.write(make_segments(range(1, 6)))
    path = reverb.Client(s1.address).checkpoint()   # the server's own checkpoint RPC
    assert os.path.isfile(os.path.join(path, "DONE"))
    w.write(make_segments([6]))                      # after the checkpoint: lost by kill -9
    assert table_size(s1.address) == 6
    s1.kill()

    t0 = time.monotonic()
    with pytest.raises(ReplayError):                 # server gone: a bounded, clear failure
        w.write(make_segments([7]))
    assert time.monotonic() - t0 < 10
    w.reconnect()                                    # what the actor does after an error

    s2 = spawn(ckpt, port=s1.port)                   # same port, same checkpoint dir
    assert table_size(s2.address) == 5
    assert s2.metrics()["crl_replay_restored_items"] == 5
    s = new_sampler(s2.address, 2, timeout_s=5.0)   # restored values round-trip
    try:
        check_batch(s.sample(), set(range(1, 6)))
    finally:
        s.close()
    w.write(make_segments([7, 8]))                   # the reconnected writer works
    assert table_size(s2.address) == 7
    w.close()

    assert s2.terminate() == 0                       # SIGTERM: final checkpoint, exit 0
    from replay.server import complete_checkpoints, verify_checkpoint
    assert verify_checkpoint(complete_checkpoints(str(ckpt))[-1]) == 7


def test_restore_edge_cases_in_process(tmp_path):
    """Periodic checkpoints, partial and corrupt checkpoints, and a checkpoint of another env."""
    from replay.server import CheckpointError, ReplayServer, complete_checkpoints
    cfg = cfg_with()
    ckpt = tmp_path / "ckpt"
    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt),
                       checkpoint_interval_s=0.2)
    try:
        w = new_writer(srv.address)
        w.write(make_segments([1, 2, 3]))
        w.close()
        c0 = srv.checkpoint_stats["count"]
        wait_for(lambda: srv.checkpoint_stats["count"] >= c0 + 2, 15, "periodic checkpoints")
        assert srv.checkpoint_stats["last_duration"] > 0
    finally:
        srv.stop()
    (good,) = complete_checkpoints(str(ckpt))        # Reverb keeps the newest one only

    # A newer checkpoint interrupted before DONE is skipped. (Named like Reverb's timestamps: a
    # later save must sort after it, as Reverb keeps only the last name in sort order.)
    name = os.path.basename(good)
    partial = ckpt / (name[:-6] + "9" + name[-6:])
    partial.mkdir()
    (partial / "tables.tfrecord").write_bytes(b"garbage")
    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0)
    assert srv.restored_items == 3
    srv.stop(checkpoint=False)

    # A checkpoint made for other dims is refused with a clear error.
    with pytest.raises(CheckpointError, match=r"signature.*state: \(10, 3\).*state: \(10, 4\)"):
        ReplayServer(cfg, STATE_DIM + 1, ACTION_DIM, free_port(), str(ckpt),
                     checkpoint_interval_s=0)

    # A corrupt complete checkpoint: a clear error, or (default) quarantine and restore the
    # previous one (kept in <dir>.previous, here with the same 3 items).
    with open(os.path.join(good, "chunks.tfrecord"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match="cannot be restored"):
        ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0,
                     on_corrupt_checkpoint="error")
    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0)
    try:
        assert srv.restored_items == 3
        assert srv.corrupt_checkpoints == [good]
        assert os.path.isfile(os.path.join(good, "DONE.corrupt"))
        w = new_writer(srv.address)
        w.write(make_segments([4, 5, 6]))
        w.close()
    finally:
        srv.stop()                                   # final checkpoint

    # Damage that Reverb itself reports (its loader raises): same fallback, even unverified.
    # (A half-truncated file is NOT reliably reported by Reverb: it may load with items missing,
    # which is why ReplayServer verifies first. Bytes that are not a TFRecord always raise.)
    (latest,) = complete_checkpoints(str(ckpt))
    with open(os.path.join(latest, "tables.tfrecord"), "wb") as f:
        f.write(b"this is not a TFRecord file at all")
    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0,
                       verify_checkpoints=False)
    try:
        assert srv.restored_items == 3                  # the previous one again
        assert srv.corrupt_checkpoints == [latest]
    finally:
        srv.stop(checkpoint=False)


def test_sampler_and_writer_unreachable_server_are_bounded():
    from replay import ReplayUnavailable
    from replay.sampler import SegmentSampler
    import reverb            # noqa: F401  (its first import, seconds under load, is not the bound)
    import tensorflow        # noqa: F401
    addr = f"127.0.0.1:{free_port()}"                # nothing listens there
    t0 = time.monotonic()
    with pytest.raises((ReplayTimeout, ReplayUnavailable)):
        SegmentSampler(addr, 4, timeout_s=1.0)
    w = new_writer(addr, timeout_s=1.0)
    with pytest.raises((ReplayTimeout, ReplayUnavailable)):
        w.write(make_segments([1]))
    w.close()
    assert time.monotonic() - t0 < 10



def test_stream_mode_overlapping_windows_share_cells_and_survive_reconnect(tmp_path):
    """actor.unroll_length U < T: one item per env and unroll = the env's last T steps (stored
    [k, U, ...], k = ceil(T / U)); the first after k unrolls; a reconnected writer primes its
    fresh stream with the last k unrolls, so the next item is whole and continuous."""
    import reverb
    from crl.segments import window_of
    from replay.server import ReplayServer, capacity_items, rate_limiter_params
    from replay.writer import SegmentWriter

    U, E = 4, 3                          # T = 10: k = 3 cells of 4 steps, windows = last 10
    cfg = cfg_with(**{"actor.unroll_length": U, "replay.utd": 1.0, "env.num_envs": E})
    assert cfg.samples_per_insert == pytest.approx(1.0 * U * 4 / 1)    # 16: items of U steps
    assert capacity_items(cfg) == 1000 // U
    assert rate_limiter_params(cfg).min_size_to_sample == 10           # 40 steps / U
    server = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(tmp_path / "ckpt"),
                          checkpoint_interval_s=0)
    try:
        w = SegmentWriter(server.address, cfg, 10.0, state_dim=STATE_DIM, action_dim=ACTION_DIM)
        assert w.streaming and w.cells_per_item == 3

        def unroll(j):   # steps j*U .. j*U+U-1 of every env; value = env * 10000 + step
            out = {}
            for k, (shape, dtype) in segment_spec(STATE_DIM, ACTION_DIM, U).items():
                step = np.arange(j * U, (j + 1) * U).reshape((U,) + (1,) * (len(shape) - 1))
                out[k] = np.stack([np.broadcast_to(e * 10000 + step, shape)
                                   for e in range(E)]).astype(dtype)
            return out

        made = [w.write(unroll(j)) for j in range(5)]
        assert made == [0, 0, E, E, E]
        w.reconnect()                     # e.g. replay restarted: a fresh stream, primed
        assert w.write(unroll(5)) == E
        assert table_size(server.address) == 4 * E
        client = reverb.Client(server.address)
        seen = set()
        for s in client.sample(TABLE, num_samples=48, emit_timesteps=False,
                               unpack_as_table_signature=True):
            data = window_of({k: np.asarray(v)[None] for k, v in s.data.items()}, T)
            ep = data["episode_id"][0]
            env, end = int(ep[0]) // 10000, int(ep[-1]) % 10000 + 1
            assert end % U == 0 and end >= 3 * U
            np.testing.assert_array_equal(ep, env * 10000 + np.arange(end - T, end))
            for k in FIELDS:
                assert data[k].shape[1] == T
            seen.add((env, end))
        assert {end for _, end in seen} <= {12, 16, 20, 24}
    finally:
        server.stop(checkpoint=False)


def _raw_insert_unchecked(address, items):
    """What a client that skips Reverb's client-side validation can do: the server stores these
    whatever their shapes and dtypes (Reverb's server never checks the table signature)."""
    import reverb
    client = reverb.Client(address)
    for item in items:          # one writer each: a writer's column keeps its first dtype
        with client.trajectory_writer(1, validate_items=False) as tw:
            tw.append(item)
            tw.create_item(TABLE, 1.0, {k: tw.history[k][-1] for k in item})
            tw.flush(timeout_ms=10_000)


def test_sampler_quarantines_items_that_do_not_match_the_signature(spawn, tmp_path):
    """A wrong-shaped and a wrong-dtype item written by a raw client are stored by the server;
    the sampler deletes both (by key), counts and logs them, never reports replay unavailable,
    and every batch it serves holds only the written good segments, intact.

    The sampler finds a bad item only when a uniform draw picks it, so this server's rate
    limiter allows samples_per_insert 100 (utd 2.5): 6 items allow 400 draws, and a given item
    escapes them with probability (5/6)^400 < 1e-31. With the module server's 2 draws per insert
    the table had to grow to get draws and each bad item's share of them shrank: a CI run
    (2026-12-06) ended its 90 s with the wrong-dtype item never drawn."""
    from prometheus_client import REGISTRY
    from replay import ReplayUnavailable
    server = spawn(tmp_path / "ckpt", overrides={"replay.utd": 2.5})
    metric = "crl_replay_client_items_quarantined_total"
    before = REGISTRY.get_sample_value(metric) or 0.0
    w = new_writer(server.address, timeout_s=2.0)
    w.write(make_segments([1, 2, 3, 4]))
    good = {k: make_segments([9])[k][0] for k in FIELDS}
    wrong_shape = dict(good, state=np.zeros((T, STATE_DIM + 2), np.float32))
    wrong_dtype = dict(good, state=good["state"].astype(np.float64))
    _raw_insert_unchecked(server.address, [wrong_shape, wrong_dtype])
    assert table_size(server.address) == 6           # the server took both
    written, next_id, seen = {1, 2, 3, 4}, 5, set()
    s = new_sampler(server.address, 2, timeout_s=2.0)
    try:
        deadline = time.monotonic() + 90
        while s.quarantined < 2 or not seen:
            assert time.monotonic() < deadline, (s.quarantined, seen)
            try:
                seen.update(check_batch(s.sample(), written))
            except ReplayUnavailable as e:
                raise AssertionError(f"a bad item was reported as replay unavailable: {e}")
            except ReplayTimeout:                    # rate limiter: write more good segments
                try:
                    w.write(make_segments([next_id]))
                    written.add(next_id)
                    next_id += 1
                except ReplayTimeout:
                    pass
        assert s.quarantined == 2
    finally:
        s.close()
        w.close()
    assert REGISTRY.get_sample_value(metric) - before == 2
    assert table_size(server.address) == len(written)   # the two bad items are gone


def test_monotonic_count_continues_across_drops():
    from replay.sampler import MonotonicCount
    c = MonotonicCount()
    got = [c.update(v) for v in (0, 5, 9, 0, 2, 7, 3, 4)]   # reset to 0, then an older restore
    assert got == [0, 5, 9, 9, 11, 16, 16, 17] and c.drops == 2


def test_counters_never_go_back_when_a_client_resets_the_table(spawn, tmp_path):
    """A second client's reset() empties the table; replay's exported insert/sample counters and
    the insert count the learner derives its env steps from keep going up."""
    import reverb
    from replay.sampler import InsertCount
    s1 = spawn(tmp_path / "ckpt")
    counts = InsertCount(s1.address, timeout_s=5.0)
    w = new_writer(s1.address, timeout_s=3.0)
    w.write(make_segments(range(1, 6)))
    wait_for(lambda: s1.metrics().get("crl_replay_inserts_total") == 5, 15, "5 inserts polled")
    seen = [counts.read()]
    assert seen == [5]
    sampler = new_sampler(s1.address, 2, timeout_s=5.0)
    try:
        sampler.sample()
    finally:
        sampler.close()
    samples_before = samples_done(s1.address)
    wait_for(lambda: s1.metrics()["crl_replay_samples_total"] >= samples_before, 15, "samples")
    m_before = s1.metrics()

    reverb.Client(s1.address).reset(TABLE)           # a second client
    assert table_size(s1.address) == 0
    wait_for(lambda: s1.metrics()["crl_replay_table_count_drops_total"] == 1, 15, "drop seen")
    seen.append(counts.read())
    m_after_reset = s1.metrics()
    w.write(make_segments([6, 7]))
    wait_for(lambda: s1.metrics()["crl_replay_inserts_total"] == 7, 15, "inserts after reset")
    seen.append(counts.read())
    w.close()
    m_end = s1.metrics()
    assert seen == [5, 5, 7]                         # never back; new inserts count on
    for name in ("crl_replay_inserts_total", "crl_replay_samples_total",
                 "crl_replay_inserted_env_steps_total"):
        assert m_before[name] <= m_after_reset[name] <= m_end[name], name
    assert "reset the table" in s1.log()


def test_checkpoints_are_kept_and_restored_by_sequence_not_by_clock(tmp_path):
    """Reverb names checkpoints by the local time and deletes all but the last name after a save:
    after the clock went back each new checkpoint was deleted at once. Here the existing
    checkpoint gets a name (and an mtime) from the future, as if written before the clock went
    back: the new checkpoint survives, the newest by sequence number is restored, and a corrupt
    newest one falls back to the previous one."""
    from replay.server import (ReplayServer, checkpoint_sequence, complete_checkpoints,
                               ordered_checkpoints, previous_dir)
    cfg = cfg_with()
    ckpt = tmp_path / "ckpt"
    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0)
    try:
        w = new_writer(srv.address)
        w.write(make_segments([1, 2, 3]))
        first = srv.checkpoint()
        future = str(ckpt / "2999-01-01T00:00:00+00:00")      # sorts after any name of today
        os.rename(first, future)
        os.utime(future, (4e9, 4e9))
        w.write(make_segments([4, 5]))
        w.close()
        second = srv.checkpoint()
        assert os.path.isfile(os.path.join(second, "DONE")), "the new checkpoint was deleted"
        moved = os.path.join(previous_dir(str(ckpt)), os.path.basename(future))
        assert checkpoint_sequence(second) > checkpoint_sequence(moved) > 0
    finally:
        srv.stop(checkpoint=False)
    assert complete_checkpoints(str(ckpt)) == [second]
    assert ordered_checkpoints(str(ckpt))[-1] == second
    assert complete_checkpoints(previous_dir(str(ckpt))) == [moved]   # the fallback is kept

    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0)
    try:
        assert (srv.restored_from, srv.restored_items) == (second, 5)
    finally:
        srv.stop(checkpoint=False)

    with open(os.path.join(second, "chunks.tfrecord"), "r+b") as f:
        f.truncate(10)                                          # the newest one is corrupt
    srv = ReplayServer(cfg, STATE_DIM, ACTION_DIM, free_port(), str(ckpt), checkpoint_interval_s=0)
    try:
        assert srv.corrupt_checkpoints == [second]
        assert srv.restored_items == 3                          # the previous one, by sequence
        third = srv.checkpoint()
        assert checkpoint_sequence(third) > checkpoint_sequence(second)
    finally:
        srv.stop(checkpoint=False)
    assert ordered_checkpoints(str(ckpt))[-1] == third
