"""The goal-conditioned environment contract every environment of the project follows.

Environments speak Brax's `Env` API (reset(rng) -> State, step(State, action) -> State), so Brax's
wrappers (episode length, auto-reset, vmap) apply unchanged to physics and pure-JAX envs alike.

Observation layout (what the actor sees): obs = concat(state[:state_dim], goal[:goal_dim]).
The goal lives in the same space as `state[goal_indices]`, which is what relabelling uses: the goal
of a transition is `future_state[goal_indices]`.

Per-step metrics every env sets in `State.metrics`:
  "success": 1.0 when ||state[goal_indices] - goal|| < goal_reach_thresh, else 0.0
  "dist":    that distance
Reward equals "success" (sparse); CRL does not read it, evaluation sums it to "time at goal".
"""
from __future__ import annotations

from typing import Tuple

from brax.envs.base import Env


class GoalEnv(Env):
    """Base class: subclasses set these attributes in __init__."""

    state_dim: int
    goal_indices: Tuple[int, ...]
    goal_reach_thresh: float

    @property
    def goal_dim(self) -> int:
        return len(self.goal_indices)

    @property
    def observation_size(self) -> int:
        return self.state_dim + self.goal_dim
