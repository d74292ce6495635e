"""Goal-conditioned Brax Ant and Ant mazes (spring pipeline), after the JaxGCRL benchmark.

Model: Brax's bundled `ant.xml` (loaded through Brax's own resource path, never the working
directory), spring pipeline with timestep 0.005 and 10 substeps (dt = 0.05 s per env step), as
the authors' code integrates it (its `sys.replace(dt=0.005)` sets the step Brax 0.10.1's spring
pipeline uses).

State (29 = `state_dim`):  q[0:15] (torso x, y, z, torso quaternion w, x, y, z, 8 hinge angles)
                           ++ qd[0:14] (torso linear velocity, angular velocity, 8 hinge rates).
Goal (2): the commanded torso (x, y); `goal_indices = (0, 1)`.
Observation (31):          concat(state, goal).
Action (8):                hinge torques in [-1, 1] (gear 150).
Success:                   ||torso_xy - goal|| < 0.5; reward = success; metrics "success", "dist".
Termination (`done`):      torso height (q[2]) leaves the open interval (0.2, 1.0). Episode length
                           truncation and auto-reset are the caller's job.
The goal lives in `State.info["goal"]` and travels with the state through `step`.

Goals: `Ant` draws the goal uniformly on the circle of radius 10 around the origin (the start).
`far_goals=True` keeps that circle: every Ant goal is already at the same (far) distance, and the
reference benchmark has no separate far variant for the open-field ant.

`AntMaze`: the same robot in a maze of `crl.envs.mazes` (cell size 4, start cell = origin; the
layouts of the authors' code). Walls
are static boxes in the MJCF world body covering exactly the wall cells of
`mazes.wall_boxes(maze, 4)`; by default adjacent wall cells are merged into larger boxes (same
union, ~4-6x faster stepping than one box per cell, no snag edges between neighbouring cells;
`merge_walls=False` gives one box per cell). Walls collide with the torso sphere and the four
feet, not with each other or the floor (the reference also lets the four hip capsules touch
walls; they are left out here for speed, see `_customise_xml`). The goal is the exact centre of
a uniformly drawn goal cell of `goal_layout` (default: the maze itself; `make_env(...,
goal_set="eval")` passes the maze's `_eval` layout, as the authors evaluate), plus uniform noise
of +-`goal_noise` per coordinate (default 0, as the authors); `far_goals=True` restricts the cells
to the third of them farthest from the start by BFS path length (ties at the cut-off included).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf
from etils import epath

from crl.envs import mazes
from crl.envs.base import GoalEnv

# Collision bits: bit 1 = feet <-> floor (Brax's own), bit 2 = body parts <-> walls.
FOOT_BIT = 1
BODY_BIT = 2
WALL_RGBA = "0.7 0.5 0.3 1.0"


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by crl.envs.humanoid)
# ---------------------------------------------------------------------------------------------

def brax_asset_xml(name: str) -> ET.Element:
    """Parses one of Brax's bundled MJCF files (independent of the working directory)."""
    path = epath.resource_path("brax") / "envs" / "assets" / name
    return ET.fromstring(path.read_text())


def merged_wall_rects(maze: str) -> np.ndarray:
    """Greedy cover of the wall cells of `maze` by disjoint rectangles of cells.

    Returns [k, 4] int (row0, col0, row1, col1), inclusive. Scans row-major; each rectangle grows
    right as far as the row allows, then down while the whole span stays wall and unused.
    """
    g = mazes.grid(maze)
    used = np.zeros_like(g)
    rects = []
    rows, cols = g.shape
    for i in range(rows):
        for j in range(cols):
            if not g[i, j] or used[i, j]:
                continue
            j1 = j
            while j1 + 1 < cols and g[i, j1 + 1] and not used[i, j1 + 1]:
                j1 += 1
            i1 = i
            while i1 + 1 < rows and np.all(g[i1 + 1, j:j1 + 1] & ~used[i1 + 1, j:j1 + 1]):
                i1 += 1
            used[i:i1 + 1, j:j1 + 1] = True
            rects.append((i, j, i1, j1))
    return np.array(rects, dtype=np.int32).reshape(-1, 4)


def wall_geom_boxes(maze: str, cell_size: float, merge: bool = True) -> np.ndarray:
    """[k, 4] float32 (x_min, y_min, x_max, y_max) of the wall boxes placed in the MJCF.

    merge=False: exactly `mazes.wall_boxes(maze, cell_size)`. merge=True: the same union as fewer
    boxes (see `merged_wall_rects`)."""
    if not merge:
        return mazes.wall_boxes(maze, cell_size)
    i0, j0 = mazes.start_cell(maze)
    r = merged_wall_rects(maze).astype(np.float64)
    half = cell_size / 2
    lo = (r[:, 0:2] - np.array([i0, j0])) * cell_size - half
    hi = (r[:, 2:4] - np.array([i0, j0])) * cell_size + half
    return np.concatenate([lo, hi], axis=1).astype(np.float32)


