import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crl.config import NetworkConfig, NetworksConfig
from crl.networks import (Encoder, ResidualTrunk, CRLNetworks, count_params, pairwise_energy, rowwise_energy,
                          sample_action, squash_gaussian)

X = jax.random.normal(jax.random.PRNGKey(1), (8, 10))


def encoder(**kw):
    cfg = NetworkConfig(**{"width": 32, "depth": 8, **kw})
    enc = Encoder(cfg, repr_dim=16)
    return enc, enc.init(jax.random.PRNGKey(0), X)["params"]


def test_depth_counts_dense_layers_in_blocks():
    for depth in (4, 8, 64):
        _, p = encoder(depth=depth)
        kernels = p["trunk"]["blocks"]["layer0"]["Dense_0"]["kernel"]
        assert kernels.shape == (depth // 4, 32, 32)     # stacked: one entry per block
        n_dense_in_blocks = sum(v["Dense_0"]["kernel"].shape[0] for v in p["trunk"]["blocks"].values())
        assert n_dense_in_blocks == depth


def test_param_count_formula():
    cfg = NetworksConfig(actor=NetworkConfig(depth=1024), critic=NetworkConfig(depth=1024))
    counts = count_params(cfg, state_dim=268, action_dim=17, goal_dim=3)
    w = 256
    layer = w * w + w + 2 * w                      # Dense + LayerNorm
    trunk_blocks = 1024 * layer
    assert counts["critic"] == 2 * trunk_blocks + (268 + 17) * w + 3 * w + 2 * (3 * w) + 2 * (w * 64 + 64)
    assert counts["critic"] > 100_000_000            # "tens of millions" per encoder


def test_init_variance_scaling_and_zero_bias():
    _, p = encoder(depth=4)
    k = np.asarray(p["trunk"]["blocks"]["layer1"]["Dense_0"]["kernel"])
    limit = np.sqrt(3 * (1 / 3) / 32)               # uniform variance scaling(1/3, fan_in)
    assert np.abs(k).max() <= limit + 1e-6 and np.abs(k).max() > 0.9 * limit
    assert np.all(np.asarray(p["trunk"]["blocks"]["layer1"]["Dense_0"]["bias"]) == 0)


def test_residual_block_adds_input():
    """With a block whose Dense kernels are zero and LayerNorm off, F(h) = act(0) = 0 for both
    swish and relu, so the block is the identity with residual and zero without."""
    for residual in (True, False):
        enc, p = encoder(depth=4, layer_norm=False, residual=residual)
        blocks = jax.tree_util.tree_map(jnp.zeros_like, p["trunk"]["blocks"])
        p = {**p, "trunk": {**p["trunk"], "blocks": blocks}}
        h = ResidualTrunk(enc.cfg).apply({"params": p["trunk"]}, X)
        inp = jax.nn.swish(X @ p["trunk"]["input"]["Dense_0"]["kernel"] + p["trunk"]["input"]["Dense_0"]["bias"])
        np.testing.assert_allclose(h, inp if residual else jnp.zeros_like(inp), atol=1e-5)


@pytest.mark.parametrize("change", [{"residual": False}, {"layer_norm": False}, {"activation": "relu"}])
def test_ablations_change_the_function(change):
    base, p = encoder()
    other = Encoder(dataclasses.replace(base.cfg, **change), repr_dim=16)
    p_other = other.init(jax.random.PRNGKey(0), X)["params"]
    if change.get("layer_norm") is False:
        assert "LayerNorm_0" not in p_other["trunk"]["blocks"]["layer0"]
    else:
        out_a = base.apply({"params": p}, X)
        out_b = other.apply({"params": p}, X)
        assert not np.allclose(out_a, out_b, atol=1e-4)


def test_remat_same_values_and_grads():
    enc, p = encoder(depth=16)
    enc_r = Encoder(dataclasses.replace(enc.cfg, remat=True), repr_dim=16)
    f = lambda m: lambda p: jnp.sum(m.apply({"params": p}, X) ** 2)
    np.testing.assert_allclose(f(enc)(p), f(enc_r)(p), rtol=1e-6)
    g1, g2 = jax.grad(f(enc))(p), jax.grad(f(enc_r))(p)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_bf16_matmuls_keep_fp32_params():
    enc, p = encoder()
    enc_b = Encoder(dataclasses.replace(enc.cfg, dtype="bfloat16"), repr_dim=16)
    p_b = enc_b.init(jax.random.PRNGKey(0), X)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p_b))
    out, out_b = enc.apply({"params": p}, X), enc_b.apply({"params": p}, X)
    assert out_b.dtype == jnp.float32
    assert not np.array_equal(out, out_b)                      # really computed in bf16
    np.testing.assert_allclose(out, out_b, rtol=0.1, atol=0.1)  # ...and close


