"""The learner's loop object (learner/loop.py) and the UTD rule (crl.learning.update_calls_owed).

Unit tests of the loop's logic with fake injected parts, each named for what it fakes: a
ScriptedSampler (a list of batches, then the rate limiter's ReplayTimeout), a CountingUpdater
(params = number of calls, NaN when the batch holds NaN: no network, no compile), a
RecordingPublisher and an InMemoryCheckpointer. The real parts (Reverb, the ParameterServer,
Orbax, the compiled update) are exercised by tests/test_learner_publisher.py,
tests/test_learner_resume.py and tests/test_learner_finish.py.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from crl import config as C
from crl.learning import TrainState, UpdateResult, measured_utd, update_calls_owed
from learner import metrics as M
from crl.run_marker import read_marker
from learner.loop import DONE, OWED, TRAIN, LearnerLoop, LoopSettings, LoopState
from replay import ReplayTimeout, ReplayUnavailable


# ---------------------------------------------------------------------------------------------
# The UTD rule, exactly.

def test_update_calls_owed_is_utd_times_env_steps_after_the_prefill():
    rule = dict(prefill_steps=400, utd=0.2, minibatches_per_call=2)
    assert update_calls_owed(1200, 0, **rule) == 80        # 0.2 x 800 = 160 steps = 80 calls
    assert update_calls_owed(1200, 150, **rule) == 5
    assert update_calls_owed(1200, 159, **rule) == 0       # 1 step owed: not a whole call
    assert update_calls_owed(1200, 160, **rule) == 0
    assert update_calls_owed(1200, 170, **rule) == 0       # ahead: never negative
    assert update_calls_owed(400, 0, **rule) == 0          # nothing owed for the prefill
    assert update_calls_owed(100, 0, **rule) == 0
    # Float rounding: 0.1 x 30 = 3.0000000000000004 and 0.7 x 10 = 6.999999999999999.
    assert update_calls_owed(30, 0, prefill_steps=0, utd=0.1, minibatches_per_call=1) == 3
    assert update_calls_owed(10, 0, prefill_steps=0, utd=0.7, minibatches_per_call=1) == 7
    assert update_calls_owed(10, 0, prefill_steps=0, utd=0.7, minibatches_per_call=7) == 1
    assert measured_utd(160, 1200, 400) == 0.2 and measured_utd(5, 400, 400) is None


@pytest.mark.slow
def test_driver_counts_sgd_steps_by_the_same_rule():
    """The in-process driver's SGD steps at its budget are what the rule owes."""
    from crl.driver import train
    cfg = C.load(overrides={"env.name": "point_maze_open", "env.num_envs": 4, "eval.num_envs": 2,
                            "network.actor.width": 16, "network.critic.width": 16,
                            "algo.batch_size": 16, "learner.segments_per_call": 2,
                            "learner.minibatches_per_call": 3, "learner.num_devices": 1,
                            "replay.segment_length": 20, "replay.min_size_steps": 80,
                            "replay.capacity_steps": 2000, "replay.utd": 0.15,
                            "learner.total_env_steps": 400})
    history = train(cfg, num_evals=1, log=None)
    env_steps = 400   # 5 unrolls of 4 envs x 20 steps
    calls = update_calls_owed(env_steps, 0, prefill_steps=80, utd=0.15, minibatches_per_call=3)
    assert history[-1]["env_steps"] == env_steps
    assert history[-1]["sgd_steps"] == 3 * calls == 48   # floor(0.15 x 320 / 3) = 16 calls


# ---------------------------------------------------------------------------------------------
# Fake parts.

class Batch:
    def __init__(self, data, keys):
        self.data, self.info = data, {"key": np.asarray(keys, np.uint64)}


def batch(n=2, value=0.0, keys=None, version=0):
    data = {"state": np.full((n, 3, 2), value, np.float32),
            "action": np.zeros((n, 3, 1), np.float32),
            "episode_id": np.zeros((n, 3), np.int32),
            "params_version": np.full((n, 3), version, np.int32)}
    return Batch(data, keys if keys is not None else list(range(n)))


