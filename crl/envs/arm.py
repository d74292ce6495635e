"""Arm manipulation tasks (MJX), to the facts of the scaling-crl code behind the paper's numbers.

A Franka Emika Panda (7 revolute joints and two sliding fingers) on a table, built from MuJoCo
primitives in Python: no asset files, nothing depends on the working directory. The reference
loads the MuJoCo Menagerie Panda (meshes) through Brax's MJCF loader; what that model simulates is
all primitives already (the meshes are visual only, every body has an explicit inertial, the
colliding geoms are boxes, a capsule and a plane), so this model carries over the kinematic chain
(link offsets and rotations, joint axes and limits), inertials, actuators, collision geoms, contact
pairs and solver options as facts, and leaves the meshes out.

Brax's loader fuses jointless bodies into their parents: link0 (the base, which holds the
`childclass="panda"` of the joints) and the hand disappear. As simulated by the reference, then,
the arm joints have no damping and no armature, joints 1, 3, 5 and 7 have no limits (2, 4 and 6
keep their explicit ranges), the hand's capsule and the finger bodies hang off link7, and the
"end effector" is the origin of link7 (the flange, 0.107 m behind the hand). All of that is
reproduced here.

World frame: the table is the plane z = 0, the arm base sits at the origin; the task regions lie
in front of it along +y (x from -0.5 to 0.5, y from 0.4 to 0.9).

State (17 dims, `obs[:17]`; the goal follows as `obs[17:20]`):
  0:3   cube position (x, y, z)                         <- goal_indices (0, 1, 2)
  3:10  the 7 arm joint angles (joint 1 .. joint 7, rad)
  10:13 end-effector position (origin of link7)
  13:16 end-effector linear velocity (world frame, from the simulator's body velocities)
  16    finger distance: distance between the two finger bodies' origins (= sum of the two finger
        slides), 0 (closed) .. 0.16 (open)

Action (5 dims, nominally in [-1, 1]; not clipped, as in the reference):
  0:4   absolute targets for joints 1, 2, 4, 6: target = mid + a * half_range over
        joint 1 [0.3491, 2.7925], joint 2 [0, 1.48353], joint 4 [-3.0718, -0.0698],
        joint 6 [2.3562, 3.7525]; joints 3 and 5 are commanded 0, joint 7 is commanded 1.4487.
  4     gripper, binary: a > 0 closes (finger controls 0), a <= 0 opens (finger controls 255).
The commands drive the Panda's position servos (MuJoCo `general` actuators, force =
gain * ctrl - kp * q - kd * qdot, clamped to the force range, ctrl clamped to its range). For
joints 1 and 2 gain = kp, so a servo settles at its target; for joints 3 and 4 gain / kp = 4/7 and
for joints 5, 6, 7 it is 1/2 (as in the reference's model), so joint 4 settles at 4/7 of its
command, joint 6 at 1/2 of it and joint 7 at 0.72. The fingers settle at 0.15686 * ctrl / 500:
0 closed, 0.08 each open (their range limit). `servo_equilibrium` gives the settled angles.
The arm has no gravity compensation, so loaded joints settle up to ~0.02 rad below them. Under
MJX's implicit-fast step a servo's velocity gain stays in the implicit damping even while its
force is clamped (joints 5-7 clamp at 12 N m), so the wrist moves slowly: as in the reference,
which ran the same model on MJX.

Physics: timestep 0.002 s, 25 substeps per env step (dt = 0.05 s), implicit-fast integrator,
Newton solver with 6 iterations and 12 line-search iterations, pyramidal friction cones (binpick:
impratio 10). Contacts only through explicit pairs: cube, hand capsule and both finger pads with
the table; the cube with the hand and the pads; pad with pad; for binpick also the cube, the hand
and the pads with the eight bin walls.

Reset: cube at the centre of its region + U(-1, 1) * noise in x and y, 0.07 above the table
(it drops 0.04 onto the table during the first step), unrotated; arm at
HOME_Q = (1.571, 0.742, 0, -1.571, 0, 3.054, 1.449), fingers at 0.04 each; all velocities zero.
Goal: centre of the goal region + U(-1, 1) * noise in x and y, z = 0.03 (a cube resting on the
table). Success: cube within 0.1 of the goal; reward = success; episodes never end early.

Tasks (region centre, noise half-width; cube region | goal region):
  arm_push_easy:    (-0.1, 0.6) +- 0.1   | (0.1, 0.6) +- 0.1   (marked by two flat squares)
  arm_push_hard:    (-0.25, 0.65) +- 0.25 | (0.25, 0.65) +- 0.25
  arm_binpick_hard: (-0.3, 0.6) +- 0.15   | (0.3, 0.6) +- 0.15, each region inside an open bin
                    (walls 0.066 high, 0.01 thick, outer half-width 0.195) standing on the table:
                    the cube must be lifted over the walls of both bins.
far_goals=True (this project's far-goal evaluation variant; the reference has none for arms):
cube from the outer half of its region along x, goal from the outer half of the goal region.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jp
import numpy as np
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf

from crl.envs.base import GoalEnv

# --- Facts of the reference model (metres, radians, SI) ---------------------------------------
TIMESTEP = 0.002
N_FRAMES = 25                      # env dt = 0.05 s
SOLVER_ITERATIONS = 6
LS_ITERATIONS = 12

# Kinematic chain: (body, position in the parent frame, orientation quaternion (w, x, y, z) in the
# parent frame, joint range or None for an unlimited joint). Every joint turns about its body's z.
_H = float(np.sqrt(0.5))
PANDA_CHAIN = (
    ("link1", (0.0, 0.0, 0.333), (1.0, 0.0, 0.0, 0.0), None),
    ("link2", (0.0, 0.0, 0.0), (_H, -_H, 0.0, 0.0), (-1.7628, 1.7628)),
    ("link3", (0.0, -0.316, 0.0), (_H, _H, 0.0, 0.0), None),
    ("link4", (0.0825, 0.0, 0.0), (_H, _H, 0.0, 0.0), (-3.0718, -0.0698)),
    ("link5", (-0.0825, 0.384, 0.0), (_H, -_H, 0.0, 0.0), None),
    ("link6", (0.0, 0.0, 0.0), (_H, _H, 0.0, 0.0), (-0.0175, 3.7525)),
    ("link7", (0.088, 0.0, 0.0), (_H, _H, 0.0, 0.0), None),
)
# Inertials: mass, centre of mass, full inertia (ixx iyy izz ixy ixz iyz), per link.
PANDA_INERTIA = (
    (4.970684, (0.003875, 0.002081, -0.04762),
     (0.70337, 0.70661, 0.0091170, -0.00013900, 0.0067720, 0.019169)),
    (0.646926, (-0.003141, -0.02872, 0.003495),
     (0.0079620, 2.8110e-2, 2.5995e-2, -3.925e-3, 1.0254e-2, 7.04e-4)),
    (3.228604, (2.7518e-2, 3.9252e-2, -6.6502e-2),
     (3.7242e-2, 3.6155e-2, 1.083e-2, -4.761e-3, -1.1396e-2, -1.2805e-2)),
    (3.587895, (-5.317e-2, 1.04419e-1, 2.7454e-2),
     (2.5853e-2, 1.9552e-2, 2.8323e-2, 7.796e-3, -1.332e-3, 8.641e-3)),
    (1.225946, (-1.1953e-2, 4.1065e-2, -3.8437e-2),
     (3.5549e-2, 2.9474e-2, 8.627e-3, -2.117e-3, -4.037e-3, 2.29e-4)),
    (1.666555, (6.0149e-2, -1.4117e-2, -1.0517e-2),
     (1.964e-3, 4.354e-3, 5.433e-3, 1.09e-4, -1.158e-3, 3.41e-4)),
    (7.35522e-01, (1.0517e-2, -4.252e-3, 6.1597e-2),
     (1.2516e-2, 1.0027e-2, 4.815e-3, -4.28e-4, -1.196e-3, -7.41e-4)),
)
# The hand frame in link7 (fused away by Brax: no body, no mass), the fingers in the hand frame.
HAND_POS, HAND_QUAT = (0.0, 0.0, 0.107), (0.9238795, 0.0, 0.0, -0.3826834)
FINGER_POS = (0.0, 0.0, 0.0584)
FINGER_MASS = 0.015
FINGER_RANGE = (0.0, 0.08)
FINGER_PAD_HALF = (0.015, 0.005, 0.04)     # pad box, at (0, 0.0055, 0.035) in the finger frame
FINGER_PAD_POS = (0.0, 0.0055, 0.035)
HAND_CAPSULE = (0.04, 0.06)                # radius, half-length; axis along the hand's y
HAND_CAPSULE_POS = (0.0, 0.0, 0.035)

# Servos, joints 1..7: (gain, kp, kd, force limit, ctrl range or None for (-2.8973, 2.8973)).
ARM_SERVO = (
    (4500.0, 4500.0, 450.0, 87.0, None),
    (4500.0, 4500.0, 450.0, 87.0, (-1.7628, 1.7628)),
    (2000.0, 3500.0, 350.0, 87.0, None),
    (2000.0, 3500.0, 350.0, 87.0, (-3.0718, -0.0698)),
    (1000.0, 2000.0, 200.0, 12.0, None),
    (1000.0, 2000.0, 200.0, 12.0, (-0.0175, 3.7525)),
    (1000.0, 2000.0, 200.0, 12.0, None),
)
DEFAULT_CTRL_RANGE = (-2.8973, 2.8973)
FINGER_SERVO = (0.15686, 500.0, 50.0, 500.0, (0.0, 255.0))   # gain, kp, kd, force, ctrl range
FINGER_DAMPING, FINGER_ARMATURE = 5.0, 0.1

# Action mapping: action dims 0..3 -> joints 1, 2, 4, 6 (indices 0, 1, 3, 5).
ACTION_JOINTS = (0, 1, 3, 5)
TARGET_LOW = (0.3491, 0.0, 0.0, -3.0718, 0.0, 2.3562, 1.4487)
TARGET_HIGH = (2.7925, 1.48353, 0.0, -0.0698, 0.0, 3.7525, 1.4487)
GRIP_OPEN_CTRL, GRIP_CLOSED_CTRL = 255.0, 0.0

HOME_Q = (1.571, 0.742, 0.0, -1.571, 0.0, 3.054, 1.449)
FINGER_HOME = 0.04

CUBE_HALF = 0.03
CUBE_START_Z = 0.07
GOAL_Z = 0.03
TABLE_POS = (0.0, 0.2, 0.0)

# Binpick bins: centre (x, y); walls 0.066 high standing on the table.
BIN_CENTERS = ((-0.3, 0.6), (0.3, 0.6))
BIN_WALL_HEIGHT = 0.066
# (offset from the bin centre, half sizes) of the four walls.
BIN_WALLS = (((0.0, -0.19), (0.195, 0.005)), ((0.0, 0.19), (0.195, 0.005)),
             ((0.19, 0.0), (0.005, 0.185)), ((-0.19, 0.0), (0.005, 0.185)))

# Tasks: cube region centre, goal region centre, noise half-width (x and y), flat region markers.
TASKS = {
    "push_easy": dict(cube=(-0.1, 0.6), goal=(0.1, 0.6), noise=0.1, bins=False),
    "push_hard": dict(cube=(-0.25, 0.65), goal=(0.25, 0.65), noise=0.25, bins=False),
    "binpick_hard": dict(cube=(-0.3, 0.6), goal=(0.3, 0.6), noise=0.15, bins=True),
}
SUCCESS_DIST = 0.1

# Indices into Brax's per-body arrays (x, xd: bodies without the world): cube, link1..7, fingers.
EEF_BODY = 7          # link7
LEFT_FINGER_BODY, RIGHT_FINGER_BODY = 8, 9
# qpos layout: cube free joint 0:7, arm joints 7:14, finger slides 14:16.
ARM_Q = slice(7, 14)
FINGER_Q = slice(14, 16)


def _f(v) -> str:
    return " ".join(repr(float(x)) for x in v)


def servo_equilibrium(ctrl) -> np.ndarray:
    """Angles (7 arm joints, 2 fingers) at which the servos hold still without load: ctrl clamped
    to its range, times gain / kp."""
    ctrl = np.asarray(ctrl, np.float64)
    gains = [s[0] for s in ARM_SERVO] + [FINGER_SERVO[0]] * 2
    kps = [s[1] for s in ARM_SERVO] + [FINGER_SERVO[1]] * 2
    ranges = [s[4] or DEFAULT_CTRL_RANGE for s in ARM_SERVO] + [FINGER_SERVO[4]] * 2
    lo, hi = np.array(ranges).T
    return np.clip(ctrl, lo, hi) * np.array(gains) / np.array(kps)


def _arm_xml() -> str:
    vis = 'contype="0" conaffinity="0" group="2" rgba="0.9 0.9 0.9 1"'
    # Visual capsules along each link to the next joint (no mass: every body has an inertial).
    link_vis = {
        "link1": 'fromto="0 0 -0.333 0 0 0" size="0.06"',
        "link2": 'fromto="0 0 0 0 -0.316 0" size="0.06"',
        "link3": 'fromto="0 0 0 0.0825 0 0" size="0.055"',
        "link4": 'fromto="0 0 0 -0.0825 0.384 0" size="0.055"',
        "link5": 'fromto="0 0 0 0 0 -0.1" size="0.05"',
        "link6": 'fromto="0 0 0 0.088 0 0" size="0.045"',
        "link7": 'fromto="0 0 0 0 0 0.107" size="0.04"',
    }
    xml = ""
    for i, ((name, pos, quat, rng), (mass, com, inertia)) in enumerate(
            zip(PANDA_CHAIN, PANDA_INERTIA)):
        limit = f'range="{_f(rng)}"' if rng is not None else 'limited="false"'
        xml += f"""
