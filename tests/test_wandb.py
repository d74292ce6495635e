"""Weights & Biases logging (run.wandb), offline: the roles' writers make one W&B run each,
grouped by the run directory, read back from <run_dir>/wandb with W&B's own record reader (a
whole `crl train` run against its TensorBoard curves: tests/test_tensorboard.py). Skipped where
the `wandb` extra is not installed; the config checks run always."""
from __future__ import annotations

import pytest

from crl import config as C
from crl import wandb_sink
from crl.tensorboard import ScalarWriter, read_scalars

needs_wandb = pytest.mark.skipif(
    not wandb_sink.installed(),
    reason="wandb is not installed (uv sync --frozen --extra test, or --extra wandb, installs it)")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")      # belt and braces: nothing leaves the host
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _small(tmp_path, **extra):
    return C.load(overrides={"run.run_dir": str(tmp_path), "run.wandb": "offline",
                             "network.actor.width": 32, "network.critic.width": 32,
                             "env.num_envs": 16, "replay.min_size_steps": 3200,
                             "learner.total_env_steps": 8000, "algo.batch_size": 64,
                             "learner.segments_per_call": 8, "learner.minibatches_per_call": 2,
                             **extra})


@needs_wandb
def test_role_writers_are_runs_of_one_group_and_steps_only_go_forward(tmp_path):
    cfg = _small(tmp_path, **{"run.wandb_project": "crl-test"})
    learner = ScalarWriter.for_run(cfg, "learner")
    evaluator = ScalarWriter.for_run(cfg, "evaluator")
    learner.write(3200, {"critic_loss": 2.5, "nan": float("nan"), "text": "no"})
    learner.write(6400, {"critic_loss": 2.0})
    learner.write(4800, {"critic_loss": 9.0})     # behind: TensorBoard takes it, W&B cannot
    evaluator.write(6400, {"time_at_goal": 7.0}, "eval/")
    learner.close()
    evaluator.close()
    runs = {}
    for path in wandb_sink.offline_runs(str(tmp_path)):
        run, rows = wandb_sink.read_offline_run(path)
        runs[run["job_type"]] = (run, [{k: v for k, v in r.items() if not k.startswith("_")
                                        or k == "_step"} for r in rows])
    assert sorted(runs) == ["evaluator", "learner"]
    assert {r["group"] for r, _ in runs.values()} == {tmp_path.name}
    assert {r["project"] for r, _ in runs.values()} == {"crl-test"}
    assert runs["learner"][1] == [{"_step": 3200, "critic_loss": 2.5},
                                  {"_step": 6400, "critic_loss": 2.0}]
    assert runs["evaluator"][1] == [{"_step": 6400, "eval/time_at_goal": 7.0}]
    assert read_scalars(str(tmp_path / "tb" / "learner"))["critic_loss"] == [
        (3200, 2.5), (6400, 2.0), (4800, 9.0)]


def test_config_names_the_extra_when_wandb_is_missing_simulated(monkeypatch):
    """The missing package is simulated (wandb_sink.installed -> False): where the extra is
    installed it cannot be absent for real."""
    monkeypatch.setattr(wandb_sink, "installed", lambda: False)
    assert C.load(overrides={"run.wandb": "off"}).run.wandb == "off"   # off needs nothing
    with pytest.raises(C.ConfigError, match=r"run.wandb = 'offline'.*uv sync --frozen --extra "
                                            r"wandb.*or set run.wandb off"):
        C.load(overrides={"run.wandb": "offline"})


def test_config_checks_wandb_fields(tmp_path):
    with pytest.raises(C.ConfigError, match=r"run.wandb: 'cloud' is not allowed; choose one of "
                                            r"\['off', 'offline', 'online'\]"):
        C.load(overrides={"run.wandb": "cloud"})
    with pytest.raises(C.ConfigError, match=r"run.wandb_project = 'a/b': must be a W&B project"):
        C.load(overrides={"run.wandb": "offline", "run.wandb_project": "a/b"})
    with pytest.raises(C.ConfigError, match=r"run.wandb_entity = 'my team': must be a W&B "):
        C.load(overrides={"run.wandb": "online", "run.wandb_entity": "my team"})
    assert C.load(overrides={"run.wandb_project": ""}).run.wandb == "off"   # unused when off
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  wandb: off\n")     # YAML 1.1 reads a bare off as false
    assert C.load(str(path)).run.wandb == "off"
    assert "wandb: 'off'" in C.dumps(C.load(str(path)))   # and writes it back quoted
