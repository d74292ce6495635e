"""The evaluator role: deterministic episodes with the newest params, per params version.

Follows the learner's params with params.follower.PolicyFollower (a poll every
`eval.interval_s`, in the background). Every params version carries the learner's env steps and
SGD steps (subset "progress", crl.learning.progress_of), so evaluations sit on the paper's axis:
with `eval.every_env_steps` (or `eval.num_evals` over the budget) the evaluator evaluates the
first version it holds at or past each point k * every (a poll fetches only the progress of the
newest version, three integers; the actor only when a point is due; points passed while an
evaluation ran are skipped, and logged); with neither, every new version it finds. An
evaluation runs `eval.num_envs` episodes with tanh(mean) actions (crl.rollout.Unroller.evaluate,
as the driver does), exports time at goal and success, and appends a line to
<run_dir>/eval.jsonl: params_version, env_steps, sgd_steps, time_at_goal, success, unix_s.

The run's final version (progress finished = 1, the learner reached its budget) is always
fetched; the evaluator evaluates it if a point is owed (the final point; with no schedule: if it
is new), writes its row, logs "run finished at N env steps" and exits 0.

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
from crl.rollout import Unroller
from crl.tensorboard import ScalarWriter
from params import client_from_config, security_from_config
from params.follower import Policy, PolicyFollower, policy_template

TIME_AT_GOAL = prom.Gauge("crl_eval_time_at_goal", "Mean steps at goal per episode (0..episode length)")
SUCCESS = prom.Gauge("crl_eval_success", "Fraction of episodes that reached the goal")
VERSION = prom.Gauge("crl_eval_params_version", "Params version of the last evaluation")
EVALS = prom.Counter("crl_eval_evaluations_total", "Evaluations run")
EVAL_DURATION = prom.Gauge("crl_eval_duration_seconds", "Duration of the last evaluation")
ENV_STEPS = prom.Gauge("crl_eval_env_steps", "Env steps of the params last evaluated")
SKIPPED = prom.Counter("crl_eval_points_skipped_total",
                       "Evaluation points passed while an evaluation ran (not evaluated)")


class EvalSchedule:
    """Which params versions to evaluate, on the env-step axis.

    every = 0: each new version. Else the points are 0, every, 2 * every, ...: a version is due
    when its env steps reach the next point not yet evaluated; after evaluating a version at E
    env steps the next point is the first multiple of `every` above E (points E passed over are
    skipped: `skipped` counts them)."""

    def __init__(self, every: int):
        self.every, self.next_point, self.skipped = int(every), 0, 0

    def due(self, env_steps: int) -> bool:
        return self.every == 0 or env_steps >= self.next_point

    def evaluated(self, env_steps: int) -> int:
        """Marks env_steps evaluated; returns the number of points it skipped."""
        if self.every == 0:
            return 0
        point = env_steps // self.every * self.every       # the newest point at or below E
        skipped = max(0, (point - self.next_point) // self.every)
        self.skipped += skipped
        self.next_point = point + self.every
        return skipped


def run(cfg: Config, stop: Optional[threading.Event] = None, log=None) -> int:
    log = log or M.setup_logging("evaluator")
    stop = stop or threading.Event()
    security = security_from_config(cfg.service)   # fail fast on a missing Secret
    env = make_env(cfg.env.name, far_goals=cfg.eval.far_goals, goal_set=cfg.eval.goal_set)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    unroller = Unroller(env, nets, cfg.eval.num_envs, cfg.episode_length)
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    history = os.path.join(cfg.run.run_dir, "eval.jsonl")
    key = jax.random.PRNGKey(cfg.run.seed + 12345)
    schedule = EvalSchedule(cfg.eval_every_env_steps)
    tb = ScalarWriter.for_run(cfg, "evaluator")
    # With a schedule a poll reads the progress of the newest version (three integers) and
    # fetches the actor params only when a point is due (or the run finished).
    follower = PolicyFollower(
        client_from_config(cfg, template=policy_template(nets), security=security),
        cfg.eval.interval_s, log=log,
        wanted=(lambda progress: schedule.due(progress["env_steps"])) if schedule.every else None)
    follower.start()
    evaluated = -1          # the last version evaluated
    while True:
        policy = follower.latest()
        if (policy is not None and policy.version > evaluated
                and schedule.due(policy.progress["env_steps"])):
            evaluated = policy.version
            key, k = jax.random.split(key)   # fresh episodes for each version
            row = _evaluate(unroller, k, policy, stop, log)
            if row is None:
                log.info("stop requested during the evaluation of version %d: abandoned (nothing "
                         "to save; earlier evaluations are in %s); exiting 0", policy.version,
                         history)
                follower.close()
                tb.close()
                logging.shutdown()
                os._exit(0)
            _record(row, history, tb)
            skipped = schedule.evaluated(row["env_steps"])
            if skipped:
                SKIPPED.inc(skipped)
                log.warning("%d evaluation point(s) of every %d env steps passed while evaluating "
                            "(evaluations are slower than training: lower eval.num_envs or raise "
                            "eval.every_env_steps)", skipped, schedule.every)
        if policy is not None and policy.finished:
            # The run's final version (evaluated above if a point was owed): nothing follows.
            log.info("run finished at %d env steps (params version %d); exiting 0",
                     policy.progress["env_steps"], policy.version)
            break
        if stop.wait(cfg.eval.interval_s):
            break
    follower.close()
    tb.close()
    return 0


def _evaluate(unroller: Unroller, key, policy: Policy, stop: threading.Event,
              log) -> Optional[dict]:
    """The eval.jsonl row of one policy; None if `stop` was set before the evaluation ended."""
    progress = policy.progress
    log.info("evaluating version %d (env_steps=%d, sgd_steps=%d)", policy.version,
             progress["env_steps"], progress["sgd_steps"])
    t0 = time.perf_counter()
    result = _evaluate_unless_stopped(unroller, key, policy.params, stop)
    if result is None:
        return None
    row = {"params_version": policy.version, "env_steps": progress["env_steps"],
           "sgd_steps": progress["sgd_steps"], "time_at_goal": result["time_at_goal"],
           "success": result["success"], "unix_s": time.time(),
           "eval_s": round(time.perf_counter() - t0, 3)}
    log.info("version %d at %d env steps: time_at_goal=%.1f success=%.2f", policy.version,
             row["env_steps"], row["time_at_goal"], row["success"])
    return row


def _record(row: dict, history: str, tb: ScalarWriter) -> None:
    """Exports one evaluation: metrics, a line of eval.jsonl, TensorBoard scalars."""
    EVAL_DURATION.set(row["eval_s"])
    TIME_AT_GOAL.set(row["time_at_goal"])
    SUCCESS.set(row["success"])
    VERSION.set(row["params_version"])
    ENV_STEPS.set(row["env_steps"])
    EVALS.inc()
    with open(history, "a") as f:
        f.write(json.dumps(row) + "\n")
    tb.write(row["env_steps"], {k: row[k] for k in ("time_at_goal", "success", "sgd_steps",
                                                    "params_version", "eval_s")}, "eval/")
    tb.flush()   # rare rows; an abandoned evaluation exits at once


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
