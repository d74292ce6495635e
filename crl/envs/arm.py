"""Arm manipulation tasks (MJX): push a cube to a goal on the table, or pick it into a raised bin.

A 7-joint Franka-like arm with a two-finger parallel gripper, built from MuJoCo primitives in
Python (no asset files, so nothing depends on the working directory). Modelled on the JaxGCRL arm
tasks (arXiv 2408.11052), which use the MuJoCo Menagerie Panda; the geometry here follows the
Panda's main dimensions (shoulder 0.333 m, upper arm 0.316 m, forearm 0.384 m) without its small
lateral offsets, so inverse kinematics is closed-form.

World frame: the table is the plane z = 0, the arm base sits at the origin and works towards +x.

State (17 dims, `obs[:17]`; the goal follows as `obs[17:20]`):
  0:3   cube position (x, y, z)                      <- goal_indices (0, 1, 2)
  3:6   cube linear velocity
  6:9   end-effector position (grip centre between the finger pads)
  9:12  end-effector velocity (finite difference over one env step)
  12    gripper yaw psi (rad): angle of the finger axis from the world y axis, in [-pi/2, pi/2]
  13:15 cos(4 * cube_yaw), sin(4 * cube_yaw) (a cube looks the same every quarter turn; defined
        whichever face is down, see cube_yaw_features)
  15    finger gap (m): distance between the finger pads, 0 (closed) .. 0.08 (open)
  16    finger gap velocity (m/s)

Action (5 dims in [-1, 1], Cartesian control with the gripper always pointing down):
  0:3   end-effector displacement: target = current grip position + 0.04 m * a, clipped to the
        workspace (box EE_LOW..EE_HIGH above the table, within reach; see clip_workspace)
  3     gripper yaw rate: commanded psi += 0.25 rad * a, clipped to [-pi/2, pi/2] (integrated on
        the previous command, so the wrist does not drift)
  4     gripper: finger target opening = 0.02 m * (1 - a) per finger (+1 closes, -1 opens fully)
The target pose goes through closed-form IK (arm_ik) to 7 joint targets: joints 3 and 5 (upper-arm
and forearm rolls) are held at 0, joints 1/2/4 place the wrist, joint 6 keeps the hand vertical,
joint 7 sets the yaw. Position servos track them (damping on the joints, gravity compensation);
they cover ~0.022 m per step at full action. Physics: timestep 0.005 s, 10 substeps per env step
(dt = 0.05 s), Newton solver with 4 iterations. Reset: cube flat, yaw 0; arm at HOME_EE, open.

Only the cube collides (with the table, both finger pads, the palm and, for bin picking, the bin),
through explicit contact pairs, which keeps the MJX contact count small.

Tasks (success: cube within 0.1 of the goal; reward = success; episodes never end early):
  ArmPush(hard=False): cube and goal in small adjacent regions in front of the arm.
  ArmPush(hard=True):  wider, farther apart regions.
  ArmBinpick(hard=True): cube on the table, goal inside a bin raised 0.1 above the table: the cube
    must be grasped and lifted (the table surface is >= 0.1 below any goal).
  far_goals=True: cube and goal drawn from the opposite far ends of their regions (along y).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jp
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf

from crl.envs.base import GoalEnv

# --- Geometry (metres) -----------------------------------------------------------------------
SHOULDER_Z = 0.333      # joint 2 height above the base
L_UPPER = 0.316         # joint 2 -> joint 4
L_FORE = 0.384          # joint 4 -> joint 6
WRIST_TO_J7 = 0.08      # joint 6 -> joint 7 (the flange roll)
J7_TO_GRIP = 0.16       # joint 7 -> grip centre (between the finger pads)
L_HAND = WRIST_TO_J7 + J7_TO_GRIP
CUBE_HALF = 0.025
FINGER_MAX = 0.04       # per-finger opening (pad to grip centre)

# Workspace box of the end-effector target (grip centre).
EE_LOW = (0.15, -0.5, CUBE_HALF)
EE_HIGH = (0.72, 0.5, 0.45)
EE_R_MIN, EE_R_MAX = 0.2, 0.68
WRIST_REACH = 0.69      # max shoulder-to-wrist distance (L_UPPER + L_FORE = 0.7: stay off the
                        # stretched-out singularity)
EE_STEP = 0.04
YAW_STEP = 0.25
HOME_EE = (0.35, 0.0, 0.2)

# Bin (ArmBinpick): a pedestal whose top (the bin floor) is BIN_FLOOR above the table, with a rim.
BIN_CENTER = (0.45, 0.25)
BIN_HALF = 0.1
BIN_FLOOR = 0.1

TIMESTEP = 0.005
N_FRAMES = 10           # env dt = 0.05 s


# Joint servos: (kp, joint damping, force limit). Damping sits on the joints, where Euler integrates
# it implicitly; a velocity gain on the actuator instead makes the arm jitter (and grasps creep).
ARM_SERVO = {"j1": (600, 36, 150), "j2": (1000, 60, 150), "j3": (500, 30, 100),
             "j4": (800, 46, 150), "j5": (120, 8, 50), "j6": (120, 8, 50), "j7": (80, 5, 30)}


def _arm_joint_xml() -> str:
    """Kinematic chain of the arm: 7 hinges (z, y, z, y, z, y, z) and the gripper."""
    a = 'damping="{d}" armature="0.05"'
    cap = 'type="capsule" contype="0" conaffinity="0" rgba="0.9 0.9 0.9 1"'
    return f"""
    <body name="link1" pos="0 0 0" gravcomp="1">
      <joint name="j1" axis="0 0 1" {a.format(d=ARM_SERVO["j1"][1])}/>
      <geom {cap} size="0.06" fromto="0 0 0 0 0 {SHOULDER_Z}"/>
      <body name="link2" pos="0 0 {SHOULDER_Z}" gravcomp="1">
        <joint name="j2" axis="0 1 0" {a.format(d=ARM_SERVO["j2"][1])}/>
        <geom {cap} size="0.05" fromto="0 0 0 0 0 {L_UPPER / 2}"/>
        <body name="link3" pos="0 0 {L_UPPER / 2}" gravcomp="1">
          <joint name="j3" axis="0 0 1" {a.format(d=ARM_SERVO["j3"][1])}/>
          <geom {cap} size="0.05" fromto="0 0 0 0 0 {L_UPPER / 2}"/>
          <body name="link4" pos="0 0 {L_UPPER / 2}" gravcomp="1">
            <joint name="j4" axis="0 1 0" {a.format(d=ARM_SERVO["j4"][1])}/>
            <geom {cap} size="0.045" fromto="0 0 0 0 0 {L_FORE / 2}"/>
            <body name="link5" pos="0 0 {L_FORE / 2}" gravcomp="1">
              <joint name="j5" axis="0 0 1" {a.format(d=ARM_SERVO["j5"][1])}/>
              <geom {cap} size="0.04" fromto="0 0 0 0 0 {L_FORE / 2}"/>
              <body name="link6" pos="0 0 {L_FORE / 2}" gravcomp="1">
                <joint name="j6" axis="0 1 0" {a.format(d=ARM_SERVO["j6"][1])}/>
                <geom {cap} size="0.04" fromto="0 0 0 0 0 {WRIST_TO_J7}"/>
                <body name="link7" pos="0 0 {WRIST_TO_J7}" gravcomp="1">
                  <joint name="j7" axis="0 0 1" {a.format(d=ARM_SERVO["j7"][1])}/>
                  <geom name="flange" type="cylinder" size="0.04 0.01" pos="0 0 0.01"
                        contype="0" conaffinity="0" rgba="0.3 0.3 0.3 1" mass="0.3"/>
                  <geom name="palm" type="box" size="0.025 0.07 0.02" pos="0 0 0.08"
                        contype="0" conaffinity="0" rgba="0.3 0.3 0.3 1" mass="0.4"/>
                  <site name="grip" pos="0 0 {J7_TO_GRIP}" size="0.01"/>
                  <body name="finger_l" pos="0 0 0.1" gravcomp="1">
                    <joint name="fl" type="slide" axis="0 1 0" damping="10" armature="0.05"/>
                    <geom name="pad_l" type="box" size="0.012 0.006 0.04" pos="0 0.006 0.04"
                          contype="0" conaffinity="0" rgba="0.2 0.2 0.2 1" mass="0.05"/>
                  </body>
                  <body name="finger_r" pos="0 0 0.1" gravcomp="1">
                    <joint name="fr" type="slide" axis="0 -1 0" damping="10" armature="0.05"/>
                    <geom name="pad_r" type="box" size="0.012 0.006 0.04" pos="0 -0.006 0.04"
                          contype="0" conaffinity="0" rgba="0.2 0.2 0.2 1" mass="0.05"/>
                  </body>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>"""


def _bin_xml() -> str:
    """A pedestal box (its top is the bin floor) with a capsule rim along its top edges."""
    cx, cy = BIN_CENTER
    h = BIN_FLOOR / 2
    r = 0.01
    rim_z = BIN_FLOOR + r + 0.01
    e = BIN_HALF
    rim = []
    sides = [(-e, -e, e, -e), (e, -e, e, e), (e, e, -e, e), (-e, e, -e, -e)]
    for i, (x0, y0, x1, y1) in enumerate(sides):
        rim.append(
            f'<geom name="rim{i}" type="capsule" size="{r}" '
            f'fromto="{cx + x0} {cy + y0} {rim_z} {cx + x1} {cy + y1} {rim_z}" '
            'contype="0" conaffinity="0" rgba="0.8 0.2 0.2 1"/>')
    rim = "\n    ".join(rim)
    return f"""
    <geom name="pedestal" type="box" size="{e} {e} {h}" pos="{cx} {cy} {h}"
          contype="0" conaffinity="0" rgba="0.8 0.3 0.3 1"/>
    {rim}"""


def build_xml(with_bin: bool) -> str:
    """MJCF of the scene. The cube is the first body, so qpos[0:7] is its free joint."""
    pairs = ["floor", "pad_l", "pad_r", "palm"]
    if with_bin:
        pairs += ["pedestal", "rim0", "rim1", "rim2", "rim3"]

    def pair(g):
        if g.startswith("pad"):
            # Grippy finger pads, as stiff as the timestep allows. (A higher solimp creeps less
            # under load but makes the cube flip out of the grasp when the lift starts.)
            return (f'<pair geom1="cube" geom2="{g}" condim="3" '
                    f'friction="1.5 1.5 0.005 0.0001 0.0001" solref="{2 * TIMESTEP} 1"/>')
        return f'<pair geom1="cube" geom2="{g}" condim="3" friction="0.6 0.6 0.005 0.0001 0.0001"/>'
    pair_xml = "\n    ".join(pair(g) for g in pairs)
    arm_servo = "\n    ".join(
        f'<position name="a_{j}" joint="{j}" kp="{kp}" forcerange="-{f} {f}"/>'
        for j, (kp, _, f) in ARM_SERVO.items())
    return f"""
