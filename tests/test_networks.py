import dataclasses

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
