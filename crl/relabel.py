"""Goal relabelling on device: future states of the same episode become training goals.

For the step at time t of a segment, the goal is the goal slice of the state at time j = t + k,
k >= 1, with P(k) ∝ discount^k, truncated to the steps of the SAME episode stored in the segment.
If t is the last stored step of its episode, it is its own goal. Sampling is by inverse CDF of the
truncated geometric law: O(T) per segment instead of a [T, T] probability matrix.
"""
from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp


def last_step_of_episode(episode_id):
    """[T] int -> [T] index of the last step in the segment with the same episode as step t.

    Episodes are contiguous runs of equal ids; a reverse scan carries the run's end.
    """
    T = episode_id.shape[0]
    same_as_next = jnp.concatenate([episode_id[:-1] == episode_id[1:], jnp.array([False])])

    def body(end_of_next, t_and_same):
        t, same = t_and_same
        end = jnp.where(same, end_of_next, t)
        return end, end

    _, ends = jax.lax.scan(body, T - 1, (jnp.arange(T), same_as_next), reverse=True)
    return ends


def sample_future_offsets(key, n_future, discount: float):
    """Offsets k in 1..n with P(k) ∝ discount^k (truncated geometric); 0 where n == 0."""
    u = jax.random.uniform(key, n_future.shape, minval=0.0, maxval=1.0)
    n = n_future.astype(jnp.float32)
    # CDF(k) = (1 - g^k) / (1 - g^n)  =>  k = ceil(log(1 - u (1 - g^n)) / log g)
    tail = 1.0 - u * (1.0 - discount ** n)
    k = jnp.ceil(jnp.log(tail) / jnp.log(discount))
    k = jnp.clip(k, 1.0, jnp.maximum(n, 1.0))
    return jnp.where(n_future > 0, k, 0.0).astype(jnp.int32)


def relabel_segment(key, state, episode_id, discount: float, goal_indices: Sequence[int]):
    """One segment: state [T, S], episode_id [T] -> (goal [T, G], goal time index [T])."""
    T = state.shape[0]
    t = jnp.arange(T)
    n_future = last_step_of_episode(episode_id) - t
    j = t + sample_future_offsets(key, n_future, discount)
    goal = state[j][:, jnp.asarray(goal_indices)]
    return goal, j


def relabel(key, segments: Dict[str, jax.Array], discount: float, goal_indices: Sequence[int]):
    """Batch of segments {state [N, T, S], action [N, T, A], episode_id [N, T]} ->
    flat transitions {state [N*T, S], action [N*T, A], goal [N*T, G]}."""
    state, action = segments["state"], segments["action"]
    N, T = state.shape[:2]
    keys = jax.random.split(key, N)
    goal, _ = jax.vmap(relabel_segment, in_axes=(0, 0, 0, None, None))(
        keys, state, segments["episode_id"], discount, tuple(goal_indices))
    return {
        "state": state.reshape(N * T, -1),
        "action": action.reshape(N * T, -1),
        "goal": goal.reshape(N * T, -1),
    }
