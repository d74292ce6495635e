"""Goal-conditioned Brax Humanoid and Humanoid mazes (spring pipeline), after JaxGCRL.

Model: Brax's bundled `humanoid.xml` (through Brax's resource path) plus one extra body, a
non-colliding target marker: a sphere of radius 0.5 (the success radius), mass 1, on two slide
joints (x, y) at height 1.25. Spring pipeline, 10 substeps, gears 350 (11 leg/abdomen motors) and
100 (6 arm motors), as Brax and the reference use. Physics step (`spring_timestep`) as the
authors' pinned Brax (0.10.1) really integrates it: its spring pipeline steps by `sys.dt`, which
`mjcf.load` copies from the XML's 0.003 and only `sys.replace(dt=...)` changes. The authors'
open humanoid sets `opt.timestep` = 0.0015 instead, which that pipeline ignores: 0.003 per substep,
dt = 0.03 s per env step. Their humanoid mazes use `sys.replace(dt=0.0015)`: dt = 0.015 s. (The
Brax here integrates `opt.timestep`, so that is what is set.) Actions in [-1, 1] are mapped
affinely onto the motors' control range [-0.4, 0.4].

State (268 = `state_dim`), the reference benchmark's layout, over the 12 links (11 humanoid links
+ the target marker):
    [0:26]    q: torso x, y, z (0:3), torso quaternion (3:7), 17 hinge angles (7:24),
              target marker x, y (24:26)
    [26:51]   qd: torso linear (26:29) and angular (29:32) velocity, 17 hinge rates (32:49),
              target marker velocity (49:51, always ~0)
    [51:171]  per-link inertia about the centre of mass of all links: 3x3 matrix + mass (12 x 10)
    [171:243] per-link COM-frame velocity: mass-weighted linear (3) + angular (3) (12 x 6)
    [243:268] actuator generalised forces for the last action (25; zero at reset)
As in the reference, the marker's coordinates (the commanded goal's x, y) are part of the state,
and its mass enters the centre of mass used by [51:243].
Goal (3): (x, y, 1.25), compared with torso (x, y, z); `goal_indices = (0, 1, 2)`.
Observation (271): concat(state, goal).
Success: ||torso_xyz - goal|| < 0.5; reward = success; metrics "success" and "dist".
Termination (`done`): torso height leaves (1.0, 2.0). Truncation/auto-reset: the caller's job.
The goal lives in `State.info["goal"]`.

Goals: `Humanoid` draws a distance uniformly in [1, 5] and an angle uniformly in [0, 2 pi) (not
uniform over the annulus, as in the reference); `far_goals=True` draws the distance from the top
third of that range, [11/3, 5].
`HumanoidMaze`: a maze of `crl.envs.mazes` (the authors' layouts) with cell size 2, walls 1 m
tall (as the reference: a humanoid can topple over them), start cell at the origin; goal = the
exact centre of a uniformly drawn goal cell of `goal_layout` (default the maze; `make_env(...,
goal_set="eval")` passes the `_eval` layout), plus uniform noise of +-`goal_noise` (default 0, as
the authors), at height 1.25; `far_goals=True`: the third of those cells farthest from the start
by BFS path length.
Walls collide with the feet and the parts listed in `wall_contact_geoms` (default: shins,
thighs and pelvis, the body below the 1 m wall top when upright; the reference lets every
humanoid geom touch walls and floor, which costs a capsule-box test per geom and wall box);
walls and floor never touch each other.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from brax import actuator, base
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf

from crl.envs import mazes
from crl.envs.ant import (BODY_BIT, FOOT_BIT, add_wall_geoms, brax_asset_xml, goal_distance,
                          maze_goal_centres, sample_from_table, wall_geom_boxes)
from crl.envs.base import GoalEnv

TARGET_Z = 1.25
SPRING_GEAR = (350.0,) * 11 + (100.0,) * 6
DEFAULT_WALL_CONTACT_GEOMS = ("right_shin1", "left_shin1", "right_thigh1", "left_thigh1", "butt")


def _target_body(goal_radius: float) -> ET.Element:
    body = ET.Element("body", {"name": "target", "pos": f"0 0 {TARGET_Z}"})
    for name, axis in (("target_x", "1 0 0"), ("target_y", "0 1 0")):
        ET.SubElement(body, "joint", {
            "name": name, "type": "slide", "axis": axis, "pos": "0 0 0", "limited": "true",
            "range": "-100 100", "armature": "0", "damping": "0", "stiffness": "0"})
    ET.SubElement(body, "geom", {
        "name": "target", "type": "sphere", "size": f"{goal_radius}", "pos": "0 0 0",
        "mass": "1", "contype": "0", "conaffinity": "0", "rgba": "0.9 0.2 0.2 0.4"})
    return body


class Humanoid(GoalEnv, PipelineEnv):
    """Goal-conditioned humanoid; goal 1-5 m away at height 1.25."""

    state_dim = 268
    goal_indices = (0, 1, 2)
    goal_reach_thresh = 0.5
    spring_timestep = 0.003   # what the authors' open humanoid integrates (module docstring)

    def __init__(self, far_goals: bool = False, *, min_goal_dist: float = 1.0,
                 max_goal_dist: float = 5.0, reset_noise_scale: float = 0.0,
                 healthy_z_range: Tuple[float, float] = (1.0, 2.0),
                 backend: str = "spring", n_frames: Optional[int] = None, **kwargs):
        self.far_goals = bool(far_goals)
        lo, hi = float(min_goal_dist), float(max_goal_dist)
        if self.far_goals:
            lo = hi - (hi - lo) / 3
        self._goal_dist_range = (lo, hi)
        self._reset_noise_scale = float(reset_noise_scale)
        self._healthy_z_range = tuple(float(z) for z in healthy_z_range)
        root = brax_asset_xml("humanoid.xml")
        root.find("worldbody").append(_target_body(self.goal_reach_thresh))
        self._customise_xml(root)
        self.xml = ET.tostring(root, encoding="unicode")
        sys = mjcf.loads(self.xml)
        if backend in ("spring", "positional"):
            sys = sys.tree_replace({"opt.timestep": self.spring_timestep})
            sys = sys.replace(actuator=sys.actuator.replace(gear=jnp.array(SPRING_GEAR)))
            default_frames = 10
        else:
            default_frames = 5
        super().__init__(sys=sys, backend=backend,
                         n_frames=default_frames if n_frames is None else n_frames, **kwargs)
        assert self.sys.link_names[-1] == "target", self.sys.link_names
        self._n_humanoid_q = self.sys.q_size() - 2
        self._n_humanoid_qd = self.sys.qd_size() - 2

    # -- hooks ----------------------------------------------------------------------------------
    def _customise_xml(self, root: ET.Element) -> None:
        """Edits the parsed MJCF before it is compiled (mazes add walls here)."""

    def _sample_goal_xy(self, rng: jax.Array) -> jax.Array:
        k_d, k_a = jax.random.split(rng)
        lo, hi = self._goal_dist_range
        d = jax.random.uniform(k_d, (), minval=lo, maxval=hi)
        ang = jax.random.uniform(k_a, (), minval=0.0, maxval=2 * jnp.pi)
        return d * jnp.stack([jnp.cos(ang), jnp.sin(ang)])

    def sample_goal(self, rng: jax.Array) -> jax.Array:
        """A goal (x, y, 1.25) from this env's goal distribution."""
        return jnp.concatenate([self._sample_goal_xy(rng), jnp.array([TARGET_Z], jnp.float32)])

    # -- observation ----------------------------------------------------------------------------
    def _com_inertia(self):
        """Link inertias as the spring pipeline uses them (its mass/inertia scaling applied)."""
        inertia = self.sys.link.inertia
        if self.backend in ("spring", "positional"):
            diag = jax.vmap(jnp.diagonal)(inertia.i) ** (1 - self.sys.spring_inertia_scale)
            inertia = inertia.replace(i=jax.vmap(jnp.diag)(diag),
                                      mass=inertia.mass ** (1 - self.sys.spring_mass_scale))
        return inertia

    def state_vector(self, pipeline_state, ctrl: jax.Array) -> jax.Array:
        """The 268-d state for `pipeline_state` reached under motor command `ctrl`."""
        inertia = self._com_inertia()
        mass = inertia.mass
        total = jnp.sum(mass)
        x_i = pipeline_state.x.vmap().do(inertia.transform)          # link COM frames
        com = jnp.sum(mass[:, None] * x_i.pos, axis=0) / total
        # inertia of every link about the overall COM, expressed in world axes
        about_com = x_i.replace(pos=x_i.pos - com).vmap().do(inertia)
        com_inertia = jnp.concatenate(
            [about_com.i.reshape(mass.shape[0], 9), mass[:, None]], axis=1)
        # link velocities at their COM
        shift = base.Transform.create(pos=x_i.pos - pipeline_state.x.pos)
        xd_i = shift.vmap().do(pipeline_state.xd)
        com_velocity = jnp.concatenate(
            [mass[:, None] * xd_i.vel / total, xd_i.ang], axis=1)
        tau = actuator.to_tau(self.sys, ctrl, pipeline_state.q, pipeline_state.qd)
        return jnp.concatenate([pipeline_state.q, pipeline_state.qd, com_inertia.ravel(),
                                com_velocity.ravel(), tau])

    def action_to_ctrl(self, action: jax.Array) -> jax.Array:
        lo = self.sys.actuator.ctrl_range[:, 0]
        hi = self.sys.actuator.ctrl_range[:, 1]
        return lo + (action + 1.0) * 0.5 * (hi - lo)

    # -- goal-conditioned API -------------------------------------------------------------------
    def goal_success(self, state_vec: jax.Array, goal: jax.Array):
        dist = goal_distance(state_vec, goal, self.goal_indices)
        return (dist < self.goal_reach_thresh).astype(jnp.float32), dist

    def torso_height(self, pipeline_state) -> jax.Array:
        return pipeline_state.x.pos[0, 2]

    def is_terminated(self, pipeline_state) -> jax.Array:
        z = self.torso_height(pipeline_state)
        lo, hi = self._healthy_z_range
        return jnp.where((z < lo) | (z > hi), 1.0, 0.0).astype(jnp.float32)

    def sample_initial_qpos_qvel(self, rng: jax.Array):
        k_q, k_qd = jax.random.split(rng)
        s = self._reset_noise_scale
        q = self.sys.init_q + jax.random.uniform(k_q, (self.sys.q_size(),), minval=-s, maxval=s)
        qd = jax.random.uniform(k_qd, (self.sys.qd_size(),), minval=-s, maxval=s)
        return q, qd

    def reset(self, rng: jax.Array) -> State:
        k_init, k_goal = jax.random.split(rng)
        q, qd = self.sample_initial_qpos_qvel(k_init)
        return self.reset_to(q, qd, self.sample_goal(k_goal))

    def reset_to(self, q: jax.Array, qd: jax.Array, goal: jax.Array) -> State:
        """A State at (q, qd) commanded to `goal` (x, y, z); the marker joints of q/qd are set
        from the goal here."""
        goal = jnp.asarray(goal, jnp.float32)
        q = q.at[-2:].set(goal[:2])
        qd = qd.at[-2:].set(0.0)
        pipeline_state = self.pipeline_init(q, qd)
        s = self.state_vector(pipeline_state, jnp.zeros(self.sys.act_size()))
        success, dist = self.goal_success(s, goal)
        zero = jnp.zeros((), jnp.float32)
        return State(pipeline_state=pipeline_state,
                     obs=jnp.concatenate([s, goal]),
                     reward=zero, done=zero,
                     metrics={"success": success, "dist": dist},
                     info={"goal": goal})

    def step(self, state: State, action: jax.Array) -> State:
        ctrl = self.action_to_ctrl(action)
        pipeline_state = self.pipeline_step(state.pipeline_state, ctrl)
        goal = state.info["goal"]
        s = self.state_vector(pipeline_state, ctrl)
        success, dist = self.goal_success(s, goal)
        metrics = dict(state.metrics)
        metrics.update(success=success, dist=dist)
        return state.replace(pipeline_state=pipeline_state,
                             obs=jnp.concatenate([s, goal]),
                             reward=success,
                             done=self.is_terminated(pipeline_state),
                             metrics=metrics)