def test_compiled_program_size_flat_in_depth():
    """The scan keeps the HLO the same size whatever the depth (compile time flat)."""
    sizes = []
    for depth in (4, 64):
        enc, _ = encoder(depth=depth)
        p = jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), X)["params"])
        hlo = jax.jit(lambda p, x: enc.apply({"params": p}, x)).lower(p, X).as_text()
        sizes.append(len(hlo.replace(str(depth // 4), "")))
    assert abs(sizes[0] - sizes[1]) < 0.02 * sizes[0]


def test_energy_matmul_form_matches_direct():
    a = jax.random.normal(jax.random.PRNGKey(2), (6, 5))
    b = jax.random.normal(jax.random.PRNGKey(3), (7, 5))
    direct = -np.linalg.norm(np.asarray(a)[:, None] - np.asarray(b)[None], axis=-1)
    np.testing.assert_allclose(pairwise_energy(a, b), direct, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rowwise_energy(a, b[:6]), np.diag(direct[:, :6]), rtol=1e-4, atol=1e-5)
    # finite gradient at identical representations (clamped before the sqrt)
    g = jax.grad(lambda x: jnp.sum(pairwise_energy(x, x)))(a)
    assert np.all(np.isfinite(g))


def test_tanh_gaussian_log_prob_and_bounds():
    nets = CRLNetworks(NetworksConfig(actor=NetworkConfig(width=32)), 4, 3, 2)
    actor_params, _ = nets.init(jax.random.PRNGKey(0))
    mean, log_std = nets.policy(actor_params, jnp.ones((5, 6)) * 100.0)
    assert np.all(log_std >= -5) and np.all(log_std <= 2)
    action, logp = sample_action(mean, log_std, jax.random.PRNGKey(1))
    assert np.all(np.abs(action) <= 1)
    # log-prob of the squashed Gaussian against a direct computation
    m, s, n = jnp.array([[0.3]]), jnp.array([[-0.5]]), jnp.array([[0.7]])
    a, lp = squash_gaussian(m, s, n)
    u = 0.3 + np.exp(-0.5) * 0.7
    expected = (-0.5 * 0.7 ** 2 - (-0.5) - 0.5 * np.log(2 * np.pi)) - np.log(1 - np.tanh(u) ** 2 + 1e-6)
    np.testing.assert_allclose(a, np.tanh(u), rtol=1e-6)
    np.testing.assert_allclose(lp, [expected], rtol=1e-5)


# --- exact numerics of the energy (issue 11, item 5) -------------------------------------------
def _elementwise_energy(x, y):
    """The oracle: -||x_i - y_j|| from the [b, B, D] difference tensor (the authors' form)."""
    return -jnp.sqrt(jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, -1))


def _expansion_energy(x, y):
    """The former form: ||x||^2 + ||y||^2 - 2 x.y, default-precision dot."""
    sq = jnp.sum(x ** 2, -1)[:, None] + jnp.sum(y ** 2, -1)[None, :] - 2.0 * x @ y.T
    return -jnp.sqrt(jnp.maximum(sq, 1e-12))


def _close_pairs(norm, b=32, d=16, dist=0.01, duplicate_goals=False, seed=0):
    """Representations of norm `norm` in random directions, positives `dist` apart; with
    duplicate_goals, goals 2i and 2i + 1 are the same row (a negative as close as the positive)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    u = jax.random.normal(k1, (b, d))
    e = jax.random.normal(k2, (b, d))
    if duplicate_goals:
        u = u.at[1::2].set(u[0::2])
    x = norm * u / jnp.linalg.norm(u, axis=1, keepdims=True)
    y = x + dist * e / jnp.linalg.norm(e, axis=1, keepdims=True)
    if duplicate_goals:
        y = y.at[1::2].set(y[0::2])
    return x, y


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _values_and_grads(energy, x, y, offset):
    """Logits and the gradients (x, y) of a generic scalar of them: a fixed random cotangent plus
    the rows' logsumexp."""
    def scalar(a, b):
        logits = energy(a, b, offset)
        w = jax.random.normal(jax.random.PRNGKey(7), logits.shape)
        return jnp.sum(w * logits) + jnp.sum(jax.nn.logsumexp(logits, 1))
    return energy(x, y, offset), jax.grad(scalar, argnums=(0, 1))(x, y)


def _oracle(x, y, offset):
    return _elementwise_energy(x, y)


def _check_against_oracle(x, y, tol=1e-4, offset=0):
    ref, g_ref = _values_and_grads(_oracle, x, y, offset)
    got, g_got = _values_and_grads(pairwise_energy, x, y, offset)
    rel = np.abs(np.asarray(got, np.float64) - ref) / np.abs(np.asarray(ref, np.float64))
    assert rel.max() < tol, rel.max()
    for gr, gg in zip(g_ref, g_got):
        assert _rel_err(gg, gr) < tol, _rel_err(gg, gr)


@pytest.mark.parametrize("norm", [10.0, 30.0])
def test_energy_exact_for_close_pairs_at_large_norm(norm):
    """Positives 0.01 apart at norm 10 / 30: logits and gradients within 1e-4 relative of the
    elementwise form; the plain expansion is visibly off there (so the test can fail)."""
    x, y = _close_pairs(norm)
    _check_against_oracle(x, y)
    assert _rel_err(jnp.diag(_expansion_energy(x, y)), jnp.diag(_elementwise_energy(x, y))) > 1e-2


@pytest.mark.parametrize("norm", [10.0, 30.0])
def test_energy_exact_for_duplicate_goals_and_common_offset(norm):
    """Off the diagonal: a goal duplicated in the batch (a negative as close as the positive) and
    representations sharing a large common offset (spread 1, norm `norm`)."""
    x, y = _close_pairs(norm, duplicate_goals=True)
    _check_against_oracle(x, y)
    u = jax.random.normal(jax.random.PRNGKey(4), (24, 16))
    base = norm * u[0] / jnp.linalg.norm(u[0])
    x = base + 0.05 * u[:12]
    _check_against_oracle(x, base + 0.05 * u[12:])
    # positives at an offset (this device's rows of a pmap'ed batch): [6, 12] logits
    _check_against_oracle(x[3:9], x + 0.01, offset=3)


def test_energy_dot_at_full_precision_in_hlo():
    """The logits' dot is lowered with precision HIGHEST (no TF32 / bf16 passes on GPUs), in the
    forward pass and in the gradient."""
    x, y = jnp.ones((12, 8)), jnp.ones((12, 8))
    for f in (pairwise_energy, jax.grad(lambda a, b: jnp.sum(pairwise_energy(a, b)), (0, 1))):
        dots = [l for l in jax.jit(f).lower(x, y).as_text().splitlines() if "dot_general" in l]
        assert dots and all("precision = [HIGHEST, HIGHEST]" in l for l in dots), dots
