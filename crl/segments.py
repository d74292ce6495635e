"""The trajectory segment: the unit actors write to replay and the learner samples.

A segment holds `T` consecutive steps of ONE environment, time-major. Episodes may start and end
anywhere inside it; `episode_id` tells which steps belong together, so relabelling never picks a
goal from another episode. Actors never choose training goals: the learner relabels.

    state          [T, state_dim]  float32  observation without the goal (obs[:state_dim])
    action         [T, action_dim] float32  the action taken in `state` (in [-1, 1])
    episode_id     [T]             int32    equal ids = same episode (unique per actor and env)
    truncation     [T]             float32  1.0 where the episode ended by its time limit
    params_version [T]             int32    version of the policy params that chose the action
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import numpy as np

FIELDS = ("state", "action", "episode_id", "truncation", "params_version")


class Segment(NamedTuple):
    state: np.ndarray
    action: np.ndarray
    episode_id: np.ndarray
    truncation: np.ndarray
    params_version: np.ndarray


def segment_spec(state_dim: int, action_dim: int, length: int) -> Dict[str, Tuple[tuple, np.dtype]]:
    """{field: (shape, dtype)} of one segment; the Reverb table signature is built from this."""
    return {
        "state": ((length, state_dim), np.dtype(np.float32)),
        "action": ((length, action_dim), np.dtype(np.float32)),
        "episode_id": ((length,), np.dtype(np.int32)),
        "truncation": ((length,), np.dtype(np.float32)),
        "params_version": ((length,), np.dtype(np.int32)),
    }
