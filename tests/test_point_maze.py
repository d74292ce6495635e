"""Tests of the pure-JAX point-mass maze (crl/envs/point_maze.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crl.envs import ENV_SPECS, make_env, mazes
from crl.envs.point_maze import PointMaze, far_goal_mask

POINT_ENVS = sorted(n for n in ENV_SPECS if n.startswith("point_maze_"))
TOL = 1e-5


def _set(state, **kw):
    """Returns `state` with pipeline_state fields replaced (pos, vel, goal)."""
    ps = state.pipeline_state.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in kw.items()})
    return state.replace(pipeline_state=ps)


def _rollout(env, state, actions):
    """Scans env.step over actions [T, ..., 2] (state may be batched); returns stacked states."""
    step = env.step
    if actions.ndim == 3:
        step = jax.vmap(env.step)

    def f(s, a):
        s = step(s, a)
        return s, s

    return jax.lax.scan(f, state, actions)[1]


def _assert_outside_walls(env, pos):
    """pos [..., 2]: the agent's disc (and its collision square) is outside every wall box."""
    pos = np.asarray(pos, np.float64).reshape(-1, 2)
    boxes = mazes.wall_boxes(env.maze, env.cell_size).astype(np.float64)
    r = env.agent_radius
    lo, hi = boxes[None, :, :2], boxes[None, :, 2:]
    p = pos[:, None, :]
    # Collision square of half-size r strictly overlapping a box interior:
    inside_grown = np.all((p > lo - r + TOL) & (p < hi + r - TOL), axis=-1)
    assert not inside_grown.any(), pos[inside_grown.any(axis=1)][:5]
    # Disc distance to every box is at least r:
    nearest = np.clip(p, lo, hi)
    d = np.linalg.norm(p - nearest, axis=-1)
    assert d.min() >= r - TOL, d.min()
    # And never outside the maze's bounding box.
    assert (pos >= boxes[:, :2].min(0)).all() and (pos <= boxes[:, 2:].max(0)).all()


@pytest.mark.parametrize("name", POINT_ENVS)
def test_shapes_and_dtypes(name):
    env = make_env(name)
    assert isinstance(env, PointMaze)
    assert env.action_size == 2
    assert env.state_dim == 4 and tuple(env.goal_indices) == (0, 1) and env.goal_dim == 2
    assert env.observation_size == env.state_dim + env.goal_dim == 6
    assert env.backend == "jax"
    state = jax.jit(env.reset)(jax.random.PRNGKey(0))
    nxt = jax.jit(env.step)(state, jnp.array([0.3, -2.0]))
    for s in (state, nxt):
        assert s.obs.shape == (env.observation_size,) and s.obs.dtype == jnp.float32
        assert s.reward.shape == () and s.reward.dtype == jnp.float32
        assert s.done.shape == () and s.done.dtype == jnp.float32
        assert set(s.metrics) >= {"success", "dist"}
        for v in s.metrics.values():
            assert v.shape == () and v.dtype == jnp.float32
        assert float(s.done) == 0.0
    assert float(nxt.reward) == float(nxt.metrics["success"])


@pytest.mark.parametrize("name", POINT_ENVS)
def test_obs_layout_and_reset_distribution(name):
    env = make_env(name)
    states = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(1), 256))
    obs, ps = np.asarray(states.obs), states.pipeline_state
    goal, pos = np.asarray(ps.goal), np.asarray(ps.pos)
    np.testing.assert_array_equal(obs[:, env.state_dim:], goal)
    np.testing.assert_array_equal(obs[:, list(env.goal_indices)], pos)
    np.testing.assert_array_equal(obs[:, 2:4], 0.0)
    # Start near the origin (start cell centre); goals near free-cell centres other than start.
    assert np.abs(pos).max() <= env.reset_noise + TOL
    centres = mazes.cell_centres(env.maze, env.cell_size)
    d = np.linalg.norm(goal[:, None] - centres[None], axis=-1)
    nearest = d.argmin(1)
    assert np.all(np.abs(goal - centres[nearest]) <= env.goal_noise + TOL)
    assert np.all(np.linalg.norm(centres[nearest], axis=-1) > 0)   # never the start cell
    _assert_outside_walls(env, pos)
    _assert_outside_walls(env, goal)


