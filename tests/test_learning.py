import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crl import config as C
from crl.learning import (actor_loss, alpha_loss, critic_loss, make_learner, replicate,
                          shard_segments, unreplicate)

S, A, G = 4, 2, 2


def small_cfg(**over):
    base = {"network.actor.width": 32, "network.critic.width": 32, "network.repr_dim": 8,
            "algo.batch_size": 16, "learner.segments_per_call": 4, "learner.minibatches_per_call": 3,
            "replay.min_size_steps": 400}
    base.update(over)
    return C.load(overrides=base)


def batch(key, b=16):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"state": jax.random.normal(k1, (b, S)), "action": jnp.tanh(jax.random.normal(k2, (b, A))),
            "goal": jax.random.normal(k3, (b, G))}


@pytest.fixture(scope="module")
def learner():
    return make_learner(small_cfg(), S, A, (0, 1), num_devices=2)


def test_critic_loss_matches_numpy(learner):
    ts = learner.init(jax.random.PRNGKey(0))
    b = batch(jax.random.PRNGKey(1))
    loss, m = critic_loss(ts.critic_params, learner.nets, b, 0.1)
    sa = np.asarray(learner.nets.encode_sa(ts.critic_params, b["state"], b["action"]), np.float64)
    g = np.asarray(learner.nets.encode_g(ts.critic_params, b["goal"]), np.float64)
    logits = -np.linalg.norm(sa[:, None] - g[None], axis=-1)
    lse = np.log(np.exp(logits).sum(1))
    expected = -np.mean(np.diag(logits) - lse) + 0.1 * np.mean(lse ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    np.testing.assert_allclose(m["categorical_accuracy"], np.mean(logits.argmax(1) == np.arange(16)))


def test_alpha_rises_when_entropy_below_target():
    log_prob = jnp.full((8,), 3.0)            # entropy -3 < target -1
    g = jax.grad(alpha_loss)(jnp.zeros(()), log_prob, -1.0)
    assert g < 0                                # gradient descent increases log alpha
    g = jax.grad(alpha_loss)(jnp.zeros(()), jnp.full((8,), -3.0), -1.0)
    assert g > 0


def test_sgd_step_order_actor_uses_pre_update_critic(learner):
    ts = learner.init(jax.random.PRNGKey(0))
    b = batch(jax.random.PRNGKey(2))
    new, metrics = learner.sgd_step(ts, b)
    _, k_actor = jax.random.split(ts.key)
    loss_old, _ = actor_loss(ts.actor_params, ts.critic_params, ts.log_alpha, learner.nets, b, k_actor)
    np.testing.assert_allclose(metrics["actor_loss"], loss_old, rtol=1e-5)
    assert int(new.steps) == 1
    for k in ("critic_loss", "actor_loss", "alpha", "entropy", "logits_pos", "logits_neg",
              "categorical_accuracy", "actor_grad_norm", "critic_grad_norm"):
        assert np.isfinite(metrics[k]), k
    # params really moved
    diff = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), ts.critic_params, new.critic_params)
    assert max(jax.tree_util.tree_leaves(diff)) > 0


def test_pmap_step_equals_single_device(learner):
    assert jax.local_device_count() >= 2, "conftest forces 2 CPU devices"
    ts = learner.init(jax.random.PRNGKey(0))
    b = batch(jax.random.PRNGKey(3))
    single, m1 = learner.sgd_step(ts, b)
    sharded = jax.tree_util.tree_map(lambda x: x.reshape((2, 8) + x.shape[1:]), b)
    multi, m2 = learner.sgd_step_pmap(replicate(ts, 2), sharded)
    multi = unreplicate(multi)
    for a, c in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(multi)):
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-5)
    for k in m1:
        np.testing.assert_allclose(m1[k], unreplicate(m2)[k], rtol=1e-4, atol=1e-5)