<mujoco model="crl_arm">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" iterations="4" ls_iterations="8" solver="Newton"
          integrator="Euler" cone="pyramidal"/>
  <worldbody>
    <geom name="floor" type="plane" size="2 2 0.1" contype="0" conaffinity="0"
          rgba="0.6 0.5 0.4 1"/>
    <body name="cube" pos="0.4 0 {CUBE_HALF}">
      <freejoint name="cube"/>
      <geom name="cube" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.1"
            contype="0" conaffinity="0" rgba="0.2 0.4 0.9 1"/>
    </body>
    {_bin_xml() if with_bin else ""}
    {_arm_joint_xml()}
  </worldbody>
  <contact>
    {pair_xml}
  </contact>
  <actuator>
    {arm_servo}
    <position name="a_fl" joint="fl" kp="300" forcerange="-20 20"/>
    <position name="a_fr" joint="fr" kp="300" forcerange="-20 20"/>
  </actuator>
</mujoco>
"""


# --- Kinematics ------------------------------------------------------------------------------

def arm_ik(ee: jax.Array, psi: jax.Array) -> jax.Array:
    """Joint targets (7,) putting the grip centre at `ee` with the hand pointing down, yaw psi.

    Joints 3 and 5 stay 0, so joints 2, 4, 6 act as a planar 3-link arm in the vertical plane at
    azimuth joint 1; joint 6 makes the hand vertical; joint 7 = joint1 - psi sets the finger axis.
    """
    x, y, z = ee[0], ee[1], ee[2]
    q1 = jp.arctan2(y, x)
    r = jp.sqrt(x * x + y * y)
    h = z + L_HAND - SHOULDER_Z
    d2 = r * r + h * h
    c4 = jp.clip((d2 - L_UPPER ** 2 - L_FORE ** 2) / (2 * L_UPPER * L_FORE), -1.0, 1.0)
    q4 = jp.arccos(c4)
    q2 = jp.arctan2(r, h) - jp.arctan2(L_FORE * jp.sin(q4), L_UPPER + L_FORE * c4)
    q6 = jp.pi - q2 - q4
    q7 = q1 - psi
    zero = jp.zeros_like(q1)
    return jp.stack([q1, q2, zero, q4, zero, q6, q7])


def clip_workspace(ee: jax.Array) -> jax.Array:
    """Clips an end-effector target to the box EE_LOW..EE_HIGH, to a horizontal distance from the
    base axis in [EE_R_MIN, EE_R_MAX], and to what the arm reaches with the hand pointing down."""
    ee = jp.clip(ee, jp.array(EE_LOW), jp.array(EE_HIGH))
    h = ee[2] + L_HAND - SHOULDER_Z
    r_max = jp.minimum(EE_R_MAX, jp.sqrt(jp.maximum(WRIST_REACH ** 2 - h * h, 0.0)))
    r = jp.sqrt(ee[0] ** 2 + ee[1] ** 2)
    scale = jp.clip(r, EE_R_MIN, r_max) / jp.maximum(r, 1e-6)
    return ee.at[:2].multiply(scale)


def cube_yaw_features(quat: jax.Array) -> jax.Array:
    """(cos 4y, sin 4y) of the cube's yaw y, whatever face it rests on (a cube looks the same
    every quarter turn). Each body axis projected on the table, as a complex number u, adds u^4
    (angle 4 * its yaw, weight |u|^4, so a vertical axis adds nothing); the sum is normalised."""
    w, x, y, z = quat[0], quat[1], quat[2], quat[3]
    # World x and y components of the body x, y, z axes (columns of the rotation matrix).
    ax = jp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)])
    ay = jp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)])
    re2, im2 = ax * ax - ay * ay, 2 * ax * ay
    re4, im4 = (re2 * re2 - im2 * im2).sum(), (2 * re2 * im2).sum()
    norm = jp.maximum(jp.sqrt(re4 * re4 + im4 * im4), 1e-6)
    return jp.stack([re4 / norm, im4 / norm])


# --- Environments ----------------------------------------------------------------------------

class _ArmEnv(GoalEnv, PipelineEnv):
    """Shared arm machinery; subclasses define the cube/goal distributions and the scene."""

    # qpos layout: cube free joint (0:7: position, quaternion), arm joints 1-7 (7:14), fingers
    # (14:16); qvel: cube (0:6: linear, angular), arm (6:13), fingers (13:15).
    _with_bin = False

    def __init__(self, far_goals: bool = False, backend: str = "mjx", n_frames: int = N_FRAMES,
                 **kwargs):
        if backend != "mjx":
            raise ValueError("arm environments run on the mjx backend only")
        sys = mjcf.loads(build_xml(self._with_bin))
        super().__init__(sys=sys, backend=backend, n_frames=n_frames, **kwargs)
        self.far_goals = far_goals
        self.state_dim = 17
        self.goal_indices = (0, 1, 2)
        self.goal_reach_thresh = 0.1
        self._grip_site = 0
        self._home_q = arm_ik(jp.array(HOME_EE), jp.array(0.0))

    @property
    def action_size(self) -> int:
        return 5

    # Subclasses: cube xy range and goal range as (low, high) arrays.
    def _sample_cube_goal(self, rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    @staticmethod
    def _uniform_box(rng, center, half, u_low, u_high):
        """center + half * u with u uniform in [u_low, u_high] per coordinate."""
        u = jax.random.uniform(rng, (len(center),), minval=jp.array(u_low), maxval=jp.array(u_high))
        return jp.array(center) + jp.array(half) * u

    def _obs(self, ps, prev_ee: jax.Array, prev_gap: jax.Array, goal: jax.Array):
        q, qd = ps.q, ps.qd
        cube_pos = q[0:3]
        cube_vel = qd[0:3]
        ee = ps.site_xpos[self._grip_site]
        dt = self.dt
        ee_vel = (ee - prev_ee) / dt
        psi = q[7] - q[13]
        gap = q[14] + q[15]
        gap_vel = (gap - prev_gap) / dt
        state = jp.concatenate([
            cube_pos, cube_vel, ee, ee_vel, psi[None], cube_yaw_features(q[3:7]), gap[None],
            gap_vel[None]])
        return jp.concatenate([state, goal]), ee, gap

    def _metrics(self, cube_pos: jax.Array, goal: jax.Array):
        dist = jp.linalg.norm(cube_pos - goal)
        success = (dist < self.goal_reach_thresh).astype(jp.float32)
        return success, {"success": success, "dist": dist}

    def reset(self, rng: jax.Array) -> State:
        cube_xyz, goal = self._sample_cube_goal(rng)
        q = jp.concatenate([cube_xyz, jp.array([1.0, 0.0, 0.0, 0.0]), self._home_q,
                            jp.full((2,), FINGER_MAX)])
        qd = jp.zeros(self.sys.qd_size())
        ctrl = jp.concatenate([self._home_q, jp.full((2,), FINGER_MAX)])
        ps = self.pipeline_init(q, qd, ctrl=ctrl)
        ee = ps.site_xpos[self._grip_site]
        gap = q[14] + q[15]
        obs, _, _ = self._obs(ps, ee, gap, goal)
        success, metrics = self._metrics(obs[0:3], goal)
        zero = jp.zeros(())
        return State(pipeline_state=ps, obs=obs, reward=zero, done=zero, metrics=metrics,
                     info={"goal": goal})

    def _ctrl(self, ps, action: jax.Array) -> jax.Array:
        a = jp.clip(action, -1.0, 1.0)
        ee = ps.site_xpos[self._grip_site]
        target = clip_workspace(ee + EE_STEP * a[0:3])
        # Yaw integrates on the previously commanded yaw (ctrl of joints 1 and 7): measured yaw lags
        # differently on the two joints, and re-basing on it would make the wrist drift.
        psi = ps.ctrl[0] - ps.ctrl[6]
        psi_t = jp.clip(psi + YAW_STEP * a[3], -jp.pi / 2, jp.pi / 2)
        arm = arm_ik(target, psi_t)
        finger = 0.5 * FINGER_MAX * (1.0 - a[4])
        return jp.concatenate([arm, jp.stack([finger, finger])])

    def step(self, state: State, action: jax.Array) -> State:
        ps0 = state.pipeline_state
        ps = self.pipeline_step(ps0, self._ctrl(ps0, action))
        goal = state.info["goal"]
        obs, _, _ = self._obs(ps, state.obs[6:9], state.obs[15], goal)
        success, new_metrics = self._metrics(obs[0:3], goal)
        metrics = {**state.metrics, **new_metrics}
        return state.replace(pipeline_state=ps, obs=obs, reward=success,
                             done=jp.zeros_like(state.done), metrics=metrics)


class ArmPush(_ArmEnv):
    """Push the cube across the table to a goal on the table."""

    def __init__(self, hard: bool, far_goals: bool = False, **kwargs):
        self.hard = hard
        if hard:
            self._cube_c, self._cube_h = (0.42, -0.17), (0.12, 0.15)
            self._goal_c, self._goal_h = (0.42, 0.17), (0.12, 0.15)
        else:
            self._cube_c, self._cube_h = (0.45, -0.1), (0.1, 0.1)
            self._goal_c, self._goal_h = (0.45, 0.1), (0.1, 0.1)
        super().__init__(far_goals=far_goals, **kwargs)

    def _sample_cube_goal(self, rng):
        k1, k2 = jax.random.split(rng)
        # far_goals: cube from the -y end of its region, goal from the +y end of its region.
        cy = (-1.0, -0.5) if self.far_goals else (-1.0, 1.0)
        gy = (0.5, 1.0) if self.far_goals else (-1.0, 1.0)
        cube = self._uniform_box(k1, self._cube_c, self._cube_h, (-1.0, cy[0]), (1.0, cy[1]))
        goal = self._uniform_box(k2, self._goal_c, self._goal_h, (-1.0, gy[0]), (1.0, gy[1]))
        z = jp.array([CUBE_HALF])
        return jp.concatenate([cube, z]), jp.concatenate([goal, z])


class ArmBinpick(_ArmEnv):
    """Grasp the cube on the table, lift it and place it in the raised bin."""

    _with_bin = True

    def __init__(self, hard: bool = True, far_goals: bool = False, **kwargs):
        if not hard:
            raise ValueError("only ArmBinpick(hard=True) is defined")
        self.hard = hard
        self._cube_c, self._cube_h = (0.45, -0.15), (0.1, 0.1)
        self._goal_c, self._goal_h = BIN_CENTER, (0.05, 0.05)
        super().__init__(far_goals=far_goals, **kwargs)

    def _sample_cube_goal(self, rng):
        k1, k2 = jax.random.split(rng)
        cy = (-1.0, -0.5) if self.far_goals else (-1.0, 1.0)
        gy = (0.5, 1.0) if self.far_goals else (-1.0, 1.0)
        cube = self._uniform_box(k1, self._cube_c, self._cube_h, (-1.0, cy[0]), (1.0, cy[1]))
        goal = self._uniform_box(k2, self._goal_c, self._goal_h, (-1.0, gy[0]), (1.0, gy[1]))
        cube = jp.concatenate([cube, jp.array([CUBE_HALF])])
        goal = jp.concatenate([goal, jp.array([BIN_FLOOR + CUBE_HALF])])
        return cube, goal