def test_success_at_goal_only():
    env = make_env("point_maze_u")
    step = jax.jit(env.step)
    state = env.reset(jax.random.PRNGKey(2))
    goal = state.pipeline_state.goal
    at = step(_set(state, pos=goal, vel=jnp.zeros(2)), jnp.zeros(2))
    assert float(at.metrics["success"]) == 1.0 and float(at.reward) == 1.0
    assert float(at.metrics["dist"]) < 1e-6
    near = step(_set(state, pos=goal + jnp.array([0.0, 0.8 * env.goal_reach_thresh]),
                     vel=jnp.zeros(2)), jnp.zeros(2))
    assert float(near.metrics["success"]) == 1.0
    # The start is at least one cell from any goal: no success there.
    away = step(_set(state, pos=jnp.zeros(2), vel=jnp.zeros(2), goal=jnp.array([2.0, 0.0])),
                jnp.zeros(2))
    assert float(away.metrics["success"]) == 0.0 and float(away.reward) == 0.0
    np.testing.assert_allclose(float(away.metrics["dist"]), 2.0, atol=1e-6)
    assert env.goal_reach_thresh == pytest.approx(0.5 * env.cell_size)


@pytest.mark.parametrize("direction", [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1)])
def test_walls_block_max_action(direction):
    env = make_env("point_maze_u")
    state = _set(env.reset(jax.random.PRNGKey(3)), pos=jnp.zeros(2))
    actions = jnp.tile(jnp.asarray(direction, jnp.float32) * 5.0, (60, 1))   # clipped to 1
    traj = jax.jit(lambda s, a: _rollout(env, s, a))(state, actions)
    pos = np.asarray(traj.pipeline_state.pos)
    _assert_outside_walls(env, pos)
    # From the start cell (1, 1) of "u": walls at -x, -y and +x; +y is a corridor to (1, 3);
    # (+1, +1) slides along the walls through (1, 3), (2, 3) into the corner of (3, 3).
    half, r = 0.5 * env.cell_size, env.agent_radius
    expect = {(1, 0): (half - r, 0.0), (-1, 0): (-half + r, 0.0), (0, 1): (0.0, 2.5 - r),
              (0, -1): (0.0, -half + r), (1, 1): (2.5 - r, 2.5 - r), (-1, -1): (-half + r, -half + r)}
    np.testing.assert_allclose(pos[-1], expect[direction], atol=1e-5)
    vel = np.asarray(traj.pipeline_state.vel)
    np.testing.assert_allclose(vel[-1], 0.0, atol=1e-6)   # pinned against the wall: no motion