def test_update_many_runs_minibatches_in_one_call(learner):
    ts = learner.init(jax.random.PRNGKey(0))
    N, T = 4, 20
    k = jax.random.PRNGKey(5)
    segs = {"state": jax.random.normal(k, (N, T, S)), "action": jnp.zeros((N, T, A)),
            "episode_id": jnp.repeat(jnp.arange(N)[:, None], T, 1).astype(jnp.int32)}
    new, metrics = learner.update_many(ts, segs)
    assert int(new.steps) == 3 and np.isfinite(metrics["critic_loss"])
    rep, m = learner.update_many_pmap(replicate(learner.init(jax.random.PRNGKey(0)), 2),
                                      shard_segments(segs, 2))
    assert int(unreplicate(rep).steps) == 3 and np.isfinite(unreplicate(m)["critic_loss"])


def test_critic_learns_to_classify():
    """A few hundred steps on a fixed, separable batch: InfoNCE accuracy rises well above chance."""
    cfg = small_cfg()
    learner = make_learner(cfg, S, A, (0, 1))
    ts = learner.init(jax.random.PRNGKey(0))
    b = batch(jax.random.PRNGKey(7))
    b["goal"] = b["state"][:, :2]
    step = jax.jit(lambda ts: learner.sgd_step(ts, b))
    for _ in range(300):
        ts, m = step(ts)
    assert m["categorical_accuracy"] > 0.8


@pytest.mark.parametrize("num_devices", [1, 2])
def test_update_async_matches_update_and_its_snapshot_survives_donation(num_devices):
    """Updater.update_async gives what update gives, without waiting; its params snapshot stays
    readable (and unchanged) after the next call donated the state's buffers; the finite flag
    catches a NaN update."""
    from crl.learning import Updater
    cfg = small_cfg()
    N, T = 4, 20

    def segs(seed):
        k = jax.random.PRNGKey(seed)
        return {"state": np.array(jax.random.normal(k, (N, T, S))),
                "action": np.zeros((N, T, A), np.float32),
                "episode_id": np.repeat(np.arange(N)[:, None], T, 1).astype(np.int32)}

    sync = Updater(cfg, S, A, (0, 1), jax.random.PRNGKey(0), num_devices)
    fast = Updater(cfg, S, A, (0, 1), jax.random.PRNGKey(0), num_devices)
    m = sync.update(segs(1))
    expected = jax.tree_util.tree_map(np.array, {"actor": sync.host_state().actor_params,
                                                 "critic": sync.host_state().critic_params})
    r1 = fast.update_async(segs(1), snapshot=True)
    r2 = fast.update_async(segs(2))          # donates the buffers of the state r1 came from
    assert r2.params is None
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(r1.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert {k: float(v) for k, v in r1.metrics.items()} == m
    assert bool(r1.finite) and bool(r2.finite)
    assert int(r1.steps) == 3 and int(r2.steps) == 6 == fast.sgd_steps
    snap = fast.params_snapshot()
    bad = segs(3)
    bad["state"][:] = np.nan
    r3 = fast.update_async(bad)
    assert not bool(r3.finite)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(snap))


# --- exact numerics against the authors' elementwise form (issue 11, item 5) --------------------
def _authors_critic_loss(critic_params, nets, b, penalty=0.1):
    """The reference critic loss, logits from the [B, B, D] difference tensor, penalty on
    logsumexp(logits + 1e-6) as in the authors' code."""
    sa = nets.encode_sa(critic_params, b["state"], b["action"])
    g = nets.encode_g(critic_params, b["goal"])
    logits = -jnp.sqrt(jnp.sum((sa[:, None, :] - g[None, :, :]) ** 2, -1))
    loss = -jnp.mean(jnp.diag(logits) - jax.nn.logsumexp(logits, axis=1))
    return loss + penalty * jnp.mean(jax.nn.logsumexp(logits + 1e-6, axis=1) ** 2)