class ScriptedSampler:
    """Fake sampler (unit test only): hands out the scripted batches (an exception in the script
    is raised), then raises ReplayTimeout as Reverb's rate limiter does."""

    def __init__(self, script):
        self.script, self.sampled, self.closed = list(script), 0, False

    def sample(self, timeout_s):
        if not self.script:
            raise ReplayTimeout("rate limiter (scripted)")
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        self.sampled += 1
        return item

    def close(self, timeout_s=None):
        self.closed = True


def train_state(value: float, steps: int) -> TrainState:
    w = np.full((2,), value, np.float32)
    return TrainState({"w": w}, {"w": w + 1}, np.float32(0), (), (), (), np.zeros(2, np.uint32),
                      np.int32(steps))


class InFlight:
    """The "finite" flag of a call still computing: is_ready() is False (as for a device call
    in flight), so the loop settles it only by its pipeline rules."""

    def __init__(self, value):
        self.value = bool(value)

    def __bool__(self):
        return self.value

    def is_ready(self):
        return False


class CountingUpdater:
    """Fake Updater (unit test only): each call adds 1 to the params and minibatches_per_call to
    the SGD steps; a batch holding NaN makes the params NaN and the call non-finite."""

    def __init__(self, mpc=2):
        self.mpc, self.state, self.calls = mpc, train_state(0.0, 0), 0

    def update_async(self, data, snapshot=False):
        self.calls += 1
        nan = not np.isfinite(np.asarray(data["state"])).all()
        value = np.nan if nan else float(self.state.actor_params["w"][0]) + 1
        self.state = train_state(value, int(self.state.steps) + self.mpc)
        params = {"actor": self.state.actor_params, "critic": self.state.critic_params}
        return UpdateResult({"critic_loss": jnp.float32(value)}, InFlight(np.isfinite(value)),
                            jnp.int32(self.state.steps), params if snapshot else None)

    def params_snapshot(self):
        return {"actor": self.state.actor_params, "critic": self.state.critic_params}

    def host_state(self):
        return self.state

    def load_state(self, state):
        self.state = state

    @property
    def sgd_steps(self):
        return int(self.state.steps)


class RecordingPublisher:
    """Fake ParamsPublisher (unit test only): takes every offer at once, records it."""

    def __init__(self):
        self.offers, self.published, self.published_version, self.stopped = [], [], -1, False

    def wants(self):
        return True

    def offer(self, version, params):   # taken and published at once
        assert version > max([v for v, _ in self.offers], default=-1)
        self.offers.append((version, params))
        self.publish_now(version, params)

    def publish_now(self, version, params):
        if version <= self.published_version:
            return False
        self.published.append((version, params))
        self.published_version = version
        return True

    def stop(self, timeout_s=None):
        self.stopped = True
        return None


class InMemoryCheckpointer:
    """Fake LearnerCheckpointer (unit test only): keeps every save in a dict."""

    def __init__(self):
        self.saves = {}

    def save(self, step, state, counters, wait=True):
        self.saves[step] = (state, dict(counters))

    def latest_step(self):
        return max(self.saves, default=None)

    def restore(self, template):
        return self.saves[self.latest_step()] if self.saves else None


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda msg, *a: self.lines.append((level, msg % a if a else msg))


SETTINGS = LoopSettings(segments_per_call=2, minibatches_per_call=2, publish_every=1,
                        checkpoint_every=5, total_env_steps=10**9, prefill_steps=400, utd=0.2,
                        env_steps_per_item=100, poll_period_s=0.0)


def make_loop(script, tmp_path=None, inserts=lambda: None, nan_calls=(), **settings):
    """nan_calls: the dispatches (1-based) that run on NaN states, through the loop's fault
    hook (a NaN batch from replay is filtered before any update)."""
    import dataclasses
    updater, sampler = CountingUpdater(), ScriptedSampler(script)
    publisher, ckpt, deleted = RecordingPublisher(), InMemoryCheckpointer(), []
    loop = LearnerLoop(dataclasses.replace(SETTINGS, **settings), updater, lambda: sampler,
                       publisher, ckpt, log=Log(), replay_inserts=inserts,
                       delete_items=deleted.append,
                       inject_nan=lambda: updater.calls + 1 in nan_calls,
                       marker_path=str(tmp_path / "finished.json") if tmp_path else None)
    loop.checkpoint()   # the role's first checkpoint: something to roll back to
    return loop, updater, sampler, publisher, ckpt, deleted


