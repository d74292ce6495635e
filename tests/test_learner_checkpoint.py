"""Orbax checkpoints of the learner: exact round trip, corrupt newest falls back, clear error."""
import os
import shutil

import jax
import numpy as np
import pytest

from crl import config as C
from crl.learning import make_learner
from learner.checkpoint import LearnerCheckpointer


@pytest.fixture(scope="module")
def learner():
    cfg = C.load(overrides={"network.actor.width": 16, "network.critic.width": 16})
    return make_learner(cfg, 4, 2, (0, 1))


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b)))


def test_round_trip_is_exact(tmp_path, learner):
    ts = learner.init(jax.random.PRNGKey(0))
    ck = LearnerCheckpointer(str(tmp_path))
    ck.save(3, ts, {"params_version": 7, "env_steps": 3_000_000_000, "update_calls": 3})
    ck.close()
    state, counters = LearnerCheckpointer(str(tmp_path)).restore(learner.init(jax.random.PRNGKey(1)))
    assert counters == {"params_version": 7, "env_steps": 3_000_000_000, "update_calls": 3}
    assert leaves_equal(state, ts)


def test_no_checkpoint_gives_none(tmp_path, learner):
    assert LearnerCheckpointer(str(tmp_path)).restore(learner.init(jax.random.PRNGKey(0))) is None


def test_interrupted_save_is_never_restored_and_corrupt_falls_back(tmp_path, learner):
    ts0 = learner.init(jax.random.PRNGKey(0))
    ts1 = learner.init(jax.random.PRNGKey(1))
    ck = LearnerCheckpointer(str(tmp_path))
    ck.save(1, ts0, {"params_version": 1})
    ck.save(2, ts1, {"params_version": 2})
    ck.close()
    # A save that died half way leaves only Orbax's temporary directory: it is not a step.
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-123" / "state")
    ck = LearnerCheckpointer(str(tmp_path))
    assert ck.latest_step() == 2
    # Corrupt the newest complete one: restore falls back to step 1.
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            if not f.endswith(".json") or "metadata" not in f:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    state, counters = ck.restore(learner.init(jax.random.PRNGKey(5)))
    assert counters["params_version"] == 1 and leaves_equal(state, ts0)


def test_every_checkpoint_unreadable_is_a_clear_error(tmp_path, learner):
    ck = LearnerCheckpointer(str(tmp_path))
    ck.save(1, learner.init(jax.random.PRNGKey(0)), {"params_version": 1})
    ck.close()
    shutil.rmtree(tmp_path / "1" / "state")
    os.makedirs(tmp_path / "1" / "state")
    with pytest.raises(RuntimeError, match="no readable learner checkpoint"):
        LearnerCheckpointer(str(tmp_path)).restore(learner.init(jax.random.PRNGKey(0)))


def test_nonfinite_or_overwritten_newest_falls_back_to_the_previous(tmp_path, learner):
    """Bytes overwritten inside the newest step can decode without any error (a run then
    'resumed' with NaN params that were never published); such a step is skipped."""
    ts0 = learner.init(jax.random.PRNGKey(0))
    ts1 = learner.init(jax.random.PRNGKey(1))
    nan = ts1._replace(critic_params=jax.tree_util.tree_map(lambda x: x * np.nan,
                                                            ts1.critic_params))
    ck = LearnerCheckpointer(str(tmp_path / "a"))
    ck.save(1, ts0, {"params_version": 1})
    ck.save(2, nan, {"params_version": 2})
    state, counters = ck.restore(learner.init(jax.random.PRNGKey(5)))
    assert counters["params_version"] == 1 and leaves_equal(state, ts0)
    ck.close()

    ck = LearnerCheckpointer(str(tmp_path / "b"))
    ck.save(1, ts0, {"params_version": 1})
    ck.save(2, ts1, {"params_version": 2})
    ck.close()
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "b" / "2" / "state")
             for f in fs if "metadata" not in f and not f.endswith(".json")]
    biggest = max(files, key=os.path.getsize)
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as fh:   # the same length, the middle half 0xFF (NaN as float32)
        fh.seek(size // 4)
        fh.write(b"\xff" * (size // 2))
    state, counters = LearnerCheckpointer(str(tmp_path / "b")).restore(
        learner.init(jax.random.PRNGKey(5)))
    assert counters["params_version"] == 1 and leaves_equal(state, ts0)
