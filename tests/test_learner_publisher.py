"""Publishing params off the learner's update loop (learner/publisher.py, learner/role.py).

Unit tests of ParamsPublisher with a recording fake server, then the learner role's run() in
this process against a real `crl replay` process, with its ParameterServer wrapped so that every
publish is made slow (simulated: a sleep) and recorded, and its Updater wrapped so that every
state it produces is recorded on the host.
"""
import json
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crl import config as C
from crl.learning import Updater
from helpers import (free_port_block, port_open, random_segments as segments,
                     small_learner_overrides, start_role, stop_process, wait_for, write_all)
from learner.publisher import ParamsPublisher

LOG = logging.getLogger("test-publisher")


class RecordingServer:
    """publish(params, version) records (version, host params, start, end, thread name)."""

    def __init__(self, delay_s=0.0, inner=None):
        self.delay_s, self.inner = delay_s, inner
        self.published = []
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def publish(self, params, version):
        t0 = time.monotonic()
        self.entered.set()
        time.sleep(self.delay_s)
        host = jax.tree_util.tree_map(np.array, params)
        if self.inner is not None:
            self.inner.publish(params, version)
        with self.lock:
            self.published.append((version, host, t0, time.monotonic(),
                                   threading.current_thread().name))

    def start(self):
        self.inner.start()
        return self

    def __getattr__(self, name):   # stop, address ... of the real server
        return getattr(self.inner, name)


def tree(v):
    return {"actor": {"w": np.full((3,), v, np.float32)}, "critic": {"w": np.full((2,), v, np.float32)}}


# ---------------------------------------------------------------------------------------------
# ParamsPublisher alone.

def test_newest_offer_wins_versions_increase_and_interval_is_kept():
    server = RecordingServer()
    pub = ParamsPublisher(server, interval_s=0.2, log=LOG).start()
    t0 = time.monotonic()
    for v in range(1, 41):          # 40 offers in ~0.8 s
        pub.offer(v, tree(v))
        time.sleep(0.02)
    wait_for(lambda: pub.published_version == 40, 5, "the newest offer to be published")
    elapsed = time.monotonic() - t0
    assert pub.stop() is None
    versions = [p[0] for p in server.published]
    assert versions == sorted(set(versions)) and versions[-1] == 40
    assert len(versions) <= elapsed / 0.2 + 1
    assert pub.skipped >= 40 - len(versions) - 1
    for v, host, *_ in server.published:                 # each version carries its own params
        assert np.all(host["actor"]["w"] == v) and np.all(host["critic"]["w"] == v)
    starts = [p[2] for p in server.published]
    assert all(b - a >= 0.19 for a, b in zip(starts, starts[1:]))
    idle = ParamsPublisher(RecordingServer(), interval_s=0.0, log=LOG)   # not started
    idle.offer(5, tree(5))
    with pytest.raises(ValueError):
        idle.offer(5, tree(5))      # an offer must be newer than the one waiting


def test_offer_does_not_wait_for_a_simulated_slow_publish():
    server = RecordingServer(delay_s=0.5)
    pub = ParamsPublisher(server, interval_s=0.0, log=LOG).start()
    pub.offer(1, tree(1))
    assert server.entered.wait(5)   # version 1 is being published (for 0.5 s)
    t0 = time.perf_counter()
    for v in range(2, 6):
        pub.offer(v, tree(v))
        assert not pub.wants()
    assert time.perf_counter() - t0 < 0.1
    left = pub.stop()               # the publication in flight completes; the newest is returned
    assert left is not None and left[0] == 5
    assert [p[0] for p in server.published] == [1]
    assert pub.publish_now(*left) and [p[0] for p in server.published] == [1, 5]
    assert not pub.publish_now(4, tree(4))    # never an older version


def test_nonfinite_snapshot_is_never_published():
    server = RecordingServer()
    refused = []
    pub = ParamsPublisher(server, interval_s=0.0, log=LOG, on_rejected=refused.append).start()
    bad = tree(1.0)
    bad["critic"]["w"][1] = np.nan
    pub.offer(1, bad)
    wait_for(lambda: refused == [1], 5, "the NaN snapshot to be refused")
    pub.offer(2, {"actor": {"w": jnp.full((3,), jnp.inf)}, "critic": tree(2)["critic"]})
    wait_for(lambda: refused == [1, 2], 5, "the Inf snapshot to be refused")
    pub.offer(3, tree(3))
    wait_for(lambda: pub.published_version == 3, 5, "a finite snapshot to be published")
    pub.stop()
    assert [p[0] for p in server.published] == [3]


