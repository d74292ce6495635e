"""TensorBoard event files, read back with TensorBoard's own reader: the tags a researcher
looks for, on the env-step axis (the learner role's and the evaluator's are checked in
tests/test_learner_publisher.py and tests/test_evaluator.py). Where the wandb extra is
installed the same run also logs to an offline W&B run, which must hold the same scalars."""
from __future__ import annotations

import pytest

from crl import config as C
from crl import driver, wandb_sink
from crl.tensorboard import ScalarWriter, read_scalars


@pytest.fixture(scope="module")
def driver_run(tmp_path_factory):
    """One small `crl train` run (the in-process driver), W&B offline where installed."""
    run_dir = tmp_path_factory.mktemp("driver_run")
    cfg = C.load(overrides={"run.run_dir": str(run_dir), "network.actor.width": 32,
                            "network.critic.width": 32, "env.num_envs": 16,
                            "replay.min_size_steps": 3200, "learner.total_env_steps": 8000,
                            "algo.batch_size": 64, "learner.segments_per_call": 8,
                            "learner.minibatches_per_call": 2,
                            "run.wandb": "offline" if wandb_sink.installed() else "off"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")      # nothing leaves the host, whatever the config
        history = driver.train(cfg, num_evals=2, log=None, tensorboard=True)
    return run_dir, cfg, history


def test_crl_train_curves_are_on_env_steps(driver_run):
    run_dir, cfg, history = driver_run
    curves = read_scalars(str(run_dir / "tb" / "driver"))
    step = cfg.env.num_envs * cfg.segment_length        # env steps per unroll
    for tag in ("learner/critic_loss", "learner/actor_loss", "learner/alpha",
                "learner/critic_grad_norm", "learner/logits_pos", "eval/time_at_goal"):
        assert tag in curves, sorted(curves)
    losses = curves["learner/critic_loss"]
    assert losses and all(s % step == 0 and s > cfg.replay.min_size_steps for s, _ in losses)
    assert [s for s, _ in curves["eval/time_at_goal"]] == [r["env_steps"] for r in history]


@pytest.mark.skipif(not wandb_sink.installed(), reason="wandb is not installed (uv sync "
                    "--frozen --extra test, or --extra wandb, installs it)")
def test_offline_wandb_run_holds_the_same_scalars_at_env_steps(driver_run):
    run_dir, _, _ = driver_run
    (path,) = wandb_sink.offline_runs(str(run_dir))
    run, rows = wandb_sink.read_offline_run(path)     # W&B's own record reader
    assert run == {"group": run_dir.name, "job_type": "driver", "name": f"{run_dir.name}-driver",
                   "project": "crl-scale"}
    logged = {}   # tag -> {step: value}
    for row in rows:
        for tag, value in row.items():
            if not tag.startswith("_"):
                logged.setdefault(tag, {})[row["_step"]] = value
    curves = read_scalars(str(run_dir / "tb" / "driver"))
    assert sorted(logged) == sorted(curves)
    for tag, points in curves.items():
        # TensorBoard keeps every write; W&B one row per step with the last value written.
        last_at_step = dict(points)
        assert sorted(logged[tag]) == sorted(last_at_step), tag
        for step, value in last_at_step.items():
            assert logged[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)


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
