"""The evaluator role as a real process against a real ParameterService on 127.0.0.1.

Evaluations sit on the env-step axis: every params version carries the learner's env and SGD
steps, and with eval.every_env_steps the evaluator evaluates the first version at or past each
point; every eval.jsonl row holds env steps, SGD steps, version and wall time.

An evaluation is one compiled call that may outlast the launcher's stop bound (CI saw an ant
evaluation SIGKILLed after 60 s). SIGTERM during an evaluation must end the process with exit 0
within seconds, with every earlier evaluation kept in eval.jsonl and no partial line.
"""
from __future__ import annotations

import json
import signal
import time

import jax
import pytest

from crl import config as C
from crl.envs import make_env
from evaluator.role import EvalSchedule
from crl.learning import PROGRESS_KEY, progress_of
from crl.networks import CRLNetworks
from params import ParameterServer
from helpers import free_port, start_role, stop_process, wait_for


def test_sigterm_during_a_long_evaluation_exits_0_at_once(tmp_path):
    # Ant, 1000-step episodes: one evaluation takes tens of seconds on these CPUs.
    overrides = {"env.name": "ant", "env.episode_length": 1000, "eval.num_envs": 16,
                 "eval.interval_s": 0.5, "network.actor.width": 32, "network.critic.width": 32,
                 "replay.min_size_steps": 32_000,
                 "run.run_dir": str(tmp_path)}
    cfg = C.load(overrides=overrides)
    env = make_env("ant")
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    actor_params = nets.init(jax.random.PRNGKey(0))[0]
    server = ParameterServer("127.0.0.1:0").start()
    log_path = tmp_path / "evaluator.log"
    proc = None
    try:
        server.publish({"actor": actor_params, PROGRESS_KEY: progress_of(0, 0)}, 0)
        proc = start_evaluator(server, overrides, log_path)
        wait_for(lambda: "evaluating version 0" in log_path.read_text() or proc.poll() is not None,
                 300, "the evaluator to start evaluating version 0")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(2.0)   # well inside the evaluation (compile + 1000 steps x 16 ants)
        assert "version 0: time_at_goal" not in log_path.read_text(), "evaluation too short"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        stop_s = time.monotonic() - t0
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc)
        server.stop(None)
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    assert stop_s < 10, f"took {stop_s:.1f}s to stop"
    assert "abandoned" in log, log[-3000:]
    history = tmp_path / "eval.jsonl"
    rows = [json.loads(l) for l in history.read_text().splitlines()] if history.exists() else []
    assert all("time_at_goal" in r for r in rows)   # no partial line


def test_schedule_points_on_the_env_step_axis():
    s = EvalSchedule(1000)
    assert s.due(0) and s.evaluated(0) == 0 and s.next_point == 1000
    assert not s.due(999) and s.due(1000)
    assert s.evaluated(1250) == 0 and s.next_point == 2000     # the version at or past 1000
    assert s.evaluated(4100) == 2 and s.next_point == 5000     # 2000 and 3000 were passed over
    assert s.skipped == 2
    every = EvalSchedule(0)                                     # wall clock: every version
    assert every.due(0) and every.evaluated(123) == 0 and every.due(0)


