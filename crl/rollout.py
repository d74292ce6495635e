"""Environment unrolls shared by the in-process driver, the actor role and the evaluator.

`Unroller.unroll` steps `num_envs` envs for T steps with the current policy in one jitted scan and
returns the trajectory segments of crl/segments.py (one per env, time-major). Episode-length
truncation and resets happen here, not in the envs: an env whose episode ended (termination or
time limit) is reset with a FRESH random key (Brax's AutoResetWrapper would replay the first
reset, i.e. the same start and goal forever) and gets a new episode id.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp

from crl.networks import CRLNetworks, deterministic_action, sample_action


class ActorState(NamedTuple):
    env_state: Any              # vmapped brax State
    steps: jax.Array            # [E] int32 steps taken in the current episode
    episode_id: jax.Array       # [E] int32 id of the current episode of each env
    next_episode_id: jax.Array  # scalar int32: next id to hand out
    key: jax.Array


class Unroller:
    """Jitted reset/unroll/evaluate for one env and network family."""

    def __init__(self, env, nets: CRLNetworks, num_envs: int, episode_length: int):
        self.env, self.nets = env, nets
        self.num_envs, self.episode_length = num_envs, episode_length
        self.state_dim = env.state_dim
        self._reset = jax.vmap(env.reset)
        self._step = jax.vmap(env.step)
        self.reset = jax.jit(self._reset_all)
        self.unroll = jax.jit(self._unroll, static_argnames=("length",))
        self.evaluate = jax.jit(self._evaluate)

    def _reset_all(self, key, episode_id_base=0) -> ActorState:
        """episode_id_base: offset so that ids differ between actors and across restarts."""
        key, k = jax.random.split(key)
        env_state = self._reset(jax.random.split(k, self.num_envs))
        ids = jnp.asarray(episode_id_base, jnp.int32) + jnp.arange(self.num_envs, dtype=jnp.int32)
        return ActorState(env_state, jnp.zeros(self.num_envs, jnp.int32), ids,
                          ids[-1] + 1, key)

    def _unroll(self, state: ActorState, actor_params, params_version, length: int):
        """T = length steps -> (ActorState, segments {field: [E, T, ...]}, episode stats)."""

        def step(carry: ActorState, _):
            key, k_act, k_reset = jax.random.split(carry.key, 3)
            obs = carry.env_state.obs
            mean, log_std = self.nets.policy(actor_params, obs)
            action, _ = sample_action(mean, log_std, k_act)
            nxt = self._step(carry.env_state, action)
            steps = carry.steps + 1
            truncated = (steps >= self.episode_length) & (nxt.done < 0.5)
            ended = (nxt.done > 0.5) | truncated
            record = {
                "state": obs[:, : self.state_dim],
                "action": action,
                "episode_id": carry.episode_id,
                "truncation": truncated.astype(jnp.float32),
                "params_version": jnp.full(self.num_envs, params_version, jnp.int32),
                "success": nxt.metrics["success"],
                "ended": ended,
            }
            # Reset only when some env ended (a real branch: resets of physics envs cost).
            def reset_ended():
                fresh = self._reset(jax.random.split(k_reset, self.num_envs))
                return jax.tree_util.tree_map(
                    lambda f, n: jnp.where(ended.reshape((-1,) + (1,) * (n.ndim - 1)), f, n),
                    fresh, nxt)

            env_state = jax.lax.cond(jnp.any(ended), reset_ended, lambda: nxt)
            new_ids = carry.next_episode_id + jnp.cumsum(ended.astype(jnp.int32)) - 1
            episode_id = jnp.where(ended, new_ids, carry.episode_id)
            next_episode_id = carry.next_episode_id + jnp.sum(ended.astype(jnp.int32))
            steps = jnp.where(ended, 0, steps)
            return ActorState(env_state, steps, episode_id, next_episode_id, key), record

        state, rec = jax.lax.scan(step, state, None, length=length)
        # [T, E, ...] -> [E, T, ...]: one segment per env.
        segments = {k: jnp.swapaxes(rec[k], 0, 1) for k in
                    ("state", "action", "episode_id", "truncation", "params_version")}
        stats = {"episodes": jnp.sum(rec["ended"]), "success_steps": jnp.sum(rec["success"])}
        return state, segments, stats

    def _evaluate(self, key, actor_params) -> Dict[str, jax.Array]:
        """Deterministic policy, num_envs envs, one episode each.

        time_at_goal: steps with success in the episode (0..episode_length), counted until the
        episode terminates; success: reached the goal at any time.
        """
        env_state = self._reset(jax.random.split(key, self.num_envs))

        def step(carry, _):
            env_state, alive, at_goal, reached = carry
            mean, _ = self.nets.policy(actor_params, env_state.obs)
            nxt = self._step(env_state, deterministic_action(mean))
            success = nxt.metrics["success"] * alive
            alive = alive * (1.0 - nxt.done)
            return (nxt, alive, at_goal + success, jnp.maximum(reached, success)), None

        zeros = jnp.zeros(self.num_envs)
        (_, _, at_goal, reached), _ = jax.lax.scan(
            step, (env_state, zeros + 1.0, zeros, zeros), None, length=self.episode_length)
        return {"time_at_goal": jnp.mean(at_goal), "success": jnp.mean(reached),
                "time_at_goal_per_env": at_goal}


@functools.lru_cache(maxsize=None)
def random_policy_time_at_goal(env_name: str, episode_length: int, num_envs: int = 256,
                               seed: int = 0) -> float:
    """Baseline: mean time at goal of uniformly random actions (for learning tests/reports)."""
    from crl.envs import make_env
    env = make_env(env_name)
    reset, stepf = jax.vmap(env.reset), jax.vmap(env.step)

    @jax.jit
    def run(key):
        k_reset, k_act = jax.random.split(key)
        s = reset(jax.random.split(k_reset, num_envs))

        def step(carry, k):
            s, alive, total = carry
            a = jax.random.uniform(k, (num_envs, env.action_size), minval=-1.0, maxval=1.0)
            n = stepf(s, a)
            total = total + n.metrics["success"] * alive
            return (n, alive * (1.0 - n.done), total), None

        z = jnp.zeros(num_envs)
        (_, _, total), _ = jax.lax.scan(step, (s, z + 1.0, z), jax.random.split(k_act, episode_length))
        return jnp.mean(total)

    return float(run(jax.random.PRNGKey(seed)))
