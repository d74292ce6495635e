"""Tests of the MJX arm environments (crl/envs/arm.py).

MJX compiles slowly on CPU (tens of seconds per jitted function), so the default tests share one
jitted, vmapped push-easy reset and one jitted unroll (module fixture, N envs x T steps); the other
two tasks are checked by shapes (jax.eval_shape traces without compiling) and by their pure-JAX
cube/goal samplers. Scripted pick-and-place / push and the 64-env throughput run are `slow`.
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
N, T = 4, 6


def _unroll_fn(env):
    """jit((state [N], actions [T, N, 5]) -> (final state, stacked states [T, N]))."""
    step = jax.vmap(env.step)

    def unroll(state, actions):
        def f(s, a):
            s = step(s, a)
            return s, s
        return jax.lax.scan(f, state, actions)

    return jax.jit(unroll)


@pytest.fixture(scope="module")
def easy():
    env = ArmPush(hard=False)
    return env, jax.jit(jax.vmap(env.reset)), _unroll_fn(env)


@pytest.fixture(scope="module")
def easy_run(easy):
    """Reset N envs and drive each end effector along one axis for T steps."""
    env, reset, unroll = easy
    keys = jax.random.split(jax.random.PRNGKey(0), N)
    s0 = reset(keys)
    dirs = np.array([[1, 0, 0], [0, -1, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    actions = np.zeros((T, N, 5), np.float32)
    actions[:, :, :3] = dirs
    actions[:, :, 4] = 1.0          # fingers closed
    final, traj = unroll(s0, jnp.asarray(actions))
    return keys, s0, jnp.asarray(actions), final, traj, dirs


def test_registry_and_sizes():
    for name in ARM_ENVS:
        env = make_env(name)
        assert isinstance(env, (ArmPush, ArmBinpick))
        assert env.state_dim == 17 and tuple(env.goal_indices) == (0, 1, 2) and env.goal_dim == 3
        assert env.observation_size == 20 and env.action_size == 5
        assert env.goal_reach_thresh == pytest.approx(0.1)
        assert env.backend == "mjx"
    assert make_env("arm_push_hard").hard and not make_env("arm_push_easy").hard


def test_model_is_built_in_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # no asset path may depend on the working directory
    env = ArmBinpick(far_goals=True)
    assert env.sys.nu == 9 and env.sys.nq == 16


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
    _, s0, _, final, traj, _ = easy_run
    _check_state(env, s0, (N,))
    _check_state(env, final, (N,))
    _check_state(env, traj, (T, N))
    np.testing.assert_array_equal(np.asarray(s0.reward), 0.0)
    np.testing.assert_array_equal(np.asarray(traj.reward), np.asarray(traj.metrics["success"]))
    assert np.isfinite(np.asarray(traj.obs)).all()


@pytest.mark.parametrize("name", ["arm_push_hard", "arm_binpick_hard"])
def test_shapes_other_envs(name):
    env = make_env(name)
    s = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    _check_state(env, s, ())
    nxt = jax.eval_shape(env.step, s, jax.ShapeDtypeStruct((5,), jnp.float32))
    _check_state(env, nxt, ())


def test_obs_layout(easy, easy_run):
    env = easy[0]
    _, s0, _, _, traj, _ = easy_run
    for s in (s0, traj):
        obs = np.asarray(s.obs)
        ps = s.pipeline_state
        # Goal slice = cube position = the cube's free-joint position.
        np.testing.assert_array_equal(obs[..., 0:3], np.asarray(ps.q)[..., 0:3])
        np.testing.assert_array_equal(obs[..., 17:20], np.asarray(s.info["goal"]))
        np.testing.assert_allclose(obs[..., 6:9], np.asarray(ps.site_xpos)[..., 0, :], atol=1e-6)
        np.testing.assert_allclose(obs[..., 15], np.asarray(ps.q)[..., 14:16].sum(-1), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(obs[..., 13:15], axis=-1), 1.0, atol=1e-4)
    obs0 = np.asarray(s0.obs)
    np.testing.assert_allclose(obs0[:, 6:9], np.tile(arm.HOME_EE, (N, 1)), atol=1e-4)
    np.testing.assert_allclose(obs0[:, 2], arm.CUBE_HALF, atol=1e-6)
    np.testing.assert_array_equal(obs0[:, [3, 4, 5, 9, 10, 11, 12, 16]], 0.0)
    np.testing.assert_allclose(obs0[:, 15], 2 * arm.FINGER_MAX, atol=1e-6)
    # End-effector velocity is the finite difference of its position over one env step.
    ee = np.concatenate([obs0[None, :, 6:9], np.asarray(traj.obs)[:, :, 6:9]])
    np.testing.assert_allclose(np.asarray(traj.obs)[:, :, 9:12], np.diff(ee, axis=0) / env.dt,
                               rtol=1e-3, atol=1e-3)


def test_done_never_fires(easy_run):
    traj = easy_run[4]
    np.testing.assert_array_equal(np.asarray(traj.done), 0.0)


def test_scripted_action_moves_end_effector(easy_run):
    _, s0, _, final, traj, dirs = easy_run
    disp = np.asarray(final.obs)[:, 6:9] - np.asarray(s0.obs)[:, 6:9]
    along = (disp * dirs).sum(-1)
    across = np.linalg.norm(disp - along[:, None] * dirs, axis=-1)
    assert (along > 0.05).all(), disp                     # ~0.02 m per step at full action
    assert (along < T * arm.EE_STEP + 1e-3).all(), disp
    assert (across < 0.2 * along).all(), disp
    # Fingers were commanded closed; the cube (below the hovering hand) did not move.
    assert (np.asarray(final.obs)[:, 15] < 0.01).all()
    np.testing.assert_allclose(np.asarray(final.obs)[:, 0:3], np.asarray(s0.obs)[:, 0:3], atol=1e-3)


def test_success_at_goal_only(easy):
    env, reset, unroll = easy
    s0 = reset(jax.random.split(jax.random.PRNGKey(3), N))
    cube = s0.obs[:, 0:3]
    offsets = jnp.array([[0.05, 0.0, 0.0], [0.0, 0.09, 0.0], [0.15, 0.0, 0.0], [0.0, 0.0, 0.12]])
    s = s0.replace(info={**s0.info, "goal": cube + offsets})
    _, traj = unroll(s, jnp.zeros((T, N, 5)))
    succ, dist = np.asarray(traj.metrics["success"]), np.asarray(traj.metrics["dist"])
    np.testing.assert_array_equal(succ, np.tile([1.0, 1.0, 0.0, 0.0], (T, 1)))
    np.testing.assert_array_equal(np.asarray(traj.reward), succ)
    np.testing.assert_allclose(dist, np.tile(np.linalg.norm(offsets, axis=-1), (T, 1)), atol=2e-3)
    np.testing.assert_allclose(np.asarray(traj.obs)[:, :, 17:20], np.asarray(cube + offsets)[None]
                               .repeat(T, 0), atol=1e-6)
    # Reset metrics follow the same rule.
    d0 = np.linalg.norm(np.asarray(s0.obs)[:, 0:3] - np.asarray(s0.info["goal"]), axis=-1)
    np.testing.assert_allclose(np.asarray(s0.metrics["dist"]), d0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(s0.metrics["success"]), (d0 < 0.1).astype(np.float32))


def test_determinism(easy, easy_run):
    _, reset, unroll = easy
    keys, s0, actions, final, _, _ = easy_run
    s0b = reset(keys)
    np.testing.assert_array_equal(np.asarray(s0b.obs), np.asarray(s0.obs))
    finalb, _ = unroll(s0b, actions)
    np.testing.assert_array_equal(np.asarray(finalb.obs), np.asarray(final.obs))
    other = reset(jax.random.split(jax.random.PRNGKey(1), N))
    assert not np.allclose(np.asarray(other.obs)[:, 0:2], np.asarray(s0.obs)[:, 0:2])


def test_inverse_kinematics_matches_model():
    """arm_ik puts the grip site at the target, hand pointing down, fingers at yaw psi."""
    m = mujoco.MjModel.from_xml_string(arm.build_xml(False))
    d = mujoco.MjData(m)
    rng = np.random.default_rng(0)
    ik = jax.jit(arm.arm_ik)
    for _ in range(20):
        ee = arm.clip_workspace(jnp.asarray(rng.uniform(arm.EE_LOW, arm.EE_HIGH), jnp.float32))
        psi = rng.uniform(-np.pi / 2, np.pi / 2)
        d.qpos[:] = 0.0
        d.qpos[3] = 1.0
        d.qpos[7:14] = np.asarray(ik(ee, jnp.float32(psi)))
        mujoco.mj_kinematics(m, d)
        np.testing.assert_allclose(d.site_xpos[0], np.asarray(ee), atol=1e-4)
        xmat = d.site_xmat[0].reshape(3, 3)
        np.testing.assert_allclose(xmat[:, 2], [0.0, 0.0, -1.0], atol=1e-4)
        np.testing.assert_allclose(np.arctan2(-xmat[0, 1], xmat[1, 1]), psi, atol=1e-4)
        assert d.qpos[9] == 0.0 and d.qpos[11] == 0.0


def _qmul(a, b):
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def test_cube_yaw_features_any_face_down():
    s = np.sqrt(0.5)
    faces = [np.array([1.0, 0, 0, 0]), np.array([s, s, 0, 0]), np.array([s, 0, s, 0]),
             np.array([0.0, 1, 0, 0]), np.array([s, 0, -s, 0])]
    for yaw in (0.0, 0.3, 1.0, -0.7, 2.5):
        qz = np.array([np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)])
        for f in faces:
            feat = np.asarray(arm.cube_yaw_features(jnp.asarray(_qmul(qz, f), jnp.float32)))
            np.testing.assert_allclose(feat, [np.cos(4 * yaw), np.sin(4 * yaw)], atol=1e-5)


def _samples(env, n=1024):
    cube, goal = jax.vmap(env._sample_cube_goal)(jax.random.split(jax.random.PRNGKey(7), n))
    return np.asarray(cube), np.asarray(goal)


@pytest.mark.parametrize("name", ARM_ENVS)
def test_start_and_goal_distributions(name):
    near, far = make_env(name), make_env(name, far_goals=True)
    cube, goal = _samples(near)
    cube_f, goal_f = _samples(far)
    np.testing.assert_allclose(cube[:, 2], arm.CUBE_HALF)
    c_lo = np.subtract(near._cube_c, near._cube_h) - 1e-6
    c_hi = np.add(near._cube_c, near._cube_h) + 1e-6
    g_lo = np.subtract(near._goal_c, near._goal_h) - 1e-6
    g_hi = np.add(near._goal_c, near._goal_h) + 1e-6
    for c, g in ((cube, goal), (cube_f, goal_f)):   # far samples stay in the ordinary ranges
        assert ((c[:, :2] >= c_lo) & (c[:, :2] <= c_hi)).all()
        assert ((g[:, :2] >= g_lo) & (g[:, :2] <= g_hi)).all()
    np.testing.assert_allclose(goal_f[:, 2], goal[0, 2])
    dist, dist_f = np.linalg.norm(goal - cube, axis=-1), np.linalg.norm(goal_f - cube_f, axis=-1)
    assert dist_f.mean() > dist.mean() + 0.05
    assert np.quantile(dist_f, 0.1) > np.quantile(dist, 0.5)
    assert dist_f.min() > 0.1                      # never solved at the start
    # Everything within reach of the end effector's workspace.
    r = np.linalg.norm(np.concatenate([cube, goal])[:, :2], axis=-1)
    assert r.max() < arm.EE_R_MAX - 0.04 and r.min() > arm.EE_R_MIN
    if name == "arm_binpick_hard":
        # Goal on the bin floor, inside the rim; a cube resting on the table is >= 0.1 below it.
        np.testing.assert_allclose(goal[:, 2], arm.BIN_FLOOR + arm.CUBE_HALF)
        inner = arm.BIN_HALF - arm.CUBE_HALF - 0.01
        assert (np.abs(goal[:, :2] - np.asarray(arm.BIN_CENTER)) <= inner).all()
        assert (goal[:, 2] - arm.CUBE_HALF >= 0.1 - 1e-6).all()
    else:
        np.testing.assert_allclose(goal[:, 2], arm.CUBE_HALF)
        assert (np.ptp(goal[:, :2], axis=0) > 0.15).all()
    if name == "arm_push_hard":
        c_easy, g_easy = _samples(make_env("arm_push_easy"))
        assert dist.mean() > np.linalg.norm(g_easy - c_easy, axis=-1).mean() + 0.05
        assert (np.ptp(cube[:, :2], axis=0) > np.ptp(c_easy[:, :2], axis=0)).all()


# --- slow: scripted policies and throughput --------------------------------------------------

def _scripted(env, waypoint_fn, steps):
    """Runs a single env under a P controller towards waypoint_fn(t, obs, s0) -> (target, grip)."""

    def run(key):
        s0 = env.reset(key)

        def f(s, t):
            target, grip, yaw = waypoint_fn(t, s.obs, s0)
            a = jnp.clip((target - s.obs[6:9]) / arm.EE_STEP, -1.0, 1.0)
            s = env.step(s, jnp.concatenate([a, jnp.stack([yaw, grip])]))
            return s, s
        return jax.lax.scan(f, s0, jnp.arange(steps))

    return jax.jit(run)


@pytest.mark.slow
def test_scripted_pick_and_place_binpick():
    env = ArmBinpick()

    def waypoints(t, obs, s0):
        cube, goal = obs[0:3], obs[17:20]
        start = s0.obs[0:3]
        high = 0.25
        phases = [  # (until step, target, grip)
            (25, start + jnp.array([0.0, 0.0, 0.1]), -1.0),
            (40, start, -1.0),
            (48, start, 1.0),
            (70, jnp.concatenate([cube[:2], jnp.array([high])]), 1.0),
            (95, jnp.concatenate([goal[:2], jnp.array([high])]), 1.0),
            (115, goal + jnp.array([0.0, 0.0, 0.01]), 1.0),
            (125, goal + jnp.array([0.0, 0.0, 0.01]), -1.0),
        ]
        target, grip = jnp.concatenate([goal[:2], jnp.array([high])]), -1.0
        for until, tg, gr in reversed(phases):
            target = jnp.where(t < until, tg, target)
            grip = jnp.where(t < until, gr, grip)
        return target, jnp.float32(grip), jnp.float32(0.0)

    run = _scripted(env, waypoints, 150)
    for seed in range(3):
        _, traj = run(jax.random.PRNGKey(seed))
        succ = np.asarray(traj.metrics["success"])
        obs = np.asarray(traj.obs)
        assert succ[:60].sum() == 0
        assert obs[69, 2] > 0.15                       # lifted while grasped
        assert succ[-30:].all(), (obs[-1, 0:3], obs[-1, 17:20])   # stays in the bin once released


@pytest.mark.slow
def test_scripted_push_easy():
    env = ArmPush(hard=False)

    def waypoints(t, obs, s0):
        # Memoryless pusher: when the closed fingers sit low right behind the cube (w.r.t. the
        # goal), push slowly towards the goal; otherwise go (high, unless already there) to the
        # point behind the cube. Hold still once the cube is within 0.05 of the goal.
        del t, s0
        cube, goal, ee = obs[0:3], obs[17:20], obs[6:9]
        z0 = arm.CUBE_HALF
        v = goal[:2] - cube[:2]
        dist = jnp.linalg.norm(v)
        d = v / jnp.maximum(dist, 1e-6)
        rel = ee[:2] - cube[:2]
        along = jnp.dot(rel, d)
        lateral = jnp.linalg.norm(rel - along * d)
        behind = cube[:2] - 0.07 * d
        low = ee[2] < z0 + 0.01
        aligned = low & (along < -0.02) & (along > -0.09) & (lateral < 0.015)
        near_behind = jnp.linalg.norm(ee[:2] - behind) < 0.015
        push = jnp.concatenate([ee[:2] + 0.012 * d, jnp.array([z0])])
        descend = jnp.concatenate([behind, jnp.array([z0])])
        travel = jnp.concatenate([behind, jnp.array([z0 + 0.07])])
        target = jnp.where(aligned, push, jnp.where(near_behind, descend, travel))
        target = jnp.where(dist < 0.05, ee, target)
        return target, jnp.float32(1.0), jnp.float32(0.0)

    run = _scripted(env, waypoints, 150)
    for seed in range(3):
        _, traj = run(jax.random.PRNGKey(seed))
        succ = np.asarray(traj.metrics["success"])
        assert succ[-20:].all(), np.asarray(traj.metrics["dist"])[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ARM_ENVS)
def test_random_actions_64_envs(name):
    env = make_env(name)
    n, t = 64, 50
    reset = jax.jit(jax.vmap(env.reset))
    unroll = _unroll_fn(env)
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
    ee = obs[..., 6:9]
    assert ee[..., 2].min() > arm.CUBE_HALF - 0.02 and ee[..., 2].max() < arm.EE_HIGH[2] + 0.05
    np.testing.assert_array_equal(np.asarray(traj.done), 0.0)
