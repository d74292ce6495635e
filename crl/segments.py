"""The trajectory segment: the unit actors write to replay and the learner samples.

A segment holds `T` consecutive steps of ONE environment, time-major. Episodes may start and end
anywhere inside it; `episode_id` tells which steps belong together, so relabelling never picks a
goal from another episode. Actors never choose training goals: the learner relabels.

    state          [T, state_dim]  float32  observation without the goal (obs[:state_dim])
    action         [T, action_dim] float32  the action taken in `state` (in [-1, 1])
    episode_id     [T]             int32    equal ids = same episode (unique per actor and env)
    truncation     [T]             float32  1.0 where the episode ended by its time limit
    params_version [T]             int32    version of the policy params that chose the action

Stored layout (`segment_spec(..., unroll_length=U)` with U < T): actors write one cell per env and
unroll ([U, ...], replay/writer.py), so an item (a window) references the last k = ceil(T / U)
unroll cells of its env and is stored as [k, U, ...]; `window_of` turns a sampled batch
[N, k, U, ...] back into the window [N, T, ...] (the last T of its k * U steps).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

FIELDS = ("state", "action", "episode_id", "truncation", "params_version")


def cells_per_window(length: int, unroll_length: int) -> int:
    """k: unroll cells an item references (k * U >= T)."""
    return -(-length // unroll_length)


def segment_spec(state_dim: int, action_dim: int, length: int,
                 unroll_length: Optional[int] = None) -> Dict[str, Tuple[tuple, np.dtype]]:
    """{field: (shape, dtype)} of one segment; the Reverb table signature is built from this.

    unroll_length U < length: the stored layout [k, U, ...] (module docstring)."""
    lead: tuple = (length,)
    if unroll_length and unroll_length < length:
        lead = (cells_per_window(length, unroll_length), unroll_length)
    return {
        "state": (lead + (state_dim,), np.dtype(np.float32)),
        "action": (lead + (action_dim,), np.dtype(np.float32)),
        "episode_id": (lead, np.dtype(np.int32)),
        "truncation": (lead, np.dtype(np.float32)),
        "params_version": (lead, np.dtype(np.int32)),
    }


def window_of(data: Dict[str, np.ndarray], length: int) -> Dict[str, np.ndarray]:
    """A batch in the stored layout {field: [N, k, U, ...]} -> the windows {field: [N, T, ...]}
    (the last T = length of the k * U steps); a batch already [N, T, ...] is returned as is."""
    if data["episode_id"].ndim == 2:
        return data
    out = {}
    for k, v in data.items():
        flat = v.reshape((v.shape[0], v.shape[1] * v.shape[2]) + v.shape[3:])
        out[k] = flat[:, flat.shape[1] - length:]
    return out
