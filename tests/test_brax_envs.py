"""Goal-conditioned Brax locomotion envs (crl/envs/ant.py, crl/envs/humanoid.py).

Compiling Brax on the CPU costs seconds per jitted function, so every env class gets one
module-scoped fixture holding its jitted reset / reset_to / step; tests reuse them. Heavier
checks (every maze, vmapped rollouts of the mazes) are marked slow.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*not actively being maintained.*")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not actively being maintained.*"),
    pytest.mark.filterwarnings("ignore:Accessing `.*` directly from `Data` is deprecated"),
]

from crl.envs import ENV_SPECS, has_eval_goal_set, make_env, mazes  # noqa: E402
from crl.envs.ant import (Ant, AntMaze, maze_goal_centres, merged_wall_rects,  # noqa: E402
                          wall_geom_boxes)
from crl.envs.humanoid import TARGET_Z, Humanoid, HumanoidMaze  # noqa: E402


class Jitted:
    def __init__(self, env):
        self.env = env
        self.reset = jax.jit(env.reset)
        self.reset_to = jax.jit(env.reset_to)
        self.step = jax.jit(env.step)


@pytest.fixture(scope="module")
def ant():
    return Jitted(Ant())


@pytest.fixture(scope="module")
def ant_maze():
    return Jitted(AntMaze("u4"))


@pytest.fixture(scope="module")
def humanoid():
    return Jitted(Humanoid())


@pytest.fixture(scope="module")
def humanoid_maze():
    return Jitted(HumanoidMaze("u"))


ALL = ["ant", "ant_maze", "humanoid", "humanoid_maze"]
SIZES = {  # state_dim, goal_dim, action size
    "ant": (29, 2, 8), "ant_maze": (29, 2, 8),
    "humanoid": (268, 3, 17), "humanoid_maze": (268, 3, 17),
}


def _get(request, name) -> Jitted:
    return request.getfixturevalue(name)


def _random_steps(j: Jitted, state, n, seed=0):
    key = jax.random.PRNGKey(seed)
    for _ in range(n):
        key, k = jax.random.split(key)
        a = jax.random.uniform(k, (j.env.action_size,), minval=-1.0, maxval=1.0)
        state = j.step(state, a)
    return state


def _torso_pos(state):
    return np.asarray(state.pipeline_state.x.pos[0])


# ---------------------------------------------------------------------------------------------
# shapes, contract, goal slices
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_reset_step_shapes_and_contract(request, name):
    j = _get(request, name)
    env = j.env
    sdim, gdim, adim = SIZES[name]
    assert (env.state_dim, env.goal_dim, env.action_size) == (sdim, gdim, adim)
    assert env.observation_size == sdim + gdim
    assert env.goal_reach_thresh == 0.5
    s0 = j.reset(jax.random.PRNGKey(0))
    s1 = _random_steps(j, s0, 3)
    for s in (s0, s1):
        assert s.obs.shape == (sdim + gdim,) and s.obs.dtype == jnp.float32
        assert s.reward.shape == () and s.done.shape == ()
        assert set(s.metrics) == {"success", "dist"}
        np.testing.assert_array_equal(s.obs[sdim:], s.info["goal"])
        assert np.all(np.isfinite(s.obs))
    # same pytree (structure, shapes, dtypes) at reset and step: needed by scan / auto-reset
    sig = lambda s: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s)  # noqa: E731
    assert jax.tree_util.tree_structure(s0) == jax.tree_util.tree_structure(s1)
    assert sig(s0) == sig(s1)
    # the goal travels unchanged; reward is the success flag; dist is the goal distance
    np.testing.assert_array_equal(s1.info["goal"], s0.info["goal"])
    assert float(s1.reward) == float(s1.metrics["success"])
    gi = np.array(env.goal_indices)
    np.testing.assert_allclose(
        float(s1.metrics["dist"]), np.linalg.norm(s1.obs[gi] - s1.info["goal"]), rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_goal_slice_is_torso_position(request, name):
    j = _get(request, name)
    env = j.env
    s = _random_steps(j, j.reset(jax.random.PRNGKey(1)), 4, seed=1)
    gi = np.array(env.goal_indices)
    np.testing.assert_allclose(np.asarray(s.obs)[gi], _torso_pos(s)[: len(gi)], atol=1e-4)


def test_humanoid_state_layout(humanoid):
    env = humanoid.env
    s = humanoid.reset_to(env.sys.init_q, jnp.zeros(env.sys.qd_size()),
                          jnp.array([3.0, -2.0, TARGET_Z]))
    obs = np.asarray(s.obs)
    assert env.sys.q_size() == 26 and env.sys.qd_size() == 25 and env.sys.num_links() == 12
    np.testing.assert_allclose(obs[0:26], s.pipeline_state.q, atol=1e-6)
    np.testing.assert_allclose(obs[26:51], s.pipeline_state.qd, atol=1e-6)
    np.testing.assert_allclose(obs[24:26], [3.0, -2.0], atol=1e-5)   # the target marker
    np.testing.assert_allclose(obs[243:268], 0.0, atol=1e-6)         # no actuator force yet
    # per-link masses sit at every 10th entry of the inertia block; the marker weighs 1 kg
    masses = obs[51:171].reshape(12, 10)[:, 9]
    assert np.all(masses > 0) and masses[-1] == pytest.approx(1.0)


def test_physics_step_as_the_authors_brax_integrates(ant, ant_maze, humanoid, humanoid_maze):
    """Brax 0.10.1 (the authors' pin) steps the spring pipeline by `sys.dt`: the ants' and the
    humanoid mazes' `sys.replace(dt=...)` takes effect (0.005, 0.0015), the open humanoid's
    `opt.timestep` = 0.0015 does not (its XML's 0.003 stays). 10 substeps each."""
    for j, sub in ((ant, 0.005), (ant_maze, 0.005), (humanoid, 0.003), (humanoid_maze, 0.0015)):
        assert float(j.env.sys.opt.timestep) == pytest.approx(sub)
        assert float(j.env.dt) == pytest.approx(10 * sub)
    # one env step at 1 m/s forward moves the torso by about dt
    for j, dt in ((humanoid, 0.03), (humanoid_maze, 0.015)):
        env = j.env
        qd = jnp.zeros(env.sys.qd_size()).at[0].set(1.0)
        s = j.reset_to(env.sys.init_q, qd, jnp.array([0.0, 4.0, TARGET_Z]))
        dx = _torso_pos(j.step(s, jnp.zeros(17)))[0] - _torso_pos(s)[0]
        assert 0.7 * dt < dx < 1.3 * dt, (dx, dt)


# ---------------------------------------------------------------------------------------------
# success and termination
# ---------------------------------------------------------------------------------------------

def _ant_q(env, xy=(0.0, 0.0), z=None):
    q = env.sys.init_q.at[0:2].set(jnp.array(xy))
    return q if z is None else q.at[2].set(z)


@pytest.mark.parametrize("name", ["ant", "ant_maze"])
def test_ant_success_at_goal_only(request, name):
    j = _get(request, name)
    env = j.env
    qd = jnp.zeros(env.sys.qd_size())
    goal = jnp.array([0.1, -0.2])
    at = j.reset_to(_ant_q(env), qd, goal)
    assert float(at.metrics["success"]) == 1.0
    assert float(j.step(at, jnp.zeros(8)).metrics["success"]) == 1.0
    assert float(j.step(at, jnp.zeros(8)).reward) == 1.0
    away = j.reset_to(_ant_q(env), qd, jnp.array([0.6, 0.0]))
    assert float(away.metrics["success"]) == 0.0
    assert float(j.step(away, jnp.zeros(8)).reward) == 0.0
    # the pure success function agrees, with a strict 0.5 threshold
    s = jnp.zeros(29)
    assert float(env.goal_success(s, jnp.array([0.49, 0.0]))[0]) == 1.0
    assert float(env.goal_success(s, jnp.array([0.0, 0.51]))[0]) == 0.0


def test_humanoid_success_at_goal_only(humanoid):
    env = humanoid.env
    q0, qd = env.sys.init_q, jnp.zeros(env.sys.qd_size())
    torso = np.asarray(q0[0:3])  # standing torso at z = 1.4, within 0.5 of z = 1.25
    at = humanoid.reset_to(q0, qd, jnp.array([torso[0] + 0.1, torso[1], TARGET_Z]))
    assert float(at.metrics["success"]) == 1.0
    assert float(humanoid.step(at, jnp.zeros(17)).reward) == 1.0
    away = humanoid.reset_to(q0, qd, jnp.array([torso[0] + 0.6, torso[1], TARGET_Z]))
    assert float(away.metrics["success"]) == 0.0
    assert float(humanoid.step(away, jnp.zeros(17)).reward) == 0.0
    # height matters: the goal is 3-D
    s = jnp.zeros(268).at[2].set(1.25)
    assert float(env.goal_success(s, jnp.array([0.0, 0.0, 1.25]))[0]) == 1.0
    assert float(env.goal_success(s, jnp.array([0.0, 0.0, 1.85]))[0]) == 0.0


@pytest.mark.parametrize("name", ["ant", "ant_maze"])
def test_ant_termination(request, name):
    j = _get(request, name)
    env = j.env
    qd = jnp.zeros(env.sys.qd_size())
    goal = jnp.array([5.0, 0.0])
    for z, expected in ((0.1, 1.0), (0.55, 0.0), (0.9, 0.0), (1.5, 1.0)):
        s = j.reset_to(_ant_q(env, z=z), qd, goal)
        assert float(s.done) == 0.0  # reset never reports termination
        assert float(env.is_terminated(s.pipeline_state)) == expected, z
    # through step: too high -> done; a normal start -> not done
    assert float(j.step(j.reset_to(_ant_q(env, z=1.5), qd, goal), jnp.zeros(8)).done) == 1.0
    assert float(j.step(j.reset_to(_ant_q(env), qd, goal), jnp.zeros(8)).done) == 0.0


def test_humanoid_termination(humanoid):
    env = humanoid.env
    qd = jnp.zeros(env.sys.qd_size())
    goal = jnp.array([3.0, 0.0, TARGET_Z])
    for z, expected in ((0.8, 1.0), (1.4, 0.0), (1.9, 0.0), (2.5, 1.0)):
        s = humanoid.reset_to(env.sys.init_q.at[2].set(z), qd, goal)
        assert float(env.is_terminated(s.pipeline_state)) == expected, z
    high = humanoid.reset_to(env.sys.init_q.at[2].set(2.5), qd, goal)
    assert float(humanoid.step(high, jnp.zeros(17)).done) == 1.0
    ok = humanoid.reset_to(env.sys.init_q, qd, goal)
    assert float(humanoid.step(ok, jnp.zeros(17)).done) == 0.0


# ---------------------------------------------------------------------------------------------
# goals: distributions, far variants, determinism
# ---------------------------------------------------------------------------------------------

def _goals(env, n=512, seed=0):
    return np.asarray(jax.jit(jax.vmap(env.sample_goal))(
        jax.random.split(jax.random.PRNGKey(seed), n)))


def test_ant_goal_circle():
    for far in (False, True):
        g = _goals(Ant(far_goals=far))
        np.testing.assert_allclose(np.linalg.norm(g, axis=1), 10.0, rtol=1e-4)
        ang = np.arctan2(g[:, 1], g[:, 0])
        assert np.histogram(ang, bins=4, range=(-np.pi, np.pi))[0].min() > 80  # all around


def test_humanoid_goal_distribution_and_far():
    near, far = _goals(Humanoid()), _goals(Humanoid(far_goals=True))
    assert np.all(near[:, 2] == TARGET_Z) and np.all(far[:, 2] == TARGET_Z)
    dn, df = np.linalg.norm(near[:, :2], axis=1), np.linalg.norm(far[:, :2], axis=1)
    assert dn.min() >= 1.0 - 1e-5 and dn.max() <= 5.0 + 1e-5 and dn.min() < 1.3
    assert df.min() >= 11 / 3 - 1e-5 and df.max() <= 5.0 + 1e-5
    assert df.mean() > dn.mean() + 1.0


def _cell_of(xy, maze, cell_size):
    i0, j0 = mazes.start_cell(maze)
    ij = np.round(np.asarray(xy) / cell_size).astype(int) + np.array([i0, j0])
    return ij


@pytest.mark.parametrize("cls,maze,cell", [(AntMaze, "u4", 4.0), (AntMaze, "big", 4.0),
                                           (HumanoidMaze, "u", 2.0)])
def test_maze_goals_at_goal_cell_centres_and_far_is_farther(cls, maze, cell):
    start = mazes.start_cell(maze)
    bfs = mazes.shortest_path_cells(maze, start)
    grid = mazes.grid(maze)
    means = {}
    for far in (False, True):
        env = cls(maze, far_goals=far)
        g = _goals(env, n=400)
        cells = _cell_of(g[:, :2], maze, cell)
        assert not grid[cells[:, 0], cells[:, 1]].any()                   # never in a wall
        assert not np.all(cells == np.array(start), axis=1).any()         # never the start cell
        centres = (cells - np.array(start)) * cell
        np.testing.assert_array_equal(g[:, :2], centres)    # exact centres, as the authors
        means[far] = bfs[cells[:, 0], cells[:, 1]].mean()
        if far:
            d = bfs[~grid]
            cutoff = np.sort(d[d > 0])[::-1][int(np.ceil((d > 0).sum() / 3)) - 1]
            assert bfs[cells[:, 0], cells[:, 1]].min() >= cutoff
        else:  # every goal cell gets drawn
            assert len({tuple(c) for c in cells}) == (~grid).sum() - 1
    assert means[True] > means[False]


def test_maze_goal_centres_far_third():
    for maze in ("u4", "u5", "big", "hardest", "u"):
        allc, farc = maze_goal_centres(maze, 4.0, False), maze_goal_centres(maze, 4.0, True)
        assert len(allc) == (~mazes.grid(maze)).sum() - 1
        assert np.ceil(len(allc) / 3) <= len(farc) < len(allc)
    # an eval layout: its goal cells, in the training maze's frame
    ev = maze_goal_centres("u4", 4.0, False, "u4_eval")
    np.testing.assert_array_equal(ev, [[8, 0], [12, 0], [12, 4], [12, 8]])
    with pytest.raises(ValueError, match="different walls"):
        maze_goal_centres("u4", 4.0, False, "u5_eval")


# ---------------------------------------------------------------------------------------------
# layouts: pinned to the authors' code (scaling-crl envs/ant_maze.py, envs/humanoid_maze.py),
# transcribed in its own notation: rows are x, columns y; 1 wall, 0 free, r start, g goal cell
# ---------------------------------------------------------------------------------------------

AUTHORS = {
    "u": ["11111", "1rgg1", "111g1", "1ggg1", "11111"],
    "u_eval": ["11111", "1r001", "11101", "1ggg1", "11111"],
    "u4": ["11111", "1ggg1", "1r1g1", "111g1", "1g1g1", "1ggg1", "11111"],
    "u4_eval": ["11111", "10001", "1r101", "11101", "1g101", "1ggg1", "11111"],
    "u5": ["11111111", "1gggggg1", "1r1111g1", "111111g1", "1g1111g1", "1gggggg1", "11111111"],
    "u5_eval": ["11111111", "10000001", "1r111101", "11111101", "1g1111g1", "1gggggg1",
                "11111111"],
    "big": ["11111111", "1rg11gg1", "1gg1ggg1", "11ggg111", "1gg1ggg1", "1g1gg1g1", "1ggg1gg1",
            "11111111"],
    "big_eval": ["11111111", "1r011gg1", "100100g1", "11000111", "10010001", "101g01g1",
                 "10gg1gg1", "11111111"],
    "humanoid_big_eval": ["11111111", "1r011gg1", "10010gg1", "11000111", "10010001",
                          "101g01g1", "10gg1gg1", "11111111"],
    "hardest": ["111111111111", "1rggg1ggggg1", "1g11g1g1g1g1", "1gggggg1ggg1", "1g1111g111g1",
                "1gg1g1ggggg1", "11g1g1g1g111", "1gg1ggg1ggg1", "111111111111"],
}
# env -> (training layout, eval layout or None, cell size, farthest goal by BFS path in cells,
#         farthest goal in a straight line in cells)
PAPER_MAZES = {
    "ant_u4_maze": ("u4", "u4_eval", 4.0, 10, 2.0),
    "ant_u5_maze": ("u5", "u5_eval", 4.0, 16, 2.0),
    "ant_big_maze": ("big", "big_eval", 4.0, 11, None),
    "ant_hardest_maze": ("hardest", None, 4.0, 15, None),
    "humanoid_u_maze": ("u", "u_eval", 2.0, 6, 2.0),
    "humanoid_big_maze": ("big", "humanoid_big_eval", 2.0, 11, None),
}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_layout_is_the_authors(name):
    rows = AUTHORS[name]
    np.testing.assert_array_equal(mazes.grid(name), [[c == "1" for c in r] for r in rows])
    starts = [(i, r.index("r")) for i, r in enumerate(rows) if "r" in r]
    assert [mazes.start_cell(name)] == starts
    goals = [(i, j) for i, r in enumerate(rows) for j, c in enumerate(r) if c == "g"]
    assert [tuple(c) for c in mazes.goal_cells(name)] == goals


@pytest.mark.parametrize("env_name", sorted(PAPER_MAZES))
def test_paper_maze_envs_use_the_authors_layouts(env_name):
    train, ev, cell, far_path, far_line = PAPER_MAZES[env_name]
    spec = ENV_SPECS[env_name]
    assert dict(spec.kwargs)["maze"] == train
    assert has_eval_goal_set(env_name) == (ev is not None)
    if ev is not None:
        assert dict(spec.eval_kwargs) == {"goal_layout": ev}
        mazes.check_same_maze(train, ev)
    start = mazes.start_cell(train)
    bfs = mazes.shortest_path_cells(train, start)
    cells = mazes.goal_cells(train)
    d = bfs[cells[:, 0], cells[:, 1]]
    assert d.min() > 0 and d.max() == far_path
    if far_line is not None:   # the farthest goal by path is close in a straight line
        far = cells[d == far_path]
        assert len(far) == 1 and np.linalg.norm(far[0] - np.array(start)) == far_line
    # the eval goal set holds the farthest goal of the training maze
    if ev is not None:
        ec = mazes.goal_cells(ev)
        assert bfs[ec[:, 0], ec[:, 1]].max() == far_path
        assert len(ec) < len(cells) and set(map(tuple, ec)) <= set(map(tuple, cells))
    cls = AntMaze if env_name.startswith("ant") else HumanoidMaze
    assert cls.__init__.__kwdefaults__["cell_size"] == cell
    assert cls.__init__.__kwdefaults__["goal_noise"] == 0.0


@pytest.mark.parametrize("name", ["ant", "humanoid"])
def test_determinism_under_fixed_key(request, name):
    j = _get(request, name)
    a = _random_steps(j, j.reset(jax.random.PRNGKey(7)), 3, seed=3)
    b = _random_steps(j, j.reset(jax.random.PRNGKey(7)), 3, seed=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    c = j.reset(jax.random.PRNGKey(8))
    assert not np.array_equal(c.info["goal"], j.reset(jax.random.PRNGKey(7)).info["goal"])


def test_ant_vmapped_scan():
    env = Ant()
    n, t = 4, 5

    @jax.jit
    def rollout(key):
        k_reset, k_act = jax.random.split(key)
        s = jax.vmap(env.reset)(jax.random.split(k_reset, n))

        def body(s, k):
            a = jax.random.uniform(k, (n, env.action_size), minval=-1, maxval=1)
            s = jax.vmap(env.step)(s, a)
            return s, s.obs
        return jax.lax.scan(body, s, jax.random.split(k_act, t))

    s, obs = rollout(jax.random.PRNGKey(0))
    assert obs.shape == (t, n, 31) and np.all(np.isfinite(obs))
    assert s.info["goal"].shape == (n, 2) and s.done.shape == (n,)
    assert len({tuple(g) for g in np.asarray(s.info["goal"]).round(4)}) == n


# ---------------------------------------------------------------------------------------------
# walls
# ---------------------------------------------------------------------------------------------

def _world_boxes(sys):
    """(x_min, y_min, x_max, y_max, z_min, z_max) of every box geom on the world body."""
    types = np.asarray(sys.geom_type)
    body = np.asarray(sys.geom_bodyid)
    sel = (types == 6) & (body == 0)  # mjGEOM_BOX
    pos, size = np.asarray(sys.geom_pos)[sel], np.asarray(sys.geom_size)[sel]
    return np.concatenate([pos[:, :2] - size[:, :2], pos[:, :2] + size[:, :2],
                           pos[:, 2:3] - size[:, 2:3], pos[:, 2:3] + size[:, 2:3]], axis=1)


def _check_walls_cover_cells(boxes, maze, cell):
    """Box union == wall cells of mazes.wall_boxes, boxes disjoint."""
    cells = mazes.wall_boxes(maze, cell)
    centres = (cells[:, :2] + cells[:, 2:]) / 2
    inside = ((boxes[None, :, 0] < centres[:, None, 0]) & (centres[:, None, 0] < boxes[None, :, 2])
              & (boxes[None, :, 1] < centres[:, None, 1])
              & (centres[:, None, 1] < boxes[None, :, 3]))
    assert np.all(inside.sum(axis=1) == 1)  # each wall cell in exactly one box
    area = np.prod(boxes[:, 2:4] - boxes[:, 0:2], axis=1).sum()
    assert area == pytest.approx(len(cells) * cell * cell)  # and nothing else
    # box edges lie on the cell boundaries ((k + 1/2) * cell)
    edges = boxes[:, :4] / cell + 0.5
    np.testing.assert_allclose(edges, np.round(edges), atol=1e-5)


@pytest.mark.parametrize("maze", sorted(mazes.LAYOUTS))
def test_merged_wall_rects_cover_exactly(maze):
    rects = merged_wall_rects(maze)
    g = mazes.grid(maze)
    count = np.zeros(g.shape, int)
    for r0, c0, r1, c1 in rects:
        count[r0:r1 + 1, c0:c1 + 1] += 1
    np.testing.assert_array_equal(count, g.astype(int))
    _check_walls_cover_cells(wall_geom_boxes(maze, 4.0), maze, 4.0)


def test_ant_maze_walls_in_mjcf(ant_maze):
    env = ant_maze.env
    boxes = _world_boxes(env.sys)
    assert len(boxes) == len(env.wall_boxes) == len(merged_wall_rects("u4"))
    _check_walls_cover_cells(boxes, "u4", 4.0)
    np.testing.assert_allclose(boxes[:, 4], 0.0, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 5], 2.0, atol=1e-6)
    # one box per cell when merging is off: exactly mazes.wall_boxes
    unmerged = _world_boxes(AntMaze("u4", merge_walls=False).sys)
    expected = mazes.wall_boxes("u4", 4.0)
    order = lambda b: b[np.lexsort(b[:, :4].T[::-1])][:, :4]  # noqa: E731
    np.testing.assert_allclose(order(unmerged), order(expected), atol=1e-5)


def test_humanoid_maze_walls_in_mjcf(humanoid_maze):
    boxes = _world_boxes(humanoid_maze.env.sys)
    _check_walls_cover_cells(boxes, "u", 2.0)
    np.testing.assert_allclose(boxes[:, 5], 1.0, atol=1e-6)
    assert len(_world_boxes(Humanoid().sys)) == 0


def test_ant_cannot_pass_wall(ant, ant_maze):
    """Launched at 8 m/s from x = 1 toward the wall face at x = 2 (u4: the cell below the start
    is wall), the maze ant stops short of the face; the open-field ant flies past it."""
    xs = {}
    for name, j in (("open", ant), ("maze", ant_maze)):
        env = j.env
        qd = jnp.zeros(env.sys.qd_size()).at[0].set(8.0)
        s = j.reset_to(_ant_q(env, xy=(1.0, 0.0)), qd, jnp.zeros(2))
        xs[name] = []
        key = jax.random.PRNGKey(0)
        for _ in range(30):
            key, k = jax.random.split(key)
            s = j.step(s, jax.random.uniform(k, (8,), minval=-1, maxval=1))
            xs[name].append(float(_torso_pos(s)[0]))
    assert max(xs["open"]) > 3.0
    assert max(xs["maze"]) < 2.0 - 0.2  # torso sphere radius 0.25


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

def test_registry_builds_locomotion_envs():
    for name, cls in (("ant", Ant), ("ant_u4_maze", AntMaze), ("humanoid", Humanoid),
                      ("humanoid_u_maze", HumanoidMaze)):
        env = make_env(name, far_goals=True)
        assert type(env) is cls and env.far_goals
    assert make_env("ant_hardest_maze").maze == "hardest"
    assert make_env("humanoid_big_maze").cell_size == 2.0


def test_make_env_eval_goal_set():
    env = make_env("ant_u4_maze", goal_set="eval")
    assert env.maze == "u4" and env.goal_layout == "u4_eval"
    np.testing.assert_array_equal(env.goal_centres, [[8, 0], [12, 0], [12, 4], [12, 8]])
    g = _goals(env, n=256)
    assert {tuple(x) for x in g.tolist()} == {(8, 0), (12, 0), (12, 4), (12, 8)}
    hum = make_env("humanoid_big_maze", goal_set="eval")
    cells = (hum.goal_centres / 2.0).astype(int) + np.array(mazes.start_cell("big"))
    assert {tuple(c) for c in cells} == {tuple(c) for c in mazes.goal_cells("humanoid_big_eval")}
    assert make_env("humanoid_u_maze", goal_set="train").goal_layout == "u"
    for name in ("ant", "humanoid", "ant_hardest_maze", "point_maze_u", "arm_push_easy"):
        assert not has_eval_goal_set(name)
        with pytest.raises(ValueError, match="no eval goal set"):
            make_env(name, goal_set="eval")
    with pytest.raises(ValueError, match="goal_set"):
        make_env("ant_u4_maze", goal_set="test")


def test_config_eval_goal_set_is_validated():
    from pathlib import Path

    from crl import config as C
    paper = Path(__file__).resolve().parents[1] / "presets" / "paper"
    assert C.Config().eval.goal_set == "train"
    for env_name, (_, ev, *_) in PAPER_MAZES.items():   # the paper presets select the eval set
        cfg = C.load(str(paper / f"{env_name}.yaml"))
        assert cfg.eval.goal_set == ("train" if ev is None else "eval"), env_name
    with pytest.raises(C.ConfigError, match=r"eval\.goal_set.*ant_hardest_maze.*no eval layout"):
        C.load(str(paper / "ant_hardest_maze.yaml"), {"eval.goal_set": "eval"})
    with pytest.raises(C.ConfigError, match=r"eval\.goal_set"):
        C.load(None, {"eval.goal_set": "test"})


# ---------------------------------------------------------------------------------------------
# slow: every maze steps; vmapped maze rollouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["ant_u5_maze", "ant_big_maze", "ant_hardest_maze",
                                  "humanoid_big_maze"])