def test_evaluations_on_the_env_step_axis_with_env_and_sgd_steps(tmp_path):
    """A learner stand-in publishes a version every 0.3 s, 500 env steps apart; with
    eval.every_env_steps = 2000 the evaluator evaluates exactly the first version at or past each
    multiple of 2000 it sees, and each row carries that version's env and SGD steps."""
    overrides, actor_params = maze_every_2000(tmp_path)
    server = ParameterServer("127.0.0.1:0").start()
    log_path = tmp_path / "evaluator.log"
    history = tmp_path / "eval.jsonl"
    proc = None
    published = {}
    try:
        server.publish({"actor": actor_params, PROGRESS_KEY: progress_of(0, 0)}, 0)
        published[0] = (0, 0)
        proc = start_evaluator(server, overrides, log_path)
        wait_for(lambda: history.exists() or proc.poll() is not None, 240,
                 "the first evaluation")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        for v in range(1, 25):   # 500 env steps (and 7 SGD steps) per version
            published[v] = (500 * v, 7 * v)
            server.publish({"actor": actor_params, PROGRESS_KEY: progress_of(*published[v])}, v)
            time.sleep(0.3)
        wait_for(lambda: len(history.read_text().splitlines()) >= 4, 60, "four evaluations")
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc)
        server.stop(None)
    rows = [json.loads(l) for l in history.read_text().splitlines()]
    for r in rows:
        assert {"params_version", "env_steps", "sgd_steps", "unix_s", "time_at_goal"} <= set(r)
        assert (r["env_steps"], r["sgd_steps"]) == published[r["params_version"]]   # its own tags
    env_steps = [r["env_steps"] for r in rows]
    assert env_steps == sorted(env_steps) and env_steps[0] == 0
    points = [e // 2000 for e in env_steps]
    assert len(set(points)) == len(points), env_steps          # one evaluation per point
    # TensorBoard: the same evaluations, each at its version's env steps.
    from crl.tensorboard import read_scalars
    curves = read_scalars(str(tmp_path / "tb" / "evaluator"))
    assert [s for s, _ in curves["eval/time_at_goal"]] == env_steps
    assert [v for _, v in curves["eval/sgd_steps"]] == [r["sgd_steps"] for r in rows]
    # The first version at or past its point, unless the evaluator was still busy at that point
    # (then a later one; the point is logged as skipped only when it was passed over entirely).
    assert sum(e % 2000 == 0 for e in env_steps) >= 2, env_steps


def maze_every_2000(run_dir):
    """(overrides, actor params): a small maze evaluator with points every 2000 env steps."""
    overrides = {"env.name": "point_maze_u", "env.episode_length": 100, "eval.num_envs": 4,
                 "eval.interval_s": 0.05, "eval.every_env_steps": 2000,
                 "network.actor.width": 32, "network.critic.width": 32,
                 "run.run_dir": str(run_dir)}
    cfg = C.load(overrides=overrides)
    env = make_env("point_maze_u")
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    return overrides, nets.init(jax.random.PRNGKey(0))[0]


def start_evaluator(server, overrides, log_path):
    args = ["evaluate", "--metrics-port", free_port(),
            "--service.params_address", f"127.0.0.1:{server.port}"]
    for k, v in overrides.items():
        args += [f"--{k}", v]
    return start_role(args, log_path)


@pytest.mark.parametrize("final_env_steps, evaluated", [(2000, [0, 2000]), (1000, [0])],
                         ids=["point-owed", "no-point-owed"])
def test_final_version_is_evaluated_if_a_point_is_owed_then_exit_0(tmp_path, final_env_steps,
                                                                    evaluated):
    """Contract B: the learner publishes its final version (progress finished = 1). With points
    every 2000 env steps and 0 evaluated, a final version at 2000 owes the point 2000: it is
    evaluated and its row written; at 1000 no point is owed: no row. Either way the evaluator
    logs "run finished at N env steps" and exits 0 by itself (no stop requested)."""
    overrides, actor_params = maze_every_2000(tmp_path)
    server = ParameterServer("127.0.0.1:0").start()
    log_path = tmp_path / "evaluator.log"
    history = tmp_path / "eval.jsonl"
    proc = rc = None
    try:
        server.publish({"actor": actor_params, PROGRESS_KEY: progress_of(0, 0)}, 0)
        proc = start_evaluator(server, overrides, log_path)
        wait_for(lambda: history.exists() or proc.poll() is not None, 240, "the first evaluation")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        server.publish({"actor": actor_params,
                        PROGRESS_KEY: progress_of(final_env_steps, 30, finished=True)}, 1)
        rc = proc.wait(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc)
        server.stop(None)
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    assert f"run finished at {final_env_steps} env steps (params version 1)" in log, log[-3000:]
    rows = [json.loads(l) for l in history.read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == evaluated
    assert [r["params_version"] for r in rows] == list(range(len(evaluated)))
    assert all("time_at_goal" in r and "success" in r for r in rows)