# ---------------------------------------------------------------------------------------------
# The learner role, in this process, against a real replay.

@pytest.fixture
def role_setup(tmp_path, monkeypatch):
    """(cfg, replay writer, records, run_learner) with a fresh replay process."""
    import learner.role as role
    base = free_port_block(3)
    overrides = small_learner_overrides(tmp_path, base, **{
        "replay.utd": 0.2, "learner.checkpoint_every": 10, "learner.publish_interval_s": 0.0})
    rec = {"states": [], "dispatch_t": [], "server": None, "slow_s": 0.3, "call_delay_s": 0.0}

    def record_state(updater, tag):
        st = updater.host_state()
        rec["states"].append((tag, jax.tree_util.tree_map(
            np.array, {"actor": st.actor_params, "critic": st.critic_params})))

    orig_async, orig_load = Updater.update_async, Updater.load_state

    def update_async(self, segs, snapshot=False):
        rec["dispatch_t"].append(time.monotonic())
        out = orig_async(self, segs, snapshot)
        record_state(self, "update")    # waits for the call: fine for checking values
        time.sleep(rec["call_delay_s"])
        return out

    def load_state(self, state):
        orig_load(self, state)
        record_state(self, "load")

    monkeypatch.setattr(Updater, "update_async", update_async)
    monkeypatch.setattr(Updater, "load_state", load_state)
    orig_server = role.server_from_config

    def slow_server(*a, **kw):
        rec["server"] = RecordingServer(delay_s=rec["slow_s"], inner=orig_server(*a, **kw))
        return rec["server"]
    monkeypatch.setattr(role, "server_from_config", slow_server)

    procs = []

    def run_learner(**more):
        cfg = C.load(overrides={**overrides, **more})
        if not procs:
            args = [f"--{k}={v}" for k, v in overrides.items()]
            procs.append(start_role(["replay", *args, "--metrics-port", base + 2],
                                    tmp_path / "replay.log"))
            wait_for(lambda: port_open(base), 120, "replay to listen", proc=procs[0])
        stop = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("rc", role.run(cfg, stop, LOG)),
                             daemon=True)
        t.start()
        return cfg, stop, t, result

    yield overrides, rec, run_learner
    for p in procs:
        stop_process(p)


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                     jax.tree_util.tree_leaves(b)))