def test_every_maze_steps(name):
    env = make_env(name)
    n, t = 8, 20

    @jax.jit
    def rollout(key):
        k_reset, k_act = jax.random.split(key)
        s = jax.vmap(env.reset)(jax.random.split(k_reset, n))

        def body(s, k):
            a = jax.random.uniform(k, (n, env.action_size), minval=-1, maxval=1)
            s = jax.vmap(env.step)(s, a)
            return s, s.pipeline_state.x.pos[:, 0]
        return s, jax.lax.scan(body, s, jax.random.split(k_act, t))[1]

    s0, torso = rollout(jax.random.PRNGKey(0))
    assert np.all(np.isfinite(torso))
    goals = np.asarray(s0.info["goal"])[:, :2]
    cells = _cell_of(goals, env.maze, env.cell_size)
    assert not mazes.grid(env.maze)[cells[:, 0], cells[:, 1]].any()
    _check_walls_cover_cells(_world_boxes(env.sys), env.maze, env.cell_size)


@pytest.mark.slow
def test_humanoid_cannot_walk_through_wall(humanoid, humanoid_maze):
    """Pushed at 4 m/s toward the wall face at x = 1 (maze u: the cell below the start is wall)
    the humanoid's legs stop at the wall, unlike in the open field."""
    xs = {}
    for name, j in (("open", humanoid), ("maze", humanoid_maze)):
        env = j.env
        qd = jnp.zeros(env.sys.qd_size()).at[0].set(4.0)
        s = j.reset_to(env.sys.init_q, qd, jnp.array([0.0, 3.0, TARGET_Z]))
        feet = []
        for _ in range(40):
            s = j.step(s, jnp.zeros(17))
            feet.append(float(np.asarray(s.pipeline_state.x.pos)[[4, 6], 0].max()))
        xs[name] = max(feet)
    assert xs["open"] > 1.2
    assert xs["maze"] < 1.0