def run_steps(loop, n):
    for _ in range(n):
        if not loop.step():
            return False
    return True


def offered_values(publisher):
    return [float(p["actor"]["w"][0]) for _, p in publisher.offers]


# ---------------------------------------------------------------------------------------------
# The loop.

def test_pipeline_settles_each_call_one_behind_and_offers_every_finite_state():
    loop, updater, _, pub, ckpt, _ = make_loop([batch() for _ in range(12)])
    assert run_steps(loop, 12)
    s = loop.state
    assert updater.calls == 12 and s.update_calls == 11 and len(s.pending) == 1   # one in flight
    assert s.sgd_steps == 22 and ckpt.latest_step() == 10      # every checkpoint_every = 5 calls
    # A snapshot is taken only when no call in flight holds one: every other call here.
    values = offered_values(pub)
    assert [v for v, _ in pub.offers] == list(range(1, len(values) + 1))
    assert values == sorted(set(values)) and len(values) >= 5
    assert all(b - a <= 2 for a, b in zip([0] + values, values))
    assert ckpt.saves[10][1] == {"params_version": sum(v <= 10 for v in values),
                                 "update_calls": 10, "env_steps": 0}
    assert loop.step()   # the scripted data is used up: the rate limiter holds; drained, offered
    assert s.update_calls == 12 and not s.pending and offered_values(pub)[-1] == 12
    n = len(pub.published)
    finished = loop.finish()
    assert not finished and pub.stopped
    assert len(pub.published) == n   # the newest state was published already
    assert ckpt.latest_step() == 12 and loop.summary()["stopped_by"] == "signal"


def test_publish_every_spaces_the_versions():
    loop, *_, pub, _, _ = make_loop([batch() for _ in range(13)], publish_every=3)
    run_steps(loop, 14)
    assert [v for v, _ in pub.offers] == [1, 2, 3, 4]
    assert offered_values(pub) == [3.0, 6.0, 9.0, 12.0]   # at least 3 settled calls apart
    assert loop.state.update_calls == 13 and loop.state.dirty   # 13: no version yet


def test_nonfinite_batch_rows_are_not_used_and_deleted_from_replay():
    bad = batch(3, keys=[7, 8, 9])
    bad.data["state"][1, 0, 0] = np.nan
    loop, updater, _, _, _, deleted = make_loop([batch(), bad, batch()])
    nonfinite0 = M.NONFINITE_SEGMENTS._value.get()
    run_steps(loop, 3)
    assert updater.calls == 2                                  # the bad batch never dispatched
    assert [k.tolist() for k in deleted] == [[8]]
    assert M.NONFINITE_SEGMENTS._value.get() == nonfinite0 + 1


def test_nonfinite_update_rolls_back_to_the_checkpoint_and_drops_the_call_on_top():
    loop, updater, _, pub, ckpt, _ = make_loop([batch() for _ in range(12)], nan_calls={8})
    nonfinite0 = M.NONFINITE._value.get()
    run_steps(loop, 13)
    s = loop.state
    # Calls 1-7 settled (checkpoint at 5), 8 was NaN: back to the state of call 5, and call 9,
    # dispatched on top of the NaN state, dropped; calls 10-12 go on from call 5's params.
    assert M.NONFINITE._value.get() == nonfinite0 + 1 and s.bad_in_a_row == 0
    assert s.update_calls == 10 and s.sgd_steps == 2 * 8
    assert float(updater.state.actor_params["w"][0]) == 5 + 3   # call 5's params + 3 calls
    values = offered_values(pub)
    assert all(np.isfinite(v) for v in values) and max(values) <= 8
    back = [i for i, (a, b) in enumerate(zip(values, values[1:])) if b <= a]
    assert len(back) == 1 and values[back[0] + 1] >= 6   # one step back: to call 5's line
    assert [v for v, _ in pub.offers] == list(range(1, len(values) + 1))


def test_ten_nonfinite_updates_in_a_row_end_the_loop_with_exit_code_1(tmp_path):
    loop, *_, pub, _, _ = make_loop([batch() for _ in range(30)], tmp_path,
                                    nan_calls=set(range(1, 31)))
    loop.run()
    assert loop.state.exit_code == 1 and loop.state.bad_in_a_row == 10
    assert not loop.finish() and not os.path.exists(tmp_path / "finished.json")