def test_role_publishes_off_the_loop_newest_finite_state_and_final_at_stop(role_setup, tmp_path,
                                                                          monkeypatch):
    import learner.role as role
    from params import ParameterClient
    from learner.checkpoint import LearnerCheckpointer
    from replay.writer import SegmentWriter
    overrides, rec, run_learner = role_setup
    nan_file = tmp_path / "inject_nan"
    monkeypatch.setenv(role.FAULT_NAN_FILE_ENV, str(nan_file))
    nonfinite0 = role.NONFINITE._value.get()
    refused0 = role.NONFINITE_PUBLISH._value.get()
    cfg, stop, thread, result = run_learner()
    try:
        wait_for(lambda: port_open(int(cfg.service.params_address.rsplit(":", 1)[1])), 120,
                 "the learner to publish")
        writer = SegmentWriter(cfg.service.replay_address, cfg, 5.0, state_dim=4, action_dim=2)
        rng = np.random.default_rng(0)
        write_all(writer, segments(8, rng))     # prefill (4) + 4 items: 40 calls
        wait_for(lambda: len(rec["dispatch_t"]) >= 15, 120, "15 update calls")
        nan_file.touch()                        # the next update runs on NaN states
        wait_for(lambda: not nan_file.exists(), 60, "the NaN update")
        write_all(writer, segments(8, rng))     # 80 more calls after the rollback
        client = ParameterClient(cfg.service.params_address, timeout_s=10)
        settled = [-1, 0]

        def idle():
            v = client.health()["version"]
            settled[:] = [v, settled[1] + 1 if v == settled[0] else 0]
            return settled[1] >= 10 and len(rec["dispatch_t"]) >= 100
        wait_for(idle, 180, "the learner to use up the data", 0.2)
        idle_version = settled[0]
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive() and result["rc"] == 0
    assert role.NONFINITE._value.get() == nonfinite0 + 1
    assert role.NONFINITE_PUBLISH._value.get() == refused0   # the loop never offered a bad state
    published = rec["server"].published
    versions = [p[0] for p in published]
    assert versions == sorted(set(versions)), versions       # strictly increasing
    assert len(versions) >= 5
    # Every published params equal a state the learner had, in the order it had them; none
    # holds NaN (the NaN update and the call on top of it were never published).
    states = rec["states"]
    last = -1
    for version, host, *_ in published:
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host)), version
        idx = [i for i, (_, s) in enumerate(states) if same(s, host)]
        assert idx, f"version {version} matches no state of the learner"
        later = [i for i in idx if i >= last]
        assert later, f"version {version} is older than the one published before it"
        last = later[0]
    assert any(not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(s))
               for _, s in states)   # the injected NaN update did produce a bad state
    # The loop did not wait for the (simulated) slow publishes: update calls were dispatched
    # while publications ran on the publisher thread.
    slow = [(t0, t1) for _, _, t0, t1, name in published if name == "params-publisher"]
    assert len(slow) >= 3
    during = sum(1 for t in rec["dispatch_t"] if any(t0 < t < t1 for t0, t1 in slow))
    assert during >= 10, (during, len(rec["dispatch_t"]), len(slow))
    # The final state is published at stop and is what the final checkpoint holds.
    final = json.loads((tmp_path / "learner_final.json").read_text())
    assert versions[-1] == final["params_version"] >= idle_version
    assert same(published[-1][1], states[-1][1])
    ckpt = LearnerCheckpointer(str(tmp_path / "learner_checkpoints"))
    template = Updater(cfg, 4, 2, (0, 1), jax.random.PRNGKey(1)).host_state()
    state, counters = ckpt.restore(template)
    ckpt.close()
    assert counters["params_version"] == versions[-1]
    assert same({"actor": state.actor_params, "critic": state.critic_params}, published[-1][1])
    # TensorBoard: losses, alpha, grad norms, SGD steps/s, UTD and lag against env steps.
    from crl.tensorboard import read_scalars
    curves = read_scalars(str(tmp_path / "tb" / "learner"))
    for tag in ("critic_loss", "actor_loss", "alpha", "critic_grad_norm", "sgd_steps_per_s",
                "utd", "policy_lag_versions"):
        assert curves.get(f"learner/{tag}"), sorted(curves)
    steps = [s for s, _ in curves["learner/critic_loss"]]
    assert steps == sorted(steps) and 0 < steps[-1] <= final["env_steps"]
    writer.close()
    client.close()


def test_budget_does_the_owed_updates_then_serves_without_exiting(role_setup, tmp_path):
    """At the budget the learner does the SGD steps still owed (utd x env steps after the
    prefill) and, with learner.exit_at_budget false, keeps serving the final params."""
    from params import ParameterClient
    from replay.writer import SegmentWriter
    overrides, rec, run_learner = role_setup
    rec["slow_s"] = 0.0
    # A slow learner (simulated: 0.1 s per call), so that it is still behind the writes when it
    # sees the budget (the rate limiter lets the writes run up to 20 calls ahead).
    rec["call_delay_s"] = 0.1
    cfg, stop, thread, result = run_learner(**{"learner.total_env_steps": 1200,
                                               "learner.exit_at_budget": False})
    try:
        wait_for(lambda: port_open(int(cfg.service.params_address.rsplit(":", 1)[1])), 120,
                 "the learner to publish")
        writer = SegmentWriter(cfg.service.replay_address, cfg, 5.0, state_dim=4, action_dim=2)
        final_path = tmp_path / "learner_final.json"
        # 1,200 env steps (a retried write may insert one twice: then the budget is reached
        # early and the last writes would wait forever for the stopped learner)
        write_all(writer, segments(12, np.random.default_rng(1)), until=final_path.exists)
        wait_for(final_path.exists, 120, "the learner to reach the budget")
        final = json.loads(final_path.read_text())
        time.sleep(1.5)
        assert thread.is_alive(), "the learner exited at the budget"
        client = ParameterClient(cfg.service.params_address, timeout_s=10)
        assert client.health()["version"] == final["params_version"]
        client.close()
        writer.close()
    finally:
        stop.set()
        thread.join(60)
    assert result["rc"] == 0 and final["stopped_by"] == "budget"
    assert final["env_steps"] >= 1200
    # utd 0.2 x (env steps - 400 of prefill): 160 SGD steps = 80 calls of 2 at 1,200 env steps.
    assert final["sgd_steps"] == round(0.2 * (final["env_steps"] - 400)), final
    assert final["update_calls"] == final["sgd_steps"] // 2
    assert final["utd"] == pytest.approx(0.2), final
    assert rec["server"].published[-1][0] == final["params_version"]