def _authors_actor_loss(actor_params, critic_params, log_alpha, nets, b, key):
    mean, log_std = nets.policy(actor_params, jnp.concatenate([b["state"], b["goal"]], 1))
    std = jnp.exp(log_std)
    x = mean + std * jax.random.normal(key, mean.shape)
    action = jnp.tanh(x)
    log_prob = jax.scipy.stats.norm.logpdf(x, loc=mean, scale=std)
    log_prob = jnp.sum(log_prob - jnp.log(1 - action ** 2 + 1e-6), -1)
    sa = nets.encode_sa(critic_params, b["state"], action)
    g = nets.encode_g(critic_params, b["goal"])
    q = -jnp.sqrt(jnp.sum((sa - g) ** 2, -1))
    return jnp.mean(jnp.exp(log_alpha) * log_prob - q), log_prob


def _collapsed(critic_params, norm=30.0):
    """Both encoders' heads: kernels x 1e-3 and the same bias of norm `norm`: every representation
    sits within ~1e-3 of one point of norm 30 (the regime where ||x||^2 + ||y||^2 - 2 x.y cancels
    for every pair, positives and negatives)."""
    d = critic_params["g_encoder"]["head"]["bias"].shape[0]
    bias = norm * jnp.ones(d) / np.sqrt(d)
    out = {}
    for enc, p in critic_params.items():
        head = {"kernel": p["head"]["kernel"] * 1e-3, "bias": bias}
        out[enc] = {**p, "head": head}
    return out


def _tree_rel_err(got, ref):
    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b)) ** 2)) for a, b in
              zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)))
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree_util.tree_leaves(ref))
    return np.sqrt(num / den)


@pytest.mark.parametrize("depth", [4, 8, 16])
def test_losses_and_grads_equal_authors_elementwise_form(depth):
    """Critic, actor and alpha losses and their gradients equal the elementwise-form reference to
    float32 noise, with collapsed representations of norm 30 (where the plain expansion is off for
    every pair; test_critic_loss_matches_numpy covers the initialised critic). Op by op (jit off): the small ops compile once for all depths, where a jitted loss and
    gradient costs seconds of compilation per depth."""
    from crl.networks import CRLNetworks
    cfg = small_cfg(**{f"network.{n}.depth": depth for n in ("actor", "critic")})
    nets = CRLNetworks(cfg.network, S, A, G)
    b = batch(jax.random.PRNGKey(11))
    key, log_alpha = jax.random.PRNGKey(12), jnp.asarray(0.3)
    vg = jax.value_and_grad
    with jax.disable_jit():
        actor_params, critic_params = nets.init(jax.random.PRNGKey(depth))
        for params in (_collapsed(critic_params),):
            lc, gc = vg(lambda c: critic_loss(c, nets, b, 0.1)[0])(params)
            lc_ref, gc_ref = vg(lambda c: _authors_critic_loss(c, nets, b))(params)
            np.testing.assert_allclose(lc, lc_ref, rtol=2e-6, atol=1e-6)
            assert _tree_rel_err(gc, gc_ref) < 1e-5
            la, ga = vg(lambda p: actor_loss(p, params, log_alpha, nets, b, key)[0])(actor_params)
            la_ref, ga_ref = vg(lambda p: _authors_actor_loss(p, params, log_alpha, nets, b,
                                                              key)[0])(actor_params)
            np.testing.assert_allclose(la, la_ref, rtol=2e-6, atol=1e-6)
            assert _tree_rel_err(ga, ga_ref) < 1e-5
        _, log_prob = _authors_actor_loss(actor_params, critic_params, log_alpha, nets, b, key)
        target = -0.5 * A
        ref_alpha = lambda la: jnp.exp(la) * jnp.mean(jax.lax.stop_gradient(-log_prob - target))  # noqa: E731
        np.testing.assert_allclose(vg(alpha_loss)(log_alpha, log_prob, target),
                                   vg(ref_alpha)(log_alpha), rtol=1e-6)