<body name="{name}" pos="{_f(pos)}" quat="{_f(quat)}">
  <inertial mass="{mass!r}" pos="{_f(com)}" fullinertia="{_f(inertia)}"/>
  <joint name="joint{i + 1}" type="hinge" axis="0 0 1" {limit} damping="0" armature="0"/>
  <geom type="capsule" {link_vis[name]} {vis}/>"""
    finger = (
        'joint name="{j}" type="slide" axis="0 1 0" range="{r}" damping="{d!r}" armature="{a!r}"')
    pad = f'type="box" size="{_f(FINGER_PAD_HALF)}" pos="{_f(FINGER_PAD_POS)}" ' \
          'contype="0" conaffinity="0" rgba="0.25 0.25 0.25 1"'
    inertial = (f'<inertial mass="{FINGER_MASS!r}" pos="0 0 0" '
                'diaginertia="2.375e-6 2.375e-6 7.5e-7"/>')
    xml += f"""
  <frame name="hand" pos="{_f(HAND_POS)}" quat="{_f(HAND_QUAT)}">
    <geom name="hand_geom" type="capsule" size="{_f(HAND_CAPSULE)}" pos="{_f(HAND_CAPSULE_POS)}"
          quat="{_H!r} {_H!r} 0 0" contype="0" conaffinity="0" rgba="1 1 1 1"/>
    <body name="left_finger" pos="{_f(FINGER_POS)}">
      {inertial}
      <{finger.format(j="finger_joint1", r=_f(FINGER_RANGE), d=FINGER_DAMPING, a=FINGER_ARMATURE)}/>
      <geom name="left_finger_geom" {pad}/>
    </body>
    <body name="right_finger" pos="{_f(FINGER_POS)}" quat="0 0 0 1">
      {inertial}
      <{finger.format(j="finger_joint2", r=_f(FINGER_RANGE), d=FINGER_DAMPING, a=FINGER_ARMATURE)}/>
      <geom name="right_finger_geom" {pad}/>
    </body>
  </frame>"""
    xml += "\n</body>" * len(PANDA_CHAIN)
    return xml


def _scene_geoms(task: str) -> Tuple[str, list]:
    """Static task geoms (world body) and the names of those the cube, hand and pads touch."""
    t = TASKS[task]
    if not t["bins"]:
        # Flat squares marking the cube and goal regions (visual only, as in the reference).
        n = t["noise"]
        xml = "".join(
            f'<geom name="region_{k}" type="box" size="{n!r} {n!r} 0.0005" '
            f'pos="{c[0]!r} {c[1]!r} 0.0005" contype="0" conaffinity="0" rgba="{rgba}"/>\n'
            for k, c, rgba in (("cube", t["cube"], "0 0.2 0.8 1"),
                               ("goal", t["goal"], "0.8 0 0 1")))
        return xml, []
    xml, names = "", []
    h = BIN_WALL_HEIGHT / 2
    for b, ((cx, cy), rgba) in enumerate(zip(BIN_CENTERS, ("0 0.2 0.8 1", "0.8 0 0 1"))):
        for w, ((ox, oy), (hx, hy)) in enumerate(BIN_WALLS):
            name = f"bin{'AB'[b]}{w + 1}"
            names.append(name)
            xml += (f'<geom name="{name}" type="box" size="{hx!r} {hy!r} {h!r}" '
                    f'pos="{cx + ox!r} {cy + oy!r} {h!r}" contype="0" conaffinity="0" '
                    f'rgba="{rgba}"/>\n')
    return xml, names


def build_xml(task: str) -> str:
    """MJCF of a task's scene. Body order: cube, link1..link7, left finger, right finger."""
    scene, walls = _scene_geoms(task)
    hand = ["hand_geom", "left_finger_geom", "right_finger_geom"]
    pairs = [("table", "cube")] + [(w, "cube") for w in walls]
    for g in hand:
        pairs += [("table", g)] + [(w, g) for w in walls]
    pairs += [("cube", g) for g in hand] + [("left_finger_geom", "right_finger_geom")]
    pair_xml = "\n    ".join(f'<pair geom1="{a}" geom2="{b}"/>' for a, b in pairs)
    act = []
    for i, (gain, kp, kd, force, crange) in enumerate(ARM_SERVO):
        crange = crange or DEFAULT_CTRL_RANGE
        act.append(f'<general name="actuator{i + 1}" joint="joint{i + 1}" dyntype="none" '
                   f'biastype="affine" gainprm="{gain!r}" biasprm="0 {-kp!r} {-kd!r}" '
                   f'ctrlrange="{_f(crange)}" forcerange="{-force!r} {force!r}"/>')
    gain, kp, kd, force, crange = FINGER_SERVO
    for i, j in enumerate(("finger_joint1", "finger_joint2")):
        act.append(f'<general name="actuator{8 + i}" joint="{j}" dyntype="none" '
                   f'biastype="affine" gainprm="{gain!r}" biasprm="0 {-kp!r} {-kd!r}" '
                   f'ctrlrange="{_f(crange)}" forcerange="{-force!r} {force!r}"/>')
    act_xml = "\n    ".join(act)
    impratio = ' impratio="10"' if TASKS[task]["bins"] else ""
    cx, cy = TASKS[task]["cube"]
    return f"""
<mujoco model="crl_panda_{task}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP!r}" iterations="{SOLVER_ITERATIONS}"
          ls_iterations="{LS_ITERATIONS}" solver="Newton" cone="pyramidal"
          integrator="implicitfast"{impratio}/>
  <worldbody>
    <geom name="table" type="plane" pos="{_f(TABLE_POS)}" size="2.8 2.4 0.1" contype="0"
          conaffinity="0" rgba="0.6 0.5 0.4 1"/>
    <geom name="base" type="cylinder" size="0.06 0.1665" pos="0 0 0.1665" contype="0"
          conaffinity="0" group="2" rgba="0.9 0.9 0.9 1"/>
    {scene}
    <body name="cube" pos="{cx!r} {cy!r} {CUBE_START_Z!r}">
      <freejoint name="cube"/>
      <geom name="cube" type="box" size="{CUBE_HALF!r} {CUBE_HALF!r} {CUBE_HALF!r}"
            contype="0" conaffinity="0" rgba="0 0.4 0 1"/>
    </body>
    {_arm_xml()}
  </worldbody>
  <equality>
    <joint joint1="finger_joint1" joint2="finger_joint2" solimp="0.95 0.99 0.001"
           solref="0.005 1"/>
  </equality>
  <contact>
    {pair_xml}
  </contact>
  <actuator>
    {act_xml}
  </actuator>
</mujoco>
"""