@pytest.mark.parametrize("name,kwargs", [
    ("point_maze_hardest", {}),
    ("point_maze_big", {"cell_size": 4.0}),
    # A very fast agent without momentum: the sweep must still never tunnel.
    ("point_maze_u", {"max_speed": 0.95, "inertia": 0.0, "agent_radius": 0.3}),
])
def test_random_fuzz_never_inside_walls(name, kwargs):
    env = make_env(name, **kwargs)
    n, t = 128, 200
    k_reset, k_act, k_hold = jax.random.split(jax.random.PRNGKey(4), 3)
    states = jax.vmap(env.reset)(jax.random.split(k_reset, n))
    # Mix of saturated, sticky and uniform actions to reach top speed and graze corners.
    raw = jax.random.uniform(k_act, (t, n, 2), minval=-2.0, maxval=2.0)
    hold = jax.random.bernoulli(k_hold, 0.9, (t, n, 1))
    actions = jax.lax.scan(lambda prev, x: (jnp.where(x[1], prev, x[0]),) * 2, raw[0],
                           (raw, hold))[1]
    traj = jax.jit(lambda s, a: _rollout(env, s, a))(states, actions)
    pos = np.asarray(traj.pipeline_state.pos)
    _assert_outside_walls(env, pos)
    # Per-step displacement stays below max_step per axis (well below one cell).
    prev = np.concatenate([np.asarray(states.pipeline_state.pos)[None], pos[:-1]])
    assert np.abs(pos - prev).max() <= env.max_step + TOL
    assert np.abs(np.asarray(traj.obs)[..., 2:4]).max() <= 1.0 + TOL
    assert np.asarray(traj.done).max() == 0.0
    # The agents do explore: they spread over many cells.
    cells = np.round(pos.reshape(-1, 2) / env.cell_size).astype(int)
    assert len({tuple(c) for c in cells}) >= 5


def test_scripted_traversal_of_u_maze():
    env = make_env("point_maze_u")
    # World (x, y) = (row - 1, col - 1) for "u": start (0,0) -> (0,2) -> (2,2) -> tip (2,0).
    waypoints = jnp.array([[0.0, 2.0], [2.0, 2.0], [2.0, 0.0]])
    tip = waypoints[-1]
    state = _set(env.reset(jax.random.PRNGKey(5)), goal=tip)

    def policy_step(carry, _):
        s, k = carry
        pos = s.pipeline_state.pos
        target = waypoints[k]
        a = jnp.clip((target - pos) / env.max_step, -1.0, 1.0)
        s = env.step(s, a)
        reached = jnp.linalg.norm(s.pipeline_state.pos - target) < 0.05
        k = jnp.minimum(k + reached.astype(jnp.int32), len(waypoints) - 1)
        return (s, k), s

    (_, k), traj = jax.jit(lambda s: jax.lax.scan(policy_step, (s, 0), None, length=100))(state)
    pos = np.asarray(traj.pipeline_state.pos)
    _assert_outside_walls(env, pos)
    assert int(k) == len(waypoints) - 1
    assert np.linalg.norm(pos[-1] - np.asarray(tip)) < 0.05
    success = np.asarray(traj.metrics["success"])
    assert success[-1] == 1.0 and success.sum() > 10
    assert success[:10].sum() == 0   # not reachable through the wall in a few steps


@pytest.mark.parametrize("maze", ["u", "big", "hardest", "open"])
def test_far_goals_are_farther(maze):
    near_env, far_env = PointMaze(maze), PointMaze(maze, far_goals=True)
    assert far_env.goal_cell_dist.min() >= np.quantile(near_env.goal_cell_dist, 0.5)
    assert far_env.goal_cell_dist.mean() > near_env.goal_cell_dist.mean()
    assert far_env.goal_cell_dist.max() == near_env.goal_cell_dist.max()
    assert len(far_env.goal_cells) >= int(np.ceil(len(near_env.goal_cells) / 3))
    # Sampled goals: BFS distance of their cells beats the average goal.
    start = mazes.start_cell(maze)
    bfs = mazes.shortest_path_cells(maze, start)

    def sampled_bfs(env):
        goals = np.asarray(jax.vmap(env.reset)(
            jax.random.split(jax.random.PRNGKey(6), 512)).pipeline_state.goal)
        cells = np.round(goals / env.cell_size).astype(int) + np.array(start)
        return bfs[cells[:, 0], cells[:, 1]]

    far, near = sampled_bfs(far_env), sampled_bfs(near_env)
    assert (far > 0).all() and (near > 0).all()
    assert far.mean() > near.mean()
    assert far.min() >= far_env.goal_cell_dist.min()


