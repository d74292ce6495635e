"""TensorBoard event files, read back with TensorBoard's own reader: the tags a researcher
looks for, on the env-step axis (the learner role's and the evaluator's are checked in
tests/test_learner_publisher.py and tests/test_evaluator.py)."""
from __future__ import annotations

from crl import config as C
from crl import driver
from crl.tensorboard import ScalarWriter, read_scalars


def test_crl_train_curves_are_on_env_steps(tmp_path):
    cfg = C.load(overrides={"run.run_dir": str(tmp_path), "network.actor.width": 32,
                            "network.critic.width": 32, "env.num_envs": 16,
                            "replay.min_size_steps": 3200, "learner.total_env_steps": 8000,
                            "algo.batch_size": 64, "learner.segments_per_call": 8,
                            "learner.minibatches_per_call": 2})
    history = driver.train(cfg, num_evals=2, log=None, tensorboard=True)
    curves = read_scalars(str(tmp_path / "tb" / "driver"))
    step = cfg.env.num_envs * cfg.segment_length        # env steps per unroll
    for tag in ("learner/critic_loss", "learner/actor_loss", "learner/alpha",
                "learner/critic_grad_norm", "learner/logits_pos", "eval/time_at_goal"):
        assert tag in curves, sorted(curves)
    losses = curves["learner/critic_loss"]
    assert losses and all(s % step == 0 and s > cfg.replay.min_size_steps for s, _ in losses)
    assert [s for s, _ in curves["eval/time_at_goal"]] == [r["env_steps"] for r in history]


def test_writer_skips_non_numbers_and_survives_an_unwritable_directory(tmp_path):
    w = ScalarWriter(str(tmp_path), "x")
    w.write(5, {"a": 1.0, "nan": float("nan"), "text": "no", "flag": True, "n": 3})
    w.close()
    assert read_scalars(str(tmp_path / "tb" / "x")) == {"a": [(5, 1.0)], "n": [(5, 3.0)]}
    blocker = tmp_path / "file"
    blocker.write_text("")
    w = ScalarWriter(str(blocker), "y")      # <run_dir>/tb under a file: cannot be created
    w.write(1, {"a": 1.0})                   # logged once, no exception
    w.close()
