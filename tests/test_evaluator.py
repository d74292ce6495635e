"""The evaluator role as a real process against a real ParameterService on 127.0.0.1.

An evaluation is one compiled call that may outlast the launcher's stop bound (CI saw an ant
evaluation SIGKILLed after 60 s). SIGTERM during an evaluation must end the process with exit 0
within seconds, with every earlier evaluation kept in eval.jsonl and no partial line.
"""
from __future__ import annotations

import json
import signal
import time

import jax

from crl import config as C
from crl.envs import make_env
from crl.networks import CRLNetworks
from crl.params_service import ParameterServer
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
        server.publish({"actor": actor_params}, 0)
        args = ["evaluate", "--metrics-port", free_port(),
                "--service.params_address", f"127.0.0.1:{server.port}"]
        for k, v in overrides.items():
            args += [f"--{k}", v]
        proc = start_role(args, log_path)
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