def test_far_goal_mask():
    np.testing.assert_array_equal(far_goal_mask(np.array([1, 2, 3, 4, 5, 6])),
                                  [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(far_goal_mask(np.array([3, 1, 3, 2, 3, 1])),
                                  [1, 0, 1, 0, 1, 0])   # ties with the cut are kept
    assert far_goal_mask(np.array([4])).tolist() == [True]


def test_determinism_and_key_dependence():
    env = make_env("point_maze_big")
    actions = jax.random.uniform(jax.random.PRNGKey(7), (50, 2), minval=-1, maxval=1)
    run = jax.jit(lambda k: _rollout(env, env.reset(k), actions))
    a, b = run(jax.random.PRNGKey(8)), run(jax.random.PRNGKey(8))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    goals = np.asarray(jax.vmap(env.reset)(
        jax.random.split(jax.random.PRNGKey(9), 16)).pipeline_state.goal)
    assert len({tuple(g) for g in goals.round(6)}) == 16
    starts = np.asarray(jax.vmap(env.reset)(
        jax.random.split(jax.random.PRNGKey(9), 16)).pipeline_state.pos)
    assert len({tuple(p) for p in starts.round(6)}) == 16
    # Typed keys (jax.random.key) work as well as raw uint32 keys.
    env.reset(jax.random.key(0))


def test_vmap_jit_and_brax_wrappers():
    from brax.envs.wrappers import training

    env = make_env("point_maze_u")
    n = 8
    states = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(10), n))
    nxt = jax.jit(jax.vmap(env.step))(states, jnp.ones((n, 2)))
    assert nxt.obs.shape == (n, env.observation_size)
    assert nxt.reward.shape == nxt.done.shape == (n,)
    # Vmapped results equal the single-env results.
    single = env.step(jax.tree.map(lambda x: x[3], states), jnp.ones(2))
    np.testing.assert_allclose(np.asarray(nxt.obs[3]), np.asarray(single.obs), atol=1e-6)
    # Brax's episode/auto-reset wrappers reset the whole state (pipeline_state carries the goal).
    wrapped = training.wrap(env, episode_length=5)
    ws = jax.jit(wrapped.reset)(jax.random.split(jax.random.PRNGKey(11), n))
    first = np.asarray(ws.obs)
    wstep = jax.jit(wrapped.step)
    for _ in range(5):
        ws = wstep(ws, jnp.ones((n, 2)))
    np.testing.assert_array_equal(np.asarray(ws.obs), first)
    np.testing.assert_array_equal(np.asarray(ws.pipeline_state.goal), first[:, 4:])


def test_constructor_validation_and_scaling():
    with pytest.raises(ValueError):
        PointMaze("nope")
    with pytest.raises(ValueError):
        PointMaze("u", agent_radius=0.45)
    with pytest.raises(ValueError):
        PointMaze("u", max_speed=1.5)
    env = PointMaze("u4", cell_size=4.0)
    assert env.goal_reach_thresh == 2.0 and env.agent_radius == pytest.approx(0.6)
    assert env.max_step == pytest.approx(0.8)
    np.testing.assert_allclose(env.walls, mazes.wall_boxes("u4", 4.0))


def test_goal_cells_of_layouts():
    # Without 'G' marks (the open room) every free cell but the start is a goal cell.
    free = {tuple(c) for c in mazes.free_cells("open")} - {mazes.start_cell("open")}
    assert {tuple(c) for c in mazes.goal_cells("open")} == free
    # With them, only the marked cells: the point mass draws goals from the same cells.
    env = PointMaze("u4_eval")
    assert [tuple(c) for c in env.goal_cells] == [(4, 1), (5, 1), (5, 2), (5, 3)]
    np.testing.assert_array_equal(env.goal_cell_dist, [10, 9, 8, 7])
    # point_maze_u4 is the authors' 7 x 5 U4: the farthest goal is 10 cells away by path.
    u4 = make_env("point_maze_u4")
    assert mazes.grid(u4.maze).shape == (7, 5) and u4.goal_cell_dist.max() == 10