def add_wall_geoms(root: ET.Element, boxes: np.ndarray, height: float,
                   conaffinity: int) -> None:
    """Appends one static box geom per row of `boxes` to the world body."""
    world = root.find("worldbody")
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        ET.SubElement(world, "geom", {
            "name": f"wall_{k}",
            "type": "box",
            "pos": f"{(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {height / 2:.6f}",
            "size": f"{(x1 - x0) / 2:.6f} {(y1 - y0) / 2:.6f} {height / 2:.6f}",
            "contype": "0",
            "conaffinity": str(conaffinity),
            "condim": "3",
            "rgba": WALL_RGBA,
        })


def maze_goal_centres(maze: str, cell_size: float, far: bool,
                      goal_layout: Optional[str] = None) -> np.ndarray:
    """[n, 2] float32 centres of the goal cells of `goal_layout` (default: `maze`; an `_eval`
    layout with the same walls and start), in `maze`'s frame; with far=True only the ceil(n/3)
    farthest of those by BFS path length (plus ties)."""
    goal_layout = maze if goal_layout is None else goal_layout
    mazes.check_same_maze(maze, goal_layout)
    cells = mazes.goal_cells(goal_layout)
    i0, j0 = mazes.start_cell(maze)
    centres = ((cells - np.array([i0, j0])) * cell_size).astype(np.float32)
    dist = mazes.shortest_path_cells(maze, (i0, j0))[cells[:, 0], cells[:, 1]]
    keep = dist > 0  # not the start cell, reachable
    centres, dist = centres[keep], dist[keep]
    if far:
        k = int(np.ceil(len(dist) / 3))
        cutoff = np.sort(dist)[::-1][k - 1]
        centres = centres[dist >= cutoff]
    return centres.astype(np.float32)


def sample_from_table(rng: jax.Array, table: jax.Array, noise: float) -> jax.Array:
    """A uniformly chosen row of `table` plus uniform noise in [-noise, noise] per coordinate."""
    k_idx, k_noise = jax.random.split(rng)
    idx = jax.random.randint(k_idx, (), 0, table.shape[0])
    jitter = jax.random.uniform(k_noise, table.shape[1:], minval=-noise, maxval=noise)
    return table[idx] + jitter


def goal_distance(state_vec: jax.Array, goal: jax.Array,
                  goal_indices: Tuple[int, ...]) -> jax.Array:
    return jnp.linalg.norm(state_vec[..., jnp.array(goal_indices)] - goal, axis=-1)


# ---------------------------------------------------------------------------------------------
# Ant
# ---------------------------------------------------------------------------------------------

