"""The actor role loop (actors.role.run) against a real Reverb server and a real ParameterServer.

The loop overlaps the replay write of unroll k with unroll k+1 stepping. These tests count every
unroll it dispatches and every segment it hands to the writer, then check, after a stop:
  - replay holds exactly (unrolls dispatched) x num_envs segments: none dropped, none duplicated,
    the last dispatched unroll included (a stop writes what is in flight);
  - write i carries the segments of dispatch i, every step stamped with the params version that
    dispatch used (versions published during the run, picked up by the refresher, in order);
  - what replay stores is what was written; episode ids differ between two runs (restarts).
Two ways to stop: right after a dispatch (the in-flight unroll must still be written), and during
a write (the unroll stepping meanwhile must still be written).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from crl import config as config_lib
from crl.learning import PROGRESS_KEY, progress_of
from replay.writer import SegmentWriter   # the real one (each run patches a recording subclass in)

E, T = 4, 10                  # envs per actor, steps per segment
ENV = "point_maze_u"
STOP_AT = 7                   # stop after this many dispatches / writes
PUBLISH_EVERY = 2             # a new params version after every 2nd dispatch


def params_of_version(actor_params, v: int, finished: bool = False):
    """Actor params whose every action is ~tanh(action_mean(v)): the action tells the version.
    With the progress every version carries (the learner's: env steps 100 * v)."""
    p = dict(actor_params)
    p["mean"] = {"kernel": np.zeros_like(p["mean"]["kernel"]),
                 "bias": np.full_like(p["mean"]["bias"], action_mean(v))}
    p["log_std"] = {"kernel": np.zeros_like(p["log_std"]["kernel"]),       # std = exp(-5)
                    "bias": np.full_like(p["log_std"]["bias"], -100.0)}
    return {"actor": p, PROGRESS_KEY: progress_of(100 * v, 10 * v, finished)}


def action_mean(v: int) -> float:
    return -1.5 + 0.25 * (v % 12)


def version_of_actions(actions: np.ndarray, v0: int) -> np.ndarray:
    """Inverse of params_of_version for versions v0 .. v0 + 11."""
    k = np.rint((np.arctanh(np.clip(actions, -0.999999, 0.999999)) + 1.5) / 0.25).astype(int)
    return v0 + (k - v0 % 12) % 12


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A replay server (rate limiter open) and a ParameterServer, both in this process."""
    import jax
    from crl.envs import make_env
    from crl.networks import CRLNetworks
    from params import ParameterServer
    from helpers import free_port
    from replay.server import ReplayServer

    env = make_env(ENV)
    params_server = ParameterServer("127.0.0.1:0").start()
    port = free_port()
    cfg = config_lib.load(None, {
        "env.name": ENV, "env.num_envs": E, "env.episode_length": 25,
        "network.actor.width": 32, "network.critic.width": 32,
        "replay.segment_length": T, "replay.capacity_steps": 100_000, "replay.min_size_steps": T,
        "replay.utd_tolerance": 1e6, "replay.checkpoint_interval_s": 1e9,
        "learner.segments_per_call": 1, "learner.minibatches_per_call": 1, "algo.batch_size": 8,
        "actor.param_refresh_s": 0.05,
        "service.replay_address": f"127.0.0.1:{port}",
        "service.params_address": f"127.0.0.1:{params_server.port}"})
    # The rate limiter's buffer is one actor write (env.num_envs items): a replay sized for 1,000
    # envs lets these actors insert (and the test sample) freely; nothing trains here.
    replay_cfg = config_lib.override(cfg, {"env.num_envs": 1000})
    replay = ReplayServer(replay_cfg, env.state_dim, env.action_size, port,
                          str(tmp_path_factory.mktemp("replay_ckpt")), checkpoint_interval_s=0)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    actor_params = jax.tree_util.tree_map(np.asarray, nets.init(jax.random.PRNGKey(0))[0])
    try:
        yield cfg, replay, params_server, actor_params
    finally:
        replay.stop()
        params_server.stop()


def run_actor(stack, monkeypatch, stop_during: str):
    """Runs actors.role.run in a thread until STOP_AT dispatches or writes; returns the record."""
    from actors import role
    from crl.rollout import Unroller
    from replay import writer as writer_mod

    cfg, replay, params_server, actor_params = stack
    stop = threading.Event()
    dispatched, written = [], []      # params version per dispatch; numpy segments per write

    def publish_next(finished: bool = False):
        """A new version, and wait (bounded) until the actor's follower holds it."""
        publish_and_wait(params_server, params_of_version(actor_params, params_server.version + 1,
                                                         finished))

    class CountingUnroller(Unroller):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            jitted = self.unroll

            def unroll(state, params, version, length):
                out = jitted(state, params, version, length=length)
                dispatched.append(version)
                if stop_during == "dispatch" and len(dispatched) == STOP_AT:
                    stop.set()                        # the unroll just dispatched is in flight
                elif stop_during == "finish" and len(dispatched) == STOP_AT:
                    publish_next(finished=True)       # the learner's final version: no stop set
                elif len(dispatched) % PUBLISH_EVERY == 0:
                    publish_next()
                return out
            self.unroll = unroll

    class RecordingWriter(SegmentWriter):
        def write(self, segments):
            written.append({k: np.array(v) for k, v in segments.items()})
            n = super().write(segments)
            if stop_during == "write" and len(written) == STOP_AT:
                stop.set()                            # unroll STOP_AT + 1 is stepping meanwhile
            return n

    monkeypatch.setattr(role, "Unroller", CountingUnroller)
    monkeypatch.setattr(writer_mod, "SegmentWriter", RecordingWriter)   # undone after the test
    if params_server.version < 0:
        params_server.publish(params_of_version(actor_params, 0), 0)
    size_before = replay_size(replay)
    before = {k: metric(k) for k in ("crl_actor_segments_written_total",
                                     "crl_actor_segments_dropped_total",
                                     "crl_actor_env_steps_total",
                                     "crl_actor_unroll_duration_seconds_count",
                                     "crl_actor_write_duration_seconds_count")}
    log = RecordingLog(f"test-actor-{stop_during}")
    result = []
    th = threading.Thread(target=lambda: result.append(role.run(cfg, 0, stop, log)), daemon=True)
    th.start()
    th.join(timeout=300)
    assert not th.is_alive(), "the actor loop did not stop"
    delta = {k: metric(k) - v for k, v in before.items()}
    return {"rc": result[0], "dispatched": dispatched, "written": written, "delta": delta,
            "stored": replay_size(replay) - size_before, "stop_set": stop.is_set(),
            "log": log.lines, "id_base": metric("crl_actor_episode_id_base"),
            "version_at_start": dispatched[0]}


def publish_and_wait(params_server, params):
    """Publishes the next version and waits (bounded) until the actor's follower holds it."""
    v = params_server.version + 1
    params_server.publish(params, v)
    deadline = time.monotonic() + 30
    while metric("crl_actor_learner_params_version") < v:
        assert time.monotonic() < deadline, "the follower did not pick up a new version"
        time.sleep(0.01)


class RecordingLog(logging.Logger):
    """A logger that keeps its formatted messages (the role logs to it)."""

    def __init__(self, name: str):
        super().__init__(name, logging.INFO)
        self.lines: list = []
        handler = logging.Handler()
        handler.emit = lambda record: self.lines.append(record.getMessage())
        self.addHandler(handler)


def replay_size(replay) -> int:
    import reverb
    from replay import TABLE
    return reverb.Client(replay.address).server_info(10)[TABLE].current_size


def check_run(r):
    n = len(r["dispatched"])
    assert r["rc"] == 0
    assert n >= STOP_AT
    # Every dispatched unroll written exactly once, the in-flight one included.
    assert len(r["written"]) == n, (len(r["written"]), n)
    assert r["stored"] == n * E
    d = r["delta"]
    assert d["crl_actor_segments_written_total"] == n * E
    assert d["crl_actor_segments_dropped_total"] == 0
    assert d["crl_actor_env_steps_total"] == n * E * T
    assert d["crl_actor_unroll_duration_seconds_count"] == n and d["crl_actor_write_duration_seconds_count"] == n
    # Write i is dispatch i: every step carries the version that dispatch stepped with, and the
    # versions follow the publishing schedule (a new one after every PUBLISH_EVERY dispatches).
    v0 = r["version_at_start"]
    expected = [v0 + i // PUBLISH_EVERY for i in range(n)]
    assert r["dispatched"] == expected, r["dispatched"]
    for i, seg in enumerate(r["written"]):
        assert seg["params_version"].shape == (E, T)
        np.testing.assert_array_equal(seg["params_version"], expected[i], err_msg=f"write {i}")
        # ... and the params of that version really chose the actions (no stamp off by a refresh)
        for a in range(seg["action"].shape[-1]):
            np.testing.assert_array_equal(version_of_actions(seg["action"][..., a], v0),
                                          seg["params_version"], err_msg=f"write {i}")
    # In order: episode ids only grow along each env's time line.
    ids = np.concatenate([seg["episode_id"] for seg in r["written"]], axis=1)   # [E, n*T]
    assert np.all(np.diff(ids, axis=1) >= 0)
    assert len(np.unique(ids)) > E                      # episodes ended and got fresh ids
    assert ids.min() >= r["id_base"]


@pytest.mark.timeout(600)
def test_overlapped_loop_writes_every_unroll_once_with_its_version(stack, monkeypatch):
    import reverb
    from replay import TABLE

    runs = {}
    for how in ("dispatch", "write"):
        runs[how] = run_actor(stack, monkeypatch, how)
        check_run(runs[how])
    # Restarts: each run hands out episode ids from a fresh random base.
    ids = [set(np.unique(np.concatenate([s["episode_id"].ravel() for s in r["written"]])))
           for r in runs.values()]
    assert not ids[0] & ids[1]
    # What replay stores is what was written (a sample of items, matched by content).
    _, replay, _, _ = stack
    def content(segment):
        return tuple(np.asarray(segment[k]).tobytes() for k in sorted(segment))

    written = {content({k: v[e] for k, v in seg.items()})
               for r in runs.values() for seg in r["written"] for e in range(E)}
    client = reverb.Client(replay.address)
    for sample in client.sample(TABLE, num_samples=16, emit_timesteps=False,
                                unpack_as_table_signature=True):
        assert content(sample.data) in written


@pytest.mark.timeout(300)
def test_final_params_end_the_actor_after_it_wrote_what_it_stepped(stack, monkeypatch):
    """Contract B: the learner's final version (progress finished = 1) ends the actor by itself:
    nothing more is dispatched, every unroll dispatched is written (the one in flight included),
    "run finished at N env steps" (the learner's N) is logged, exit 0. No stop was requested."""
    _, _, params_server, _ = stack
    r = run_actor(stack, monkeypatch, "finish")
    check_run(r)
    assert not r["stop_set"]
    assert len(r["dispatched"]) == STOP_AT, r["dispatched"]   # none after the final version
    final_env_steps = 100 * params_server.version               # params_of_version's progress
    assert f"run finished at {final_env_steps} env steps" in "\n".join(r["log"]), r["log"][-5:]


@pytest.mark.timeout(300)
def test_final_params_end_a_write_the_rate_limiter_holds(stack, monkeypatch, tmp_path):
    """At its budget the learner samples no more, so replay's rate limiter holds the actor's
    writes for good. The final version must still end the actor: the held write gets the final
    flush deadline (shortened here), what replay did not confirm is dropped and counted, exit 0."""
    from actors import role
    from crl.envs import make_env
    from helpers import free_port
    from replay import writer as writer_mod
    from replay.server import ReplayServer

    cfg, _, params_server, actor_params = stack
    monkeypatch.setattr(writer_mod, "FINAL_FLUSH_S", 1.0)
    port = free_port()
    held_cfg = config_lib.override(cfg, {"service.replay_address": f"127.0.0.1:{port}",
                                         "replay.utd_tolerance": 0.1})
    env = make_env(ENV)
    # A closed rate limiter (the stack's is open): with no learner sampling, inserts are held
    # after about one write.
    held = ReplayServer(held_cfg, env.state_dim, env.action_size, port, str(tmp_path),
                        checkpoint_interval_s=0)
    stop, log, result = threading.Event(), RecordingLog("test-actor-held"), []
    th = threading.Thread(target=lambda: result.append(role.run(held_cfg, 0, stop, log)),
                          daemon=True)
    try:
        v = params_server.version + 1
        params_server.publish(params_of_version(actor_params, v), v)     # a run still going
        held_before = metric("crl_actor_rate_limited_total")
        dropped_before = metric("crl_actor_segments_dropped_total")
        th.start()
        deadline = time.monotonic() + 120
        while metric("crl_actor_rate_limited_total") < held_before + 1:   # a write is held
            assert th.is_alive() and time.monotonic() < deadline, "replay never held a write"
            time.sleep(0.05)
        publish_and_wait(params_server, params_of_version(actor_params, v + 1, finished=True))
        th.join(timeout=60)
        assert not th.is_alive(), "the final params did not end a held write"
    finally:
        stop.set()
        if th.ident is not None:
            th.join(timeout=60)
        held.stop()
    assert result == [0]
    assert "\n".join(log.lines).count(f"run finished at {100 * (v + 1)} env steps") == 1
    assert metric("crl_actor_segments_dropped_total") - dropped_before >= E   # counted, not lost
