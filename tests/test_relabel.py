import jax
import jax.numpy as jnp
import numpy as np

from crl.relabel import last_step_of_episode, relabel, relabel_segment


def test_last_step_of_episode():
    ids = jnp.array([5, 5, 5, 9, 9, 2, 2, 2, 2, 7])
    np.testing.assert_array_equal(last_step_of_episode(ids), [2, 2, 2, 4, 4, 8, 8, 8, 8, 9])


def test_mean_offset_matches_truncated_geometric():
    T, gamma = 400, 0.99
    state = jnp.arange(T, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    ids = jnp.zeros(T, jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    _, j = jax.vmap(relabel_segment, in_axes=(0, None, None, None, None))(keys, state, ids, gamma, (0, 1))
    for t in (0, 200, 390):
        k = np.arange(1, T - t)
        expected = np.sum(k * gamma ** k) / np.sum(gamma ** k)
        offsets = np.asarray(j[:, t]) - t
        assert offsets.min() >= 1 and offsets.max() <= T - 1 - t
        se = offsets.std() / np.sqrt(len(offsets))
        assert abs(offsets.mean() - expected) < 4 * se + 0.05, (t, offsets.mean(), expected)


def test_offset_distribution_is_geometric():
    T, gamma = 200, 0.9
    state = jnp.zeros((T, 2))
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    _, j = jax.vmap(relabel_segment, in_axes=(0, None, None, None, None))(
        keys, state, jnp.zeros(T, jnp.int32), gamma, (0,))
    offsets = np.asarray(j[:, 0])
    freq = np.bincount(offsets, minlength=6)[1:6] / len(offsets)
    expected = (1 - gamma) * gamma ** np.arange(0, 5)   # P(k) for k = 1..5 (untruncated)
    np.testing.assert_allclose(freq, expected, atol=0.012)


def test_never_across_episodes_never_past_self_goal_at_end():
    key = jax.random.PRNGKey(3)
    N, T = 64, 50
    # random contiguous episodes per segment
    starts = jax.random.bernoulli(key, 0.08, (N, T)).at[:, 0].set(True)
    ids = jnp.cumsum(starts, axis=1).astype(jnp.int32) + 1000 * jnp.arange(N)[:, None]
    state = jax.random.normal(key, (N, T, 4))
    keys = jax.random.split(jax.random.PRNGKey(4), N)
    goal, j = jax.vmap(relabel_segment, in_axes=(0, 0, 0, None, None))(keys, state, ids, 0.95, (1, 3))
    ids, j, state, goal = map(np.asarray, (ids, j, state, goal))
    last = np.asarray(jax.vmap(last_step_of_episode)(ids))
    t = np.arange(T)[None]
    assert np.all(np.take_along_axis(ids, j, 1) == ids)          # same episode
    assert np.all(j >= t)                                        # never the past
    assert np.all((j > t) | (last == t))                         # self only at the episode's end
    np.testing.assert_array_equal(j[last == np.broadcast_to(t, last.shape)],
                                  np.broadcast_to(t, last.shape)[last == np.broadcast_to(t, last.shape)])
    # goal is the goal slice of the chosen future state
    expected = np.take_along_axis(state, j[..., None], 1)[..., [1, 3]]
    np.testing.assert_array_equal(goal, expected)


def test_relabel_flattens_batch():
    N, T = 3, 7
    seg = {"state": jnp.ones((N, T, 5)), "action": jnp.zeros((N, T, 2)),
           "episode_id": jnp.zeros((N, T), jnp.int32)}
    out = relabel(jax.random.PRNGKey(0), seg, 0.99, (0, 1, 2))
    assert out["state"].shape == (N * T, 5) and out["action"].shape == (N * T, 2)
    assert out["goal"].shape == (N * T, 3)