class Ant(GoalEnv, PipelineEnv):
    """Goal-conditioned ant; goal on a circle of radius `goal_radius` (10) around the start."""

    state_dim = 29
    goal_indices = (0, 1)
    goal_reach_thresh = 0.5

    def __init__(self, far_goals: bool = False, *, goal_radius: float = 10.0,
                 reset_noise_scale: float = 0.1,
                 healthy_z_range: Tuple[float, float] = (0.2, 1.0),
                 backend: str = "spring", n_frames: Optional[int] = None, **kwargs):
        self.far_goals = bool(far_goals)
        self._goal_radius = float(goal_radius)
        self._reset_noise_scale = float(reset_noise_scale)
        self._healthy_z_range = tuple(float(z) for z in healthy_z_range)
        root = brax_asset_xml("ant.xml")
        self._customise_xml(root)
        self.xml = ET.tostring(root, encoding="unicode")
        sys = mjcf.loads(self.xml)
        if backend in ("spring", "positional"):
            sys = sys.tree_replace({"opt.timestep": 0.005})
            default_frames = 10
        else:
            default_frames = 5
        super().__init__(sys=sys, backend=backend,
                         n_frames=default_frames if n_frames is None else n_frames, **kwargs)

    # -- hooks for subclasses -------------------------------------------------------------------
    def _customise_xml(self, root: ET.Element) -> None:
        """Edits the parsed MJCF before it is compiled (mazes add walls here)."""

    def sample_goal(self, rng: jax.Array) -> jax.Array:
        """A goal (x, y) from this env's goal distribution."""
        ang = jax.random.uniform(rng, (), minval=0.0, maxval=2 * jnp.pi)
        return self._goal_radius * jnp.stack([jnp.cos(ang), jnp.sin(ang)])

    # -- goal-conditioned API -------------------------------------------------------------------
    def state_vector(self, pipeline_state) -> jax.Array:
        """The 29-d state: q[:15] ++ qd[:14]."""
        return jnp.concatenate([pipeline_state.q[:15], pipeline_state.qd[:14]])

    def goal_success(self, state_vec: jax.Array, goal: jax.Array):
        """(success in {0., 1.}, distance) of a state vector to a goal."""
        dist = goal_distance(state_vec, goal, self.goal_indices)
        return (dist < self.goal_reach_thresh).astype(jnp.float32), dist

    def torso_height(self, pipeline_state) -> jax.Array:
        return pipeline_state.x.pos[0, 2]

    def is_terminated(self, pipeline_state) -> jax.Array:
        """1.0 when the torso height is outside the open healthy interval, else 0.0."""
        z = self.torso_height(pipeline_state)
        lo, hi = self._healthy_z_range
        return jnp.where((z < lo) | (z > hi), 1.0, 0.0).astype(jnp.float32)

    def sample_initial_qpos_qvel(self, rng: jax.Array):
        k_q, k_qd = jax.random.split(rng)
        s = self._reset_noise_scale
        q = self.sys.init_q + jax.random.uniform(k_q, (self.sys.q_size(),), minval=-s, maxval=s)
        qd = s * jax.random.normal(k_qd, (self.sys.qd_size(),))
        return q, qd

    def reset(self, rng: jax.Array) -> State:
        k_init, k_goal = jax.random.split(rng)
        q, qd = self.sample_initial_qpos_qvel(k_init)
        goal = self.sample_goal(k_goal)
        return self.reset_to(q, qd, goal)

    def reset_to(self, q: jax.Array, qd: jax.Array, goal: jax.Array) -> State:
        """A State at generalized coordinates (q, qd) commanded to `goal` (tests, evaluation)."""
        goal = jnp.asarray(goal, jnp.float32)
        pipeline_state = self.pipeline_init(q, qd)
        s = self.state_vector(pipeline_state)
        success, dist = self.goal_success(s, goal)
        zero = jnp.zeros((), jnp.float32)
        return State(pipeline_state=pipeline_state,
                     obs=jnp.concatenate([s, goal]),
                     reward=zero, done=zero,
                     metrics={"success": success, "dist": dist},
                     info={"goal": goal})

    def step(self, state: State, action: jax.Array) -> State:
        pipeline_state = self.pipeline_step(state.pipeline_state, action)
        goal = state.info["goal"]
        s = self.state_vector(pipeline_state)
        success, dist = self.goal_success(s, goal)
        metrics = dict(state.metrics)
        metrics.update(success=success, dist=dist)
        return state.replace(pipeline_state=pipeline_state,
                             obs=jnp.concatenate([s, goal]),
                             reward=success,
                             done=self.is_terminated(pipeline_state),
                             metrics=metrics)


class AntMaze(Ant):
    """Ant in a maze of `crl.envs.mazes` (cell size 4); goal = a goal cell's centre."""

    def __init__(self, maze: str = "u4", far_goals: bool = False, *, cell_size: float = 4.0,
                 goal_layout: Optional[str] = None, wall_height: Optional[float] = None,
                 goal_noise: float = 0.0, merge_walls: bool = True, **kwargs):
        mazes.layout(maze)  # validates the name
        self.maze = maze
        self.goal_layout = maze if goal_layout is None else goal_layout
        self.cell_size = float(cell_size)
        self.wall_height = self.cell_size / 2 if wall_height is None else float(wall_height)
        self.goal_noise = float(goal_noise)
        self.wall_boxes = wall_geom_boxes(maze, self.cell_size, merge_walls)
        self.goal_centres = maze_goal_centres(maze, self.cell_size, bool(far_goals),
                                              self.goal_layout)
        super().__init__(far_goals=far_goals, **kwargs)

    def _customise_xml(self, root: ET.Element) -> None:
        # The torso sphere gains the body bit so it hits walls (not the floor); the feet keep
        # Brax's floor bit and hit walls through the walls' conaffinity. The hip capsules stay
        # contact-free: capsule-box pairs cost ~4x a sphere-box pair and the capsules reach only
        # 0.11 m beyond the torso sphere.
        for geom in root.iter("geom"):
            if geom.get("name") == "torso_geom":
                geom.set("contype", str(BODY_BIT))
        floor = root.find("worldbody/geom[@name='floor']")
        extent = float(np.abs(self.wall_boxes).max()) + 10.0
        floor.set("size", f"{extent:.1f} {extent:.1f} 40")
        add_wall_geoms(root, self.wall_boxes, self.wall_height, FOOT_BIT | BODY_BIT)

    def sample_goal(self, rng: jax.Array) -> jax.Array:
        return sample_from_table(rng, jnp.asarray(self.goal_centres), self.goal_noise)
