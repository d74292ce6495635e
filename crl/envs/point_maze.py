"""Pure-JAX point mass in a maze: the fast environment of learning tests and examples.

No physics engine: a disc-shaped point mass (radius `agent_radius`) moves on the maze plane of
crl.envs.mazes (cell (i, j) has its centre at ((i - i_R), (j - j_R)) * cell_size; the start cell
is the origin). Everything is jit- and vmap-friendly and steps at millions of env-steps/s on CPU.

State (`state_dim` = 4): (x, y, vx, vy). x, y are the world position (`goal_indices` = (0, 1));
vx, vy is the last step's actual displacement divided by the per-step maximum, so it lies in
[-1, 1]. Observation: concat(x, y, vx, vy, goal_x, goal_y) (6 floats).

Dynamics, per step, with a = clip(action, -1, 1):
  v_cmd = a * max_speed                                  (cells per step, per axis)
  v     = inertia * v_prev + (1 - inertia) * v_cmd         (first-order lag: momentum/damping)
  move by v along x, then along y, each move swept against every wall box grown by the agent
  radius (Minkowski sum): the move stops at the first face it would cross. The sweep is exact, so
  nothing tunnels whatever the speed, and the agent never ends inside a wall: its centre stays
  outside every wall box grown by `agent_radius` on all sides (a conservative square around the
  disc). The actual displacement becomes the new velocity (blocked components drop to zero).

Reset: agent at the start-cell centre plus uniform noise in [-reset_noise, reset_noise]^2; goal at
the centre of a uniformly random goal cell of the layout (crl.envs.mazes: the 'G' cells; a layout
without them, every free cell other than the start) plus uniform noise in
[-goal_noise, goal_noise]^2. With far_goals=True the goal cell is drawn only among the farthest
third of those cells by BFS path distance from the start (the paper's "far goals" evaluation):
the ceil(n/3) farthest cells, plus every cell tied with the nearest of them.

Step: reward = success = ||(x, y) - goal|| < goal_reach_thresh (0/1 float); metrics {"success",
"dist"}; done = 0 always (episode-length truncation and auto-reset belong to the rollout code).
All the step needs lives in `State.pipeline_state` (a `PointMazeState`: pos, vel, goal), so Brax's
auto-reset wrapper, which swaps pipeline_state and obs, resets it whole.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import State
from flax import struct

from crl.envs import mazes
from crl.envs.base import GoalEnv


@struct.dataclass
class PointMazeState:
    pos: jax.Array   # [2] world (x, y)
    vel: jax.Array   # [2] last displacement / max displacement, in [-1, 1]
    goal: jax.Array  # [2] world (x, y) of the goal


def far_goal_mask(dist: np.ndarray) -> np.ndarray:
    """Boolean mask over `dist` (BFS distances of the candidate goal cells): the farthest third,
    i.e. the ceil(n/3) farthest cells plus every cell tied with the nearest of them."""
    dist = np.asarray(dist)
    k = max(1, math.ceil(len(dist) / 3))
    threshold = np.sort(dist)[::-1][k - 1]
    return dist >= threshold


class PointMaze(GoalEnv):
    """Point mass in a maze (see the module docstring).

    Args:
      maze: layout name in crl.envs.mazes.LAYOUTS ("open", "u", "u4", "u5", "big", "hardest", or
        an `_eval` layout).
      far_goals: sample goals only from the farthest third of cells by BFS path distance.
      cell_size: world size of one maze cell; every length below is in cells and scales with it.
      max_speed: maximum displacement per step per axis, in cells (default 0.2, so a diagonal step
        is at most 0.28 cells: well below one cell).
      inertia: weight of the previous velocity in the first-order lag, in [0, 1) (0 = the action
        is the velocity).
      agent_radius: half-size of the agent's collision square, in cells (a disc of this radius fits
        inside it).
      reset_noise: half-width of the uniform noise on the start position, in cells.
      goal_noise: half-width of the uniform noise on the goal position, in cells.
      success_radius: goal_reach_thresh in cells (default 0.5: within half a cell of the goal).

    Attributes: state_dim (4), goal_indices ((0, 1)), goal_reach_thresh, observation_size (6),
    action_size (2), backend ("jax"), plus maze, far_goals, cell_size, agent_radius (world units),
    max_step (world units per step per axis), goal_cells ([n, 2] int (row, col) of the candidate
    goal cells), goal_cell_dist ([n] BFS distance from the start), walls ([m, 4] world wall boxes).
    """

    def __init__(
        self,
        maze: str = "u",
        far_goals: bool = False,
        cell_size: float = 1.0,
        *,
        max_speed: float = 0.2,
        inertia: float = 0.5,
        agent_radius: float = 0.15,
        reset_noise: float = 0.1,
        goal_noise: float = 0.1,
        success_radius: float = 0.5,
    ):
        if not 0.0 < max_speed < 1.0:
            raise ValueError(f"max_speed must be in (0, 1) cells per step, got {max_speed}")
        if not 0.0 <= inertia < 1.0:
            raise ValueError(f"inertia must be in [0, 1), got {inertia}")
        if not 0.0 < agent_radius < 0.5:
            raise ValueError(f"agent_radius must be in (0, 0.5) cells, got {agent_radius}")
        for name, noise in (("reset_noise", reset_noise), ("goal_noise", goal_noise)):
            if noise < 0 or noise + agent_radius >= 0.5:
                raise ValueError(f"{name} must be >= 0 and {name} + agent_radius < 0.5 cells")

        self.maze = maze
        self.far_goals = bool(far_goals)
        self.cell_size = float(cell_size)
        self.inertia = float(inertia)
        self.max_step = float(max_speed * cell_size)
        self.agent_radius = float(agent_radius * cell_size)
        self.reset_noise = float(reset_noise * cell_size)
        self.goal_noise = float(goal_noise * cell_size)

        self.state_dim = 4
        self.goal_indices = (0, 1)
        self.goal_reach_thresh = float(success_radius * cell_size)

        # Candidate goal cells: the layout's goal cells (without 'G' marks: every free cell except
        # the start), optionally only the far third.
        start = mazes.start_cell(maze)
        cells = mazes.goal_cells(maze)
        centres = ((cells - np.array(start)) * cell_size).astype(np.float32)
        bfs = mazes.shortest_path_cells(maze, start)
        dist = bfs[cells[:, 0], cells[:, 1]]
        keep = dist > 0   # not the start cell (distance 0), reachable (not -1)
        if far_goals:
            kept = np.flatnonzero(keep)
            keep = np.zeros(len(cells), dtype=bool)
            keep[kept[far_goal_mask(dist[kept])]] = True
        self.goal_cells = cells[keep]
        self.goal_cell_dist = dist[keep]
        self._goal_centres = jnp.asarray(centres[keep], dtype=jnp.float32)
        self._start = jnp.zeros(2, jnp.float32)

        # Wall boxes grown by the agent radius (Minkowski sum of box and collision square).
        self.walls = mazes.wall_boxes(maze, cell_size)
        grown = self.walls + np.array([-1, -1, 1, 1], np.float32) * np.float32(self.agent_radius)
        self._lo = jnp.asarray(grown[:, :2], dtype=jnp.float32)   # [m, 2] (x_min, y_min)
        self._hi = jnp.asarray(grown[:, 2:], dtype=jnp.float32)   # [m, 2] (x_max, y_max)

    # ---------------------------------------------------------------- Brax Env API
    @property
    def action_size(self) -> int:
        return 2

    @property
    def backend(self) -> str:
        return "jax"

    def reset(self, rng: jax.Array) -> State:
        k_start, k_cell, k_goal = jax.random.split(rng, 3)
        pos = self._start + jax.random.uniform(
            k_start, (2,), jnp.float32, -self.reset_noise, self.reset_noise)
        idx = jax.random.randint(k_cell, (), 0, self._goal_centres.shape[0])
        goal = self._goal_centres[idx] + jax.random.uniform(
            k_goal, (2,), jnp.float32, -self.goal_noise, self.goal_noise)
        ps = PointMazeState(pos=pos, vel=jnp.zeros(2, jnp.float32), goal=goal)
        success, dist = self._success(pos, goal)
        return State(
            pipeline_state=ps,
            obs=self._obs(ps),
            reward=jnp.zeros((), jnp.float32),
            done=jnp.zeros((), jnp.float32),
            metrics={"success": success, "dist": dist},
            info={},
        )

    def step(self, state: State, action: jax.Array) -> State:
        ps: PointMazeState = state.pipeline_state
        a = jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)
        v = self.inertia * ps.vel + (1.0 - self.inertia) * a          # in units of max_step
        delta = v * self.max_step
        x, y = ps.pos[0], ps.pos[1]
        x = self._sweep(x, y, delta[0], axis=0)
        y = self._sweep(y, x, delta[1], axis=1)
        pos = jnp.stack([x, y])
        vel = jnp.clip((pos - ps.pos) / self.max_step, -1.0, 1.0)
        ps = PointMazeState(pos=pos, vel=vel, goal=ps.goal)
        success, dist = self._success(pos, ps.goal)
        metrics = dict(state.metrics)
        metrics.update(success=success, dist=dist)
        return state.replace(
            pipeline_state=ps,
            obs=self._obs(ps),
            reward=success,
            done=jnp.zeros_like(state.done),
            metrics=metrics,
        )

    # ---------------------------------------------------------------- helpers
    def _obs(self, ps: PointMazeState) -> jax.Array:
        return jnp.concatenate([ps.pos, ps.vel, ps.goal])

    def _success(self, pos, goal):
        dist = jnp.linalg.norm(pos - goal)
        return (dist < self.goal_reach_thresh).astype(jnp.float32), dist

    def _sweep(self, p, q, d, axis: int):
        """Moves coordinate p (along `axis`) by d, with q the other coordinate, stopping at the
        first grown wall face crossed. Invariant kept: the point is never strictly inside a grown
        box. Boxes block only when q is strictly inside their extent on the other axis."""
        other = 1 - axis
        lo, hi = self._lo[:, axis], self._hi[:, axis]
        in_band = (q > self._lo[:, other]) & (q < self._hi[:, other])
        # Moving up: the nearest face lo >= p of a box in the band; moving down: hi <= p.
        up_limit = jnp.min(jnp.where(in_band & (lo >= p), lo, jnp.inf))
        down_limit = jnp.max(jnp.where(in_band & (hi <= p), hi, -jnp.inf))
        target = p + d
        return jnp.where(d >= 0, jnp.minimum(target, up_limit), jnp.maximum(target, down_limit))

    # Convenience for tests and analysis.
    def goal(self, state: State) -> jax.Array:
        return state.pipeline_state.goal