def test_replay_unavailable_backs_off_and_makes_a_new_sampler():
    made = []
    sampler = ScriptedSampler([ReplayUnavailable("gone"), batch(), batch()])
    loop = LearnerLoop(SETTINGS, CountingUpdater(), lambda: made.append(1) or sampler,
                       RecordingPublisher(), InMemoryCheckpointer(), log=Log())
    run_steps(loop, 3)
    assert len(made) == 2 and sampler.closed and loop.state.update_calls == 1


def test_budget_owed_calls_then_final_version_with_finished_and_the_marker(tmp_path):
    """At the budget the loop does exactly the calls the UTD rule still owes, then finish()
    checkpoints, publishes a NEW version with finished=1 and writes the marker."""
    inserts = {"n": 4}   # the prefill: 400 env steps
    loop, updater, _, pub, ckpt, _ = make_loop([batch() for _ in range(200)], tmp_path,
                                               inserts=lambda: inserts["n"],
                                               total_env_steps=1200)
    run_steps(loop, 30)
    assert loop.state.phase == TRAIN and loop.state.update_calls + len(loop.state.pending) == 30
    inserts["n"] = 12    # 1,200 env steps: 0.2 x 800 = 160 SGD steps = 80 calls in all
    loop.step()
    assert loop.state.phase == OWED and loop.state.owed_calls == 80 - 30   # at 30 settled
    loop.run()
    s = loop.state
    assert s.phase == DONE and s.update_calls == 80 and s.sgd_steps == 160
    assert updater.calls == 80 and s.env_steps == 1200
    last_offered = pub.offers[-1][0]
    assert loop.finish()
    version, params = pub.published[-1]
    assert version == last_offered + 1 == s.params_version
    assert params["progress"]["finished"] == 1 and params["progress"]["env_steps"] == 1200
    assert params["progress"]["sgd_steps"] == 160
    assert all(p["progress"]["finished"] == 0 for _, p in pub.offers)
    assert ckpt.saves[80][1]["params_version"] == version     # checkpointed before published
    marker = read_marker(str(tmp_path / "finished.json"))
    assert {k: marker[k] for k in ("env_steps", "sgd_steps", "budget_env_steps",
                                   "params_version")} == {
        "env_steps": 1200, "sgd_steps": 160, "budget_env_steps": 1200, "params_version": version}
    assert marker["time"] > 0 and M.FINISHED._value.get() == 1
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]   # written by rename
    summary = loop.summary()
    assert summary["stopped_by"] == "budget" and summary["utd"] == pytest.approx(0.2)


def test_rate_limiter_holding_the_owed_calls_ends_the_loop_without_them(tmp_path):
    inserts = {"n": 12}
    loop, updater, *_ = make_loop([batch() for _ in range(5)], tmp_path,
                                  inserts=lambda: inserts["n"], total_env_steps=1200)
    loop.run()
    assert loop.state.phase == DONE and updater.calls == 5 and loop.state.update_calls == 5
    assert any("rate limiter holds" in m for _, m in loop.log.lines)
    assert loop.finish() and json.loads((tmp_path / "finished.json").read_text())["sgd_steps"] == 10


def test_env_steps_counter_never_goes_backwards():
    counter = M.HighWater(M.prom.Counter("crl_test_high_water", "test"))
    for v in (0, 300, 200, 500, 500, 100):   # a replay restored from an older checkpoint
        counter.advance(v)
    assert counter.counter._value.get() == 500


def test_loop_state_counters_are_what_a_checkpoint_holds():
    s = LoopState(params_version=3, update_calls=4, env_steps=5, sgd_steps=8)
    assert s.counters() == {"params_version": 3, "update_calls": 4, "env_steps": 5}


# ---------------------------------------------------------------------------------------------
# learner.finish_grace_s

def test_finish_grace_s_default_validation_and_help():
    from app.cli_help import field_descriptions
    assert C.load().learner.finish_grace_s == 30.0
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(C.ConfigError, match="learner.finish_grace_s"):
            C.load(overrides={"learner.finish_grace_s": bad})
    assert "final params" in field_descriptions()["learner.finish_grace_s"]