class HumanoidMaze(Humanoid):
    """Humanoid in a maze of `crl.envs.mazes` (cell size 2); goal in a goal cell at z = 1.25."""

    spring_timestep = 0.0015  # the authors' humanoid mazes (module docstring)

    def __init__(self, maze: str = "u", far_goals: bool = False, *, cell_size: float = 2.0,
                 goal_layout: Optional[str] = None, wall_height: Optional[float] = None,
                 goal_noise: float = 0.0, merge_walls: bool = True,
                 wall_contact_geoms: Sequence[str] = DEFAULT_WALL_CONTACT_GEOMS, **kwargs):
        mazes.layout(maze)
        self.maze = maze
        self.goal_layout = maze if goal_layout is None else goal_layout
        self.cell_size = float(cell_size)
        self.wall_height = self.cell_size / 2 if wall_height is None else float(wall_height)
        self.goal_noise = float(goal_noise)
        self.wall_boxes = wall_geom_boxes(maze, self.cell_size, merge_walls)
        self.goal_centres = maze_goal_centres(maze, self.cell_size, bool(far_goals),
                                              self.goal_layout)
        self._wall_contact_geoms = tuple(wall_contact_geoms)
        super().__init__(far_goals=far_goals, **kwargs)

    def _customise_xml(self, root: ET.Element) -> None:
        names = {g.get("name") for g in root.iter("geom")}
        unknown = set(self._wall_contact_geoms) - names
        if unknown:
            raise ValueError(f"unknown humanoid geoms {sorted(unknown)}")
        for geom in root.iter("geom"):
            # feet keep Brax's floor bit (contype 1) and reach walls through that bit too
            if geom.get("name") in self._wall_contact_geoms and geom.get("contype") != "1":
                geom.set("contype", str(BODY_BIT))
        floor = root.find("worldbody/geom[@name='floor']")
        extent = float(abs(self.wall_boxes).max()) + 10.0
        floor.set("size", f"{extent:.1f} {extent:.1f} 0.125")
        add_wall_geoms(root, self.wall_boxes, self.wall_height, FOOT_BIT | BODY_BIT)

    def _sample_goal_xy(self, rng: jax.Array) -> jax.Array:
        return sample_from_table(rng, jnp.asarray(self.goal_centres), self.goal_noise)
