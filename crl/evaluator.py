"""The evaluator role: deterministic episodes with the newest params, per params version.

Polls the ParameterService every `eval.interval_s`; for each new version runs `eval.num_envs`
episodes with tanh(mean) actions (crl.rollout.Unroller.evaluate, as the driver does), exports
time at goal and success, and appends a line to <run_dir>/eval.jsonl.

An evaluation is one compiled call that can take minutes (long episodes, slow CPUs), and a
compiled call cannot be interrupted. The evaluator keeps no state (every finished evaluation is
already in eval.jsonl), so a stop during an evaluation abandons it: the call runs on a worker
thread, and on SIGTERM the process logs what it abandoned and exits 0 at once (os._exit: the
interpreter cannot be finalised under a running XLA call).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Optional

import jax
import prometheus_client as prom

from crl import metrics as M
from crl.config import Config
from crl.envs import make_env
from crl.networks import CRLNetworks
from crl.params_service import client_from_config, security_from_config
from crl.rollout import Unroller

TIME_AT_GOAL = prom.Gauge("crl_eval_time_at_goal", "Mean steps at goal per episode (0..episode length)")
SUCCESS = prom.Gauge("crl_eval_success", "Fraction of episodes that reached the goal")
VERSION = prom.Gauge("crl_eval_params_version", "Params version of the last evaluation")
EVALS = prom.Counter("crl_eval_evaluations_total", "Evaluations run")
EVAL_SECONDS = prom.Gauge("crl_eval_seconds", "Duration of the last evaluation")


def run(cfg: Config, stop: Optional[threading.Event] = None, log=None) -> int:
    log = log or M.setup_logging("evaluator")
    stop = stop or threading.Event()
    security = security_from_config(cfg.service)   # fail fast on a missing Secret
    env = make_env(cfg.env.name, far_goals=cfg.eval.far_goals, goal_set=cfg.eval.goal_set)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    template = {"actor": jax.eval_shape(nets.init, jax.random.PRNGKey(0))[0]}
    unroller = Unroller(env, nets, cfg.eval.num_envs, cfg.episode_length)
    client = client_from_config(cfg, template=template, security=security)
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    history = os.path.join(cfg.run.run_dir, "eval.jsonl")
    key = jax.random.PRNGKey(cfg.run.seed + 12345)
    version = -1
    while not stop.is_set():
        try:
            got = client.get(min_version=version, subset="actor")
        except Exception as e:
            code = getattr(e, "code", None)
            log.info("no params from %s (%s)", cfg.service.params_address,
                     code().name if callable(code) else type(e).__name__)
            got = None
        if got is not None:
            version, tree = got
            t0 = time.perf_counter()
            key, k = jax.random.split(key)   # fresh episodes for each version
            log.info("evaluating version %d", version)
            result = _evaluate_unless_stopped(unroller, k, tree["actor"], stop)
            if result is None:
                log.info("stop requested during the evaluation of version %d: abandoned (nothing "
                         "to save; earlier evaluations are in %s); exiting 0", version, history)
                client.close()
                logging.shutdown()
                os._exit(0)
            row = {"params_version": version, "time_at_goal": result["time_at_goal"],
                   "success": result["success"], "unix_s": time.time()}
            EVAL_SECONDS.set(time.perf_counter() - t0)
            TIME_AT_GOAL.set(row["time_at_goal"])
            SUCCESS.set(row["success"])
            VERSION.set(version)
            EVALS.inc()
            with open(history, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("version %d: time_at_goal=%.1f success=%.2f", version, row["time_at_goal"],
                     row["success"])
        stop.wait(cfg.eval.interval_s)
    client.close()
    return 0


def _evaluate_unless_stopped(unroller: Unroller, key, actor_params,
                             stop: threading.Event) -> Optional[dict]:
    """{"time_at_goal", "success"} as floats, or None if `stop` was set before it finished."""
    out: dict = {}

    def work():
        try:
            r = unroller.evaluate(key, actor_params)
            out.update(time_at_goal=float(r["time_at_goal"]), success=float(r["success"]))
        except BaseException as e:   # re-raised on the role's thread below
            out["error"] = e

    worker = threading.Thread(target=work, name="evaluation", daemon=True)
    worker.start()
    while worker.is_alive():
        if stop.wait(0.2):
            return None
        worker.join(0.2)
    if "error" in out:
        raise out["error"]
    return out


STOP_GRACE_S = 5.0


def _exit_if_stop_hangs(stop: threading.Event, log, grace_s: float = STOP_GRACE_S) -> None:
    """Process entry only: after a stop request, exit 0 if the loop has not ended within
    grace_s. The evaluator keeps no state, and a call into a learner that is going away has
    been seen to outlast its deadline (CI: evaluator SIGKILLed 60 s after SIGTERM)."""
    def watch():
        stop.wait()
        time.sleep(grace_s)
        log.warning("did not stop within %.0fs of the stop request; exiting 0 (nothing to save)",
                    grace_s)
        logging.shutdown()
        os._exit(0)
    threading.Thread(target=watch, name="stop-watchdog", daemon=True).start()


def main(cfg: Config, args) -> int:
    def role(stop, log):
        _exit_if_stop_hangs(stop, log)
        return run(cfg, stop, log)
    return M.run_role("evaluator", cfg, args, role)