def action_to_ctrl(action: jax.Array) -> jax.Array:
    """The 9 actuator controls for a 5-dim action (see the module docstring)."""
    lo, hi = jp.array(TARGET_LOW), jp.array(TARGET_HIGH)
    arm = jp.zeros(7).at[jp.array(ACTION_JOINTS)].set(action[:4])
    arm = (lo + hi) / 2 + arm * (hi - lo) / 2
    grip = jp.where(action[4] > 0, GRIP_CLOSED_CTRL, GRIP_OPEN_CTRL)
    return jp.concatenate([arm, jp.stack([grip, grip])])


# --- Environments ----------------------------------------------------------------------------

class _ArmEnv(GoalEnv, PipelineEnv):
    """Shared arm machinery; subclasses name their task."""

    _task = ""

    def __init__(self, far_goals: bool = False, backend: str = "mjx", n_frames: int = N_FRAMES,
                 **kwargs):
        if backend != "mjx":
            raise ValueError("arm environments run on the mjx backend only")
        sys = mjcf.loads(build_xml(self._task))
        super().__init__(sys=sys, backend=backend, n_frames=n_frames, **kwargs)
        t = TASKS[self._task]
        self.far_goals = far_goals
        self.state_dim = 17
        self.goal_indices = (0, 1, 2)
        self.goal_reach_thresh = SUCCESS_DIST
        self.cube_center, self.goal_center, self.noise = t["cube"], t["goal"], t["noise"]

    @property
    def action_size(self) -> int:
        return 5

    def _sample_cube_goal(self, rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Cube start (x, y, 0.07) and goal (x, y, 0.03)."""
        k1, k2 = jax.random.split(rng)
        # far_goals: the cube from the outer half of its region along x, the goal from the outer
        # half of the goal region (the cube region lies at -x of the goal region).
        cx = (-1.0, -0.5) if self.far_goals else (-1.0, 1.0)
        gx = (0.5, 1.0) if self.far_goals else (-1.0, 1.0)
        uc = jax.random.uniform(k1, (2,), minval=jp.array([cx[0], -1.0]),
                                maxval=jp.array([cx[1], 1.0]))
        ug = jax.random.uniform(k2, (2,), minval=jp.array([gx[0], -1.0]),
                                maxval=jp.array([gx[1], 1.0]))
        cube = jp.array(self.cube_center) + self.noise * uc
        goal = jp.array(self.goal_center) + self.noise * ug
        return (jp.concatenate([cube, jp.array([CUBE_START_Z])]),
                jp.concatenate([goal, jp.array([GOAL_Z])]))

    def _obs(self, ps, goal: jax.Array) -> jax.Array:
        fingers = ps.x.pos[RIGHT_FINGER_BODY] - ps.x.pos[LEFT_FINGER_BODY]
        state = jp.concatenate([
            ps.q[0:3], ps.q[ARM_Q], ps.x.pos[EEF_BODY], ps.xd.vel[EEF_BODY],
            jp.linalg.norm(fingers)[None]])
        return jp.concatenate([state, goal])

    def _metrics(self, cube_pos: jax.Array, goal: jax.Array):
        dist = jp.linalg.norm(cube_pos - goal)
        success = (dist < self.goal_reach_thresh).astype(jp.float32)
        return success, {"success": success, "dist": dist}

    def reset(self, rng: jax.Array) -> State:
        cube_xyz, goal = self._sample_cube_goal(rng)
        q = jp.concatenate([cube_xyz, jp.array([1.0, 0.0, 0.0, 0.0]), jp.array(HOME_Q),
                            jp.full((2,), FINGER_HOME)])
        qd = jp.zeros(self.sys.qd_size())
        ps = self.pipeline_init(q, qd)
        obs = self._obs(ps, goal)
        _, metrics = self._metrics(obs[0:3], goal)
        zero = jp.zeros(())
        return State(pipeline_state=ps, obs=obs, reward=zero, done=zero, metrics=metrics,
                     info={"goal": goal})

    def step(self, state: State, action: jax.Array) -> State:
        ps = self.pipeline_step(state.pipeline_state, action_to_ctrl(action))
        goal = state.info["goal"]
        obs = self._obs(ps, goal)
        success, new_metrics = self._metrics(obs[0:3], goal)
        metrics = {**state.metrics, **new_metrics}
        return state.replace(pipeline_state=ps, obs=obs, reward=success,
                             done=jp.zeros_like(state.done), metrics=metrics)


class ArmPush(_ArmEnv):
    """Push the cube from its region on the table to a goal in the adjacent region."""

    def __init__(self, hard: bool, far_goals: bool = False, **kwargs):
        self.hard = hard
        self._task = "push_hard" if hard else "push_easy"
        super().__init__(far_goals=far_goals, **kwargs)


class ArmBinpick(_ArmEnv):
    """Pick the cube out of one bin and place it in the other."""

    def __init__(self, hard: bool = True, far_goals: bool = False, **kwargs):
        if not hard:
            raise ValueError("only ArmBinpick(hard=True) is defined")
        self.hard = hard
        self._task = "binpick_hard"
        super().__init__(far_goals=far_goals, **kwargs)
