"""Tests of the MJX arm environments (crl/envs/arm.py) against the facts of the reference code.

MJX compiles slowly on CPU (tens of seconds per jitted function), so the MJX tests share one
jitted function (reset + unroll of N push-easy envs for T steps, module fixture) and call it a
few times; the other two tasks are checked by shapes (jax.eval_shape traces without compiling),
by their pure-JAX samplers and through the same model in MuJoCo's C engine (fast, float64; it
settles where MJX does, but its transients differ while a servo's force is clamped: MJX's
implicit-fast step keeps the servo's velocity gain in its damping term even then, so clamped
wrist joints move more slowly in MJX than in C). The 64-env throughput run is `slow`.

Reference facts pinned here (link7 poses, finger positions) were computed with MuJoCo from the
reference's panda_push_easy.xml as Brax's loader builds it (jointless bodies fused).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from crl.envs import ENV_SPECS, make_env
from crl.envs import arm
from crl.envs.arm import ArmBinpick, ArmPush

ARM_ENVS = sorted(n for n in ENV_SPECS if n.startswith("arm_"))
TASK_OF = {"arm_push_easy": "push_easy", "arm_push_hard": "push_hard",
           "arm_binpick_hard": "binpick_hard"}
N, T = 4, 10
# Fixture actions, one per env, held for T steps: joints 1, 2, 4, 6 targets and the gripper.
ACTIONS = np.array([[0.0, 0.0, 0.0, 0.0, 1.0],       # home-ish targets, gripper closed
                    [-1.0, -1.0, -1.0, -1.0, -1.0],  # all lows, open
                    [1.0, 1.0, 1.0, 1.0, 1.0],       # all highs, closed
                    [0.5, -0.5, 0.3, -0.3, 0.0]],    # 0 counts as open
                   np.float32)


def _c_model(task: str) -> mujoco.MjModel:
    return mujoco.MjModel.from_xml_string(arm.build_xml(task))


def _run_fn(env):
    """jit((keys [N], actions [T, N, 5], goal [N, 3], use_goal [N]) -> (s0, final, traj))."""
    reset, step = jax.vmap(env.reset), jax.vmap(env.step)

    def run(keys, actions, goal, use_goal):
        s0 = reset(keys)
        g = jnp.where(use_goal[:, None], goal, s0.info["goal"])
        s = s0.replace(info={**s0.info, "goal": g})

        def f(s, a):
            s = step(s, a)
            return s, s
        final, traj = jax.lax.scan(f, s, actions)
        return s0, final, traj

    return jax.jit(run)


@pytest.fixture(scope="module")
def easy():
    env = ArmPush(hard=False)
    return env, _run_fn(env)


@pytest.fixture(scope="module")
def easy_run(easy):
    env, run = easy
    keys = jax.random.split(jax.random.PRNGKey(0), N)
    actions = jnp.asarray(np.broadcast_to(ACTIONS, (T, N, 5)))
    s0, final, traj = run(keys, actions, jnp.zeros((N, 3)), jnp.zeros(N, bool))
    return keys, actions, s0, final, traj


# --- Sizes, registry, model facts (no MJX compile) -------------------------------------------

def test_registry_and_sizes():
    for name in ARM_ENVS:
        env = make_env(name)
        assert isinstance(env, (ArmPush, ArmBinpick))
        assert env.state_dim == 17 and tuple(env.goal_indices) == (0, 1, 2) and env.goal_dim == 3
        assert env.observation_size == 20 and env.action_size == 5
        assert env.goal_reach_thresh == pytest.approx(0.1)
        assert env.backend == "mjx"
        assert float(env.dt) == pytest.approx(0.05)          # 25 substeps of 0.002 s
        assert ENV_SPECS[name].episode_length == 1000
    assert make_env("arm_push_hard").hard and not make_env("arm_push_easy").hard


def test_model_is_built_in_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # no asset path may depend on the working directory
    env = ArmBinpick(far_goals=True)
    assert env.sys.nu == 9 and env.sys.nq == 16 and env.sys.nv == 15


@pytest.mark.parametrize("task", sorted(arm.TASKS))
def test_model_facts(task):
    m = _c_model(task)
    names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, b) for b in range(m.nbody)]
    assert names == ["world", "cube"] + [f"link{i}" for i in range(1, 8)] + [
        "left_finger", "right_finger"]
    # Brax's body arrays drop the world body: link7 and the fingers sit where the env reads them.
    assert names[arm.EEF_BODY + 1] == "link7"
    assert names[arm.LEFT_FINGER_BODY + 1] == "left_finger"
    assert names[arm.RIGHT_FINGER_BODY + 1] == "right_finger"
    assert m.opt.timestep == pytest.approx(0.002)
    assert (m.opt.iterations, m.opt.ls_iterations) == (6, 12)
    assert m.opt.integrator == mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    assert m.opt.solver == mujoco.mjtSolver.mjSOL_NEWTON
    assert m.opt.cone == mujoco.mjtCone.mjCONE_PYRAMIDAL
    assert m.opt.impratio == pytest.approx(10.0 if task == "binpick_hard" else 1.0)
    # Joints: hinges about z; only 2, 4, 6 limited (as Brax loads the reference); fingers slide.
    ranges = {1: (-1.7628, 1.7628), 3: (-3.0718, -0.0698), 5: (-0.0175, 3.7525)}
    for j in range(7):
        jid = j + 1                                    # joint 0 is the cube's free joint
        assert m.jnt_type[jid] == mujoco.mjtJoint.mjJNT_HINGE
        np.testing.assert_array_equal(m.jnt_axis[jid], [0, 0, 1])
        assert bool(m.jnt_limited[jid]) == (j in ranges)
        if j in ranges:
            np.testing.assert_allclose(m.jnt_range[jid], ranges[j])
    np.testing.assert_allclose(m.dof_damping[6:13], 0.0)
    np.testing.assert_allclose(m.dof_armature[6:13], 0.0)
    np.testing.assert_allclose(m.dof_damping[13:15], 5.0)
    np.testing.assert_allclose(m.jnt_range[8:10], [[0.0, 0.08]] * 2)
    np.testing.assert_allclose(m.jnt_axis[8:10], [[0, 1, 0]] * 2)
    np.testing.assert_allclose(
        m.body_mass[2:11], [4.970684, 0.646926, 3.228604, 3.587895, 1.225946, 1.666555,
                            0.735522, 0.015, 0.015])
    assert m.body_mass[1] == pytest.approx(0.216)              # cube: 0.06 m box, density 1000
    # Servos: force = gain * ctrl - kp * q - kd * qdot.
    np.testing.assert_allclose(m.actuator_gainprm[:, 0],
                               [4500, 4500, 2000, 2000, 1000, 1000, 1000, 0.15686, 0.15686])
    np.testing.assert_allclose(-m.actuator_biasprm[:, 1],
                               [4500, 4500, 3500, 3500, 2000, 2000, 2000, 500, 500])
    np.testing.assert_allclose(-m.actuator_biasprm[:, 2],
                               [450, 450, 350, 350, 200, 200, 200, 50, 50])
    np.testing.assert_allclose(m.actuator_forcerange[:, 1], [87] * 4 + [12] * 3 + [500] * 2)
    np.testing.assert_allclose(m.actuator_ctrlrange[[1, 3, 5, 7]],
                               [[-1.7628, 1.7628], [-3.0718, -0.0698], [-0.0175, 3.7525],
                                [0, 255]])
    n_walls = 8 if task == "binpick_hard" else 0
    assert m.npair == 8 + 4 * n_walls
    assert m.neq == 1 and m.eq_type[0] == mujoco.mjtEq.mjEQ_JOINT


# Reference facts: (joint angles) -> link7 position, link7 quaternion, left finger position
# (fingers at 0.04 each), from the reference model.
REFERENCE_FK = [
    ((1.571, 0.742, 0, -1.571, 0, 3.054, 1.449), (-0.000138, 0.678043, 0.370831),
     (-0.361413, 0.930413, 0.056826, 0.022), (0.031354, 0.771521, 0.232169)),
    ((0.3491, 0, 0, -3.0718, 0, 2.3562, 1.4487), (0.24243, 0.088247, 0.213954),
     (0.274093, 0.798632, -0.489426, -0.217998), (0.133776, 0.015154, 0.105285)),
    ((2.7925, 1.48353, 0, -0.0698, 0, 3.7525, 1.4487), (-0.613387, 0.223273, 0.43874),
     (-0.759707, 0.355292, 0.282582, -0.465575), (-0.741946, 0.30361, 0.516043)),
    ((0.5, -0.3, 0.7, -1.0, 0.4, 1.2, -0.9), (-0.021888, 0.326218, 1.016571),
     (-0.099908, 0.37967, 0.900563, 0.186694), (-0.027372, 0.430829, 0.882468)),
]


def test_kinematic_chain_matches_reference():
    m = _c_model("push_easy")
    d = mujoco.MjData(m)
    for q, pos, quat, left in REFERENCE_FK:
        d.qpos[:] = 0.0
        d.qpos[3] = 1.0
        d.qpos[arm.ARM_Q] = q
        d.qpos[arm.FINGER_Q] = 0.04
        mujoco.mj_kinematics(m, d)
        np.testing.assert_allclose(d.xpos[arm.EEF_BODY + 1], pos, atol=2e-5)
        qq = d.xquat[arm.EEF_BODY + 1]
        assert abs(abs(np.dot(qq, quat)) - 1.0) < 1e-5, (qq, quat)
        np.testing.assert_allclose(d.xpos[arm.LEFT_FINGER_BODY + 1], left, atol=2e-5)
        gap = d.xpos[arm.RIGHT_FINGER_BODY + 1] - d.xpos[arm.LEFT_FINGER_BODY + 1]
        assert np.linalg.norm(gap) == pytest.approx(0.08, abs=1e-6)


def test_task_geometry():
    for task in ("push_easy", "push_hard"):
        m = _c_model(task)
        t = arm.TASKS[task]
        for k in ("cube", "goal"):     # flat region markers, visual only
            g = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"region_{k}")
            np.testing.assert_allclose(m.geom_pos[g][:2], t[k])
            np.testing.assert_allclose(m.geom_size[g][:2], [t["noise"]] * 2)
    assert arm.TASKS["push_easy"] == dict(cube=(-0.1, 0.6), goal=(0.1, 0.6), noise=0.1, bins=False)
    assert arm.TASKS["push_hard"] == dict(cube=(-0.25, 0.65), goal=(0.25, 0.65), noise=0.25,
                                          bins=False)
    assert arm.TASKS["binpick_hard"] == dict(cube=(-0.3, 0.6), goal=(0.3, 0.6), noise=0.15,
                                             bins=True)
    # Binpick: two open bins (walls 0.066 high, 0.01 thick) centred on the cube and goal regions.
    m = _c_model("binpick_hard")
    walls = {mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_GEOM, g): g for g in range(m.ngeom)}
    for b, centre in zip("AB", [(-0.3, 0.6), (0.3, 0.6)]):
        lo, hi = [], []
        for w in range(1, 5):
            g = walls[f"bin{b}{w}"]
            assert m.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX
            assert m.geom_pos[g][2] == pytest.approx(0.033)
            assert m.geom_size[g][2] == pytest.approx(0.033)
            lo.append(m.geom_pos[g] - m.geom_size[g])
            hi.append(m.geom_pos[g] + m.geom_size[g])
        lo, hi = np.min(lo, 0), np.max(hi, 0)
        np.testing.assert_allclose(lo[:2], np.subtract(centre, 0.195), atol=1e-9)
        np.testing.assert_allclose(hi[:2], np.add(centre, 0.195), atol=1e-9)
        assert lo[2] == pytest.approx(0.0) and hi[2] == pytest.approx(0.066)
        # The region (noise 0.15) plus the cube's half-size fits inside the walls (0.185).
        assert 0.15 + arm.CUBE_HALF < 0.185
    table = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "table")
    assert m.geom_type[table] == mujoco.mjtGeom.mjGEOM_PLANE and m.geom_pos[table][2] == 0.0


def _samples(env, n=2048):
    cube, goal = jax.vmap(env._sample_cube_goal)(jax.random.split(jax.random.PRNGKey(7), n))
    return np.asarray(cube), np.asarray(goal)


@pytest.mark.parametrize("name", ARM_ENVS)
def test_start_and_goal_distributions(name):
    t = arm.TASKS[TASK_OF[name]]
    near, far = make_env(name), make_env(name, far_goals=True)
    cube, goal = _samples(near)
    cube_f, goal_f = _samples(far)
    n = t["noise"]
    np.testing.assert_allclose(cube[:, 2], 0.07)                 # dropped from 0.07
    np.testing.assert_allclose(goal[:, 2], 0.03)                 # a cube resting on the table
    for pts, c in ((cube, t["cube"]), (goal, t["goal"])):
        off = pts[:, :2] - np.asarray(c)
        assert (np.abs(off) <= n + 1e-6).all()
        assert (off.min(0) < -0.9 * n).all() and (off.max(0) > 0.9 * n).all()   # uniform, full
        np.testing.assert_allclose(off.mean(0), 0.0, atol=0.06 * n)
    # far_goals: outer halves along x of the same regions.
    off_c, off_g = cube_f[:, :2] - np.asarray(t["cube"]), goal_f[:, :2] - np.asarray(t["goal"])
    assert (np.abs(off_c) <= n + 1e-6).all() and (np.abs(off_g) <= n + 1e-6).all()
    assert (off_c[:, 0] <= -0.5 * n + 1e-6).all() and (off_g[:, 0] >= 0.5 * n - 1e-6).all()
    dist = np.linalg.norm(goal[:, :2] - cube[:, :2], axis=-1)
    dist_f = np.linalg.norm(goal_f[:, :2] - cube_f[:, :2], axis=-1)
    assert dist_f.mean() > dist.mean() + 0.05 and dist_f.min() > 0.1


def test_action_to_ctrl():
    lo, hi = np.array(arm.TARGET_LOW), np.array(arm.TARGET_HIGH)
    for a4, grip in ((1.0, 0.0), (0.01, 0.0), (0.0, 255.0), (-1.0, 255.0)):
        for a in (-1.0, 0.0, 1.0, 0.3):
            ctrl = np.asarray(arm.action_to_ctrl(jnp.array([a, a, a, a, a4])))
            want = (lo + hi) / 2 + a * (hi - lo) / 2
            want[[2, 4]] = 0.0
            want[6] = 1.4487
            np.testing.assert_allclose(ctrl[:7], want, atol=1e-6)
            np.testing.assert_array_equal(ctrl[7:], [grip, grip])
    ctrl = np.asarray(arm.action_to_ctrl(jnp.array([-1.0, -1.0, -1.0, -1.0, 1.0])))
    np.testing.assert_allclose(ctrl[[0, 1, 3, 5]], [0.3491, 0.0, -3.0718, 2.3562], atol=1e-6)
    ctrl = np.asarray(arm.action_to_ctrl(jnp.array([1.0, 1.0, 1.0, 1.0, 1.0])))
    np.testing.assert_allclose(ctrl[[0, 1, 3, 5]], [2.7925, 1.48353, -0.0698, 3.7525], atol=1e-6)


def test_servos_reach_their_equilibrium():
    """Held commands settle (MuJoCo's C engine, same model): joints 1 and 2 at their targets,
    4 at 4/7 and 6, 7 at 1/2 of the command (the reference's gain/kp), within gravity sag;
    fingers closed (0) or open (0.08 each)."""
    m = _c_model("push_easy")
    for a in ACTIONS:
        d = mujoco.MjData(m)
        d.qpos[:] = np.concatenate([[-0.1, 0.6, 0.07, 1, 0, 0, 0], arm.HOME_Q, [0.04, 0.04]])
        ctrl = np.asarray(arm.action_to_ctrl(jnp.asarray(a)), np.float64)
        d.ctrl[:] = ctrl
        mujoco.mj_step(m, d, 25 * 40)                # 40 env steps = 2 s
        eq = arm.servo_equilibrium(ctrl)
        np.testing.assert_allclose(d.qpos[arm.ARM_Q], eq[:7], atol=0.03)
        np.testing.assert_allclose(d.qpos[arm.ARM_Q][[0, 1]], ctrl[[0, 1]], atol=0.03)
        np.testing.assert_allclose(d.qpos[arm.FINGER_Q], 0.0 if a[4] > 0 else 0.08, atol=2e-3)
        assert np.abs(d.qvel[6:]).max() < 0.01
    np.testing.assert_allclose(arm.servo_equilibrium([1.0, 1.0, 1.0, -1.0, 1.0, 3.0, 1.4487,
                                                      255, 0])[[2, 3, 5, 6, 7, 8]],
                               [4 / 7, -4 / 7, 1.5, 0.72435, 0.08, 0.0], atol=1e-4)


# --- MJX: one compiled push-easy run ----------------------------------------------------------

def _check_state(env, s, batch):
    assert s.obs.shape == batch + (env.observation_size,) and s.obs.dtype == jnp.float32
    assert s.reward.shape == batch and s.done.shape == batch
    assert s.reward.dtype == jnp.float32 and s.done.dtype == jnp.float32
    assert set(s.metrics) == {"success", "dist"}
    for v in s.metrics.values():
        assert v.shape == batch and v.dtype == jnp.float32
    assert s.info["goal"].shape == batch + (3,)


def test_shapes_reset_step_push_easy(easy, easy_run):
    env = easy[0]
    _, _, s0, final, traj = easy_run
    _check_state(env, s0, (N,))
    _check_state(env, final, (N,))
    _check_state(env, traj, (T, N))
    np.testing.assert_array_equal(np.asarray(s0.reward), 0.0)
    np.testing.assert_array_equal(np.asarray(traj.reward), np.asarray(traj.metrics["success"]))
    np.testing.assert_array_equal(np.asarray(traj.done), 0.0)       # never ends early
    assert np.isfinite(np.asarray(traj.obs)).all()


@pytest.mark.parametrize("name", ["arm_push_hard", "arm_binpick_hard"])
def test_shapes_other_envs(name):
    env = make_env(name)
    s = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    _check_state(env, s, ())
    nxt = jax.eval_shape(env.step, s, jax.ShapeDtypeStruct((5,), jnp.float32))
    _check_state(env, nxt, ())


def test_obs_layout(easy_run):
    _, _, s0, _, traj = easy_run
    for s in (s0, traj):
        obs = np.asarray(s.obs)
        ps = s.pipeline_state
        q = np.asarray(ps.q)
        np.testing.assert_array_equal(obs[..., 0:3], q[..., 0:3])               # cube position
        np.testing.assert_array_equal(obs[..., 3:10], q[..., 7:14])             # 7 joint angles
        np.testing.assert_array_equal(obs[..., 10:13], np.asarray(ps.x.pos)[..., 7, :])  # link7
        np.testing.assert_array_equal(obs[..., 13:16], np.asarray(ps.xd.vel)[..., 7, :])
        # Finger distance = the sum of the two slides (body positions come from the step's last
        # forward pass, one 0.002 s substep behind q).
        np.testing.assert_allclose(obs[..., 16], q[..., 14:16].sum(-1), atol=2e-3)
        np.testing.assert_array_equal(obs[..., 17:20], np.asarray(s.info["goal"]))
    obs0 = np.asarray(s0.obs)
    np.testing.assert_allclose(obs0[:, 3:10], np.tile(arm.HOME_Q, (N, 1)), atol=1e-6)
    np.testing.assert_allclose(obs0[:, 10:13], np.tile(REFERENCE_FK[0][1], (N, 1)), atol=1e-4)
    np.testing.assert_array_equal(obs0[:, 13:16], 0.0)
    np.testing.assert_allclose(obs0[:, 16], 0.08, atol=1e-6)
    np.testing.assert_allclose(obs0[:, 2], 0.07)
    np.testing.assert_allclose(obs0[:, 19], 0.03)
    # The end-effector velocity agrees with the motion of the end effector (one env step).
    ee = np.concatenate([obs0[None, :, 10:13], np.asarray(traj.obs)[:, :, 10:13]])
    fd = np.diff(ee, axis=0) / 0.05
    vel = np.asarray(traj.obs)[:, :, 13:16]
    assert np.abs(vel[3:] - fd[3:]).max() < 0.25 * np.abs(fd).max() + 0.02
    # The cube dropped onto the table and rests there (the arm stays above it).
    np.testing.assert_allclose(np.asarray(traj.obs)[-1, :, 2], arm.CUBE_HALF, atol=2e-3)


def test_joint_targets_and_gripper(easy_run):
    _, actions, s0, _, traj = easy_run
    obs = np.asarray(traj.obs)
    q0 = np.asarray(s0.obs)[:, 3:10]
    for i in range(N):
        ctrl = np.asarray(arm.action_to_ctrl(actions[0, i]))
        eq = arm.servo_equilibrium(ctrl)
        # Joints 1 and 2 head for their targets (most of the way after 0.5 s).
        err0, err = np.abs(q0[i, :2] - ctrl[:2]), np.abs(obs[-1, i, 3:5] - ctrl[:2])
        assert (err <= 0.2 * err0 + 0.03).all(), (i, err0, err)
        # Joints 4 and 7 towards their scaled equilibria.
        assert abs(obs[-1, i, 6] - eq[3]) < 0.05 and abs(obs[-1, i, 9] - eq[6]) < 0.05
        # Binary gripper: closed -> 0, open -> 0.16 between the finger bodies.
        want = 0.0 if actions[0, i, 4] > 0 else 0.16
        np.testing.assert_allclose(obs[-1, i, 16], want, atol=5e-3)


def test_success_at_goal_only(easy, easy_run):
    env, run = easy
    keys, actions, _, _, traj = easy_run
    cube = np.asarray(traj.obs)[-1, :, 0:3]           # resting cube after the fixture's run
    offsets = np.array([[0.05, 0.0, 0.0], [0.0, 0.09, 0.0], [0.15, 0.0, 0.0], [0.0, 0.0, 0.12]],
                       np.float32)
    hold = jnp.zeros((T, N, 5)).at[..., 4].set(1.0)   # keep the hand up, away from the cube
    s0, _, traj2 = run(keys, hold, jnp.asarray(cube + offsets), jnp.ones(N, bool))
    succ, dist = np.asarray(traj2.metrics["success"]), np.asarray(traj2.metrics["dist"])
    np.testing.assert_array_equal(succ[-1], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(traj2.reward), succ)
    np.testing.assert_allclose(dist[-1], np.linalg.norm(offsets, axis=-1), atol=3e-3)
    np.testing.assert_allclose(np.asarray(traj2.obs)[:, :, 17:20],
                               np.broadcast_to(cube + offsets, (T, N, 3)), atol=1e-6)
    # Reset metrics follow the same rule (on the sampled goal).
    d0 = np.linalg.norm(np.asarray(s0.obs)[:, 0:3] - np.asarray(s0.info["goal"]), axis=-1)
    np.testing.assert_allclose(np.asarray(s0.metrics["dist"]), d0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(s0.metrics["success"]), (d0 < 0.1).astype(np.float32))


def test_determinism(easy, easy_run):
    _, run = easy
    keys, actions, s0, final, _ = easy_run
    s0b, finalb, _ = run(keys, actions, jnp.zeros((N, 3)), jnp.zeros(N, bool))
    np.testing.assert_array_equal(np.asarray(s0b.obs), np.asarray(s0.obs))
    np.testing.assert_array_equal(np.asarray(finalb.obs), np.asarray(final.obs))


# --- slow: throughput ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ARM_ENVS)
def test_random_actions_64_envs(name):
    env = make_env(name)
    n, t = 64, 50
    reset = jax.jit(jax.vmap(env.reset))
    step = jax.vmap(env.step)

    @jax.jit
    def unroll(s, actions):
        def f(s, a):
            s = step(s, a)
            return s, s
        return jax.lax.scan(f, s, actions)

    s = reset(jax.random.split(jax.random.PRNGKey(0), n))
    actions = jax.random.uniform(jax.random.PRNGKey(1), (2, t, n, 5), minval=-1.0, maxval=1.0)
    t0 = time.time()
    s, _ = unroll(s, actions[0])
    jax.block_until_ready(s)
    compile_s = time.time() - t0
    t0 = time.time()
    s, traj = unroll(s, actions[1])
    jax.block_until_ready(s)
    sps = n * t / (time.time() - t0)
    print(f"{name}: compile+first unroll {compile_s:.1f}s, {sps:.0f} env steps/s at {n} envs")
    obs = np.asarray(traj.obs)
    assert np.isfinite(obs).all()
    assert obs[..., 2].min() > -0.01                   # the cube never sinks through the table
    np.testing.assert_array_equal(np.asarray(traj.done), 0.0)
