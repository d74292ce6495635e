"""In-process driver: the whole algorithm in one process, no servers.

env unroll -> on-device segment store -> relabel + update (compiled) -> evaluate. Used by tests
and for single-device debugging; the distributed roles call the same Unroller and Updater, so
nothing of the algorithm exists twice. The update-to-data ratio is counted like the Reverb rate
limiter counts it: gradient steps per env step inserted after the prefill (replay.min_size_steps),
by the rule the learner role uses too (crl.learning.update_calls_owed). The learner role's loop
(learner/loop.py) adds what only a distributed learner needs (pipelined calls, a publisher thread,
checkpoints and rollbacks, the budget's end); this driver keeps the synchronous form.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp

from crl.config import Config
from crl.envs import make_env
from crl.learning import Updater, update_calls_owed
from crl.rollout import Unroller
from crl.tensorboard import ScalarWriter

class SegmentStore:
    """A FIFO ring of segments kept on device: [capacity, T, ...] per field."""

    def __init__(self, capacity: int, spec: Dict[str, tuple]):
        self.capacity = capacity
        self.data = {k: jnp.zeros((capacity,) + shape, dtype) for k, (shape, dtype) in spec.items()}
        self.size = 0
        self.cursor = 0

        def insert(data, new, cursor):
            idx = (cursor + jnp.arange(next(iter(new.values())).shape[0])) % capacity
            return {k: data[k].at[idx].set(new[k]) for k in data}

        def sample(data, key, size, n):
            idx = jax.random.randint(key, (n,), 0, size)
            return {k: v[idx] for k, v in data.items()}

        self._insert = jax.jit(insert, donate_argnums=(0,))
        self._sample = jax.jit(sample, static_argnums=(3,))

    def insert(self, segments) -> None:
        n = next(iter(segments.values())).shape[0]
        self.data = self._insert(self.data, {k: segments[k] for k in self.data}, self.cursor)
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, key, n: int):
        return self._sample(self.data, key, self.size, n)


def train(cfg: Config, *, num_evals: int = 10, log: Optional[Callable[[str], None]] = print,
          return_state: bool = False,
          on_eval: Optional[Callable[[Dict[str, float], "object"], None]] = None,
          tensorboard: bool = False):
    """Trains for cfg.learner.total_env_steps env steps; returns the evaluation history
    (a list of dicts), or (history, final TrainState) with return_state=True.

    on_eval(row, train_state) is called after every evaluation (e.g. to save params of several
    points of one run). tensorboard: scalars to <run_dir>/tb/driver against env steps."""
    env = make_env(cfg.env.name)
    key = jax.random.PRNGKey(cfg.run.seed)
    k_learner, k_actor, k_eval, k_sample = jax.random.split(key, 4)
    updater = Updater(cfg, env.state_dim, env.action_size, env.goal_indices, k_learner,
                      num_devices=max(cfg.learner.num_devices, 1))
    unroller = Unroller(env, updater.learner.nets, cfg.env.num_envs, cfg.episode_length)
    eval_unroller = Unroller(make_env(cfg.env.name, far_goals=cfg.eval.far_goals,
                                      goal_set=cfg.eval.goal_set),
                             updater.learner.nets, cfg.eval.num_envs, cfg.episode_length)
    T = cfg.segment_length
    store = SegmentStore(max(cfg.replay.capacity_steps // T, cfg.env.num_envs), {
        "state": ((T, env.state_dim), jnp.float32),
        "action": ((T, env.action_size), jnp.float32),
        "episode_id": ((T,), jnp.int32)})

    actor_state = unroller.reset(k_actor)
    tb = ScalarWriter.for_run(cfg, "driver") if tensorboard else None
    env_steps = sgd_calls = 0
    history: List[Dict[str, float]] = []
    eval_interval = cfg.learner.total_env_steps / max(num_evals, 1)
    next_eval = 0.0
    t0 = time.time()
    metrics: Dict[str, float] = {}
    while True:
        if env_steps >= next_eval:
            k_eval, k = jax.random.split(k_eval)
            ev = eval_unroller.evaluate(k, updater.host_state().actor_params)
            row = {"env_steps": env_steps, "sgd_steps": sgd_calls * cfg.learner.minibatches_per_call,
                   "time_at_goal": float(ev["time_at_goal"]), "success": float(ev["success"]),
                   "wall_s": time.time() - t0, **metrics}
            history.append(row)
            if tb is not None:
                tb.write(env_steps, {k: v for k, v in row.items() if k != "env_steps"}, "eval/")
            if on_eval is not None:
                on_eval(row, updater.host_state())
            if log:
                log(f"[driver] env_steps={env_steps:,} sgd_steps={row['sgd_steps']:,} "
                    f"time_at_goal={row['time_at_goal']:.1f} success={row['success']:.2f} "
                    f"critic_loss={metrics.get('critic_loss', float('nan')):.3f} "
                    f"acc={metrics.get('categorical_accuracy', float('nan')):.3f} "
                    f"({row['wall_s']:.0f}s)")
            next_eval += eval_interval
        if env_steps >= cfg.learner.total_env_steps:
            break
        params = updater.host_state().actor_params
        actor_state, segments, _ = unroller.unroll(actor_state, params, sgd_calls, length=T)
        store.insert(segments)
        env_steps += cfg.env.num_envs * T
        owed = update_calls_owed(env_steps, sgd_calls * cfg.learner.minibatches_per_call,
                                 prefill_steps=cfg.replay.min_size_steps, utd=cfg.replay.utd,
                                 minibatches_per_call=cfg.learner.minibatches_per_call)
        for _ in range(owed):
            k_sample, k = jax.random.split(k_sample)
            metrics = updater.update(store.sample(k, cfg.learner.segments_per_call))
            sgd_calls += 1
            if tb is not None:
                tb.write(env_steps, metrics, "learner/")
    if tb is not None:
        tb.close()
    if return_state:
        return history, updater.host_state()
    return history