def test_disk_full_checkpoints_are_reported_and_retried_training_goes_on(role_setup, tmp_path,
                                                                        monkeypatch):
    """Saves that fail with ENOSPC (a full disk; simulated: root ignores permissions here) are
    logged and counted; the learner keeps training on the older checkpoints and saves again
    once there is room; the final state is saved."""
    import errno
    import learner.role as role
    from learner.checkpoint import LearnerCheckpointer
    from replay.writer import SegmentWriter
    overrides, rec, run_learner = role_setup
    rec["slow_s"] = 0.0
    full = {"on": False, "refused": 0}
    orig_save = LearnerCheckpointer.save

    def save(self, step, state, counters, wait=True):
        if full["on"]:
            full["refused"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", self.directory)
        return orig_save(self, step, state, counters, wait)
    monkeypatch.setattr(LearnerCheckpointer, "save", save)
    errors0 = role.CHECKPOINT_ERRORS._value.get()
    cfg, stop, thread, result = run_learner()
    try:
        wait_for(lambda: port_open(int(cfg.service.params_address.rsplit(":", 1)[1])), 120,
                 "the learner to publish")
        writer = SegmentWriter(cfg.service.replay_address, cfg, 5.0, state_dim=4, action_dim=2)
        rng = np.random.default_rng(3)
        full["on"] = True
        write_all(writer, segments(40, rng), until=lambda: full["refused"] >= 2)
        wait_for(lambda: full["refused"] >= 2, 120, "two checkpoints to hit the full disk")
        assert thread.is_alive()                              # still training
        calls_full = role.CALLS._value.get()
        full["on"] = False                                    # room again
        write_all(writer, segments(30, rng))
        wait_for(lambda: role.CALLS._value.get() > calls_full + cfg.learner.checkpoint_every,
                 120, "training past the next checkpoint")
        writer.close()
    finally:
        stop.set()
        thread.join(60)
    assert result["rc"] == 0
    assert role.CHECKPOINT_ERRORS._value.get() - errors0 == full["refused"] >= 2
    final = json.loads((tmp_path / "learner_final.json").read_text())
    ck = LearnerCheckpointer(str(tmp_path / "learner_checkpoints"))
    assert ck.latest_step() == final["update_calls"]             # saved again, final included
    ck.close()


def test_checkpoint_keeps_the_version_floor_and_the_newest_counters_of_a_step(tmp_path):
    """What the role's version skipping relies on: the floor file survives beside the steps
    (Orbax ignores it), and a second save of one step keeps the newer counters."""
    from learner.checkpoint import LearnerCheckpointer
    cfg = C.load(overrides={"network.actor.width": 16, "network.critic.width": 16})
    state = Updater(cfg, 4, 2, (0, 1), jax.random.PRNGKey(0)).host_state()
    ckpt = LearnerCheckpointer(str(tmp_path / "c"))
    assert ckpt.version_floor() == 0
    ckpt.save(3, state, {"params_version": 1})
    ckpt.set_version_floor(205)
    ckpt.save(3, state, {"params_version": 9})       # the final checkpoint at the same step
    ckpt.close()
    ckpt = LearnerCheckpointer(str(tmp_path / "c"))
    assert ckpt.version_floor() == 205 and ckpt.latest_step() == 3
    assert ckpt.restore(state)[1] == {"params_version": 9}
    ckpt.close()
