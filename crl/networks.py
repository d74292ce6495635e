"""Deep residual networks of CRL: state-action encoder phi, goal encoder psi, tanh-Gaussian actor.

Trunk = Dense(width) -> LayerNorm -> act, then depth/4 residual blocks, each
4 x [Dense(width) -> LayerNorm -> act] with h <- h + F(h) after the 4th activation.
The blocks are ONE block module scanned over stacked parameters (leading axis = block index), so
the compiled program and its compile time do not grow with depth; `remat` recomputes each block
in the backward pass (activation memory O(1) in depth instead of O(depth)).
"""
from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from crl.config import NetworkConfig, NetworksConfig

# Every Dense kernel: variance scaling (1/3, fan_in, uniform); biases zero.
KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
TANH_EPS = 1e-6


def _activation(name: str):
    return {"swish": nn.swish, "relu": nn.relu}[name]


def _dense(features: int, cfg: NetworkConfig, name=None) -> nn.Dense:
    return nn.Dense(features, kernel_init=KERNEL_INIT, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.float32, name=name)


class _Layer(nn.Module):
    """Dense -> (LayerNorm) -> activation."""
    cfg: NetworkConfig

    @nn.compact
    def __call__(self, h):
        h = _dense(self.cfg.width, self.cfg)(h)
        if self.cfg.layer_norm:
            h = nn.LayerNorm(dtype=jnp.float32)(h)   # statistics in float32 even with bf16 matmuls
        return _activation(self.cfg.activation)(h)


class ResidualBlock(nn.Module):
    """4 layers; adds the block input after the 4th activation when cfg.residual."""
    cfg: NetworkConfig

    @nn.compact
    def __call__(self, h):
        x = h
        for i in range(4):
            x = _Layer(self.cfg, name=f"layer{i}")(x)
        h = h + x if self.cfg.residual else x
        return h.astype(jnp.float32)


class ResidualTrunk(nn.Module):
    """Input layer plus depth/4 residual blocks; returns [..., width] features.

    The blocks' parameters are stacked (leading axis = block) and applied with jax.lax.scan.
    (flax.linen.scan is not used: flax 0.10.4's lifted scan needs a newer JAX than the 0.4.34
    that Reverb's TensorFlow pins.)
    """
    cfg: NetworkConfig

    @nn.compact
    def __call__(self, x):
        h = _Layer(self.cfg, name="input")(x).astype(jnp.float32)
        block = ResidualBlock(self.cfg, parent=None)   # detached: applied functionally below
        num_blocks = self.cfg.depth // 4

        def init_blocks(key):
            keys = jax.random.split(key, num_blocks)
            sample = jnp.zeros((1, self.cfg.width), jnp.float32)
            return jax.vmap(lambda k: block.init(k, sample)["params"])(keys)

        blocks = self.param("blocks", init_blocks)

        def body(h, block_params):
            return block.apply({"params": block_params}, h), None

        if self.cfg.remat:
            body = jax.checkpoint(body)
        h, _ = jax.lax.scan(body, h, blocks)
        return h


class Encoder(nn.Module):
    """phi(s, a) or psi(g): trunk -> Dense(repr_dim)."""
    cfg: NetworkConfig
    repr_dim: int

    @nn.compact
    def __call__(self, x):
        h = ResidualTrunk(self.cfg, name="trunk")(x)
        return _dense(self.repr_dim, self.cfg, name="head")(h).astype(jnp.float32)


class Actor(nn.Module):
    """pi(a | s, g): returns (mean, log_std) of the pre-tanh Gaussian, log_std in [-5, 2]."""
    cfg: NetworkConfig
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        h = ResidualTrunk(self.cfg, name="trunk")(obs)
        mean = _dense(self.action_dim, self.cfg, name="mean")(h).astype(jnp.float32)
        raw = _dense(self.action_dim, self.cfg, name="log_std")(h).astype(jnp.float32)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw) + 1.0)
        return mean, log_std


def sample_action(mean, log_std, key) -> Tuple[jax.Array, jax.Array]:
    """Reparameterised tanh-Gaussian sample and its log-probability (per row)."""
    return squash_gaussian(mean, log_std, jax.random.normal(key, mean.shape))


def squash_gaussian(mean, log_std, noise) -> Tuple[jax.Array, jax.Array]:
    """tanh(mean + std * noise) and its log-probability, corrected for the tanh squashing."""
    std = jnp.exp(log_std)
    u = mean + std * noise
    action = jnp.tanh(u)
    gauss_logp = -0.5 * (((u - mean) / std) ** 2 + 2 * log_std + jnp.log(2 * jnp.pi))
    log_prob = jnp.sum(gauss_logp - jnp.log(1 - action ** 2 + TANH_EPS), axis=-1)
    return action, log_prob


def deterministic_action(mean):
    return jnp.tanh(mean)


# Number of nearest non-positive goals per row whose distance pairwise_energy recomputes exactly.
EXACT_NEIGHBOURS = 4
_CLAMP = 1e-12   # squared distance floor: the gradient of sqrt at 0 is infinite


def _sq_dist(x, y):
    """||x - y||^2 over the last axis, from the elementwise difference (exact in float32)."""
    return jnp.sum((x - y) ** 2, -1)


def pairwise_energy(sa_repr, g_repr, positive_offset=0, exact_neighbours: int = EXACT_NEIGHBOURS):
    """Logits f[i, j] = -||phi_i - psi_j||_2 for [b, D] x [B, D] -> [b, B].

    Row i's positive is column positive_offset + i (an int or a traced scalar; b + offset <= B).
    ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y is a matmul instead of a [b, B, D] tensor, but it
    cancels when a pair is close relative to its norms (norm 10, 0.01 apart: tens of percent off
    in float32). So: (1) both sides are centred on the goals' mean (the distance is translation
    invariant: a common offset of the representations costs nothing), (2) the dot runs at
    Precision.HIGHEST (not TF32/bf16 passes on GPUs), (3) the positives and each row's
    `exact_neighbours` nearest other goals (near-duplicate goals: the negatives where the
    expansion cancels) are recomputed from the elementwise difference of their rows, O(b k D).
    The squared distance is clamped before the square root, whose gradient at 0 is infinite.
    """
    b, n = sa_repr.shape[0], g_repr.shape[0]
    if isinstance(positive_offset, int) and not 0 <= positive_offset <= n - b:
        raise ValueError(f"positives at columns {positive_offset}..{positive_offset + b - 1} "
                         f"of a [{b}, {n}] logit matrix")
    centre = jax.lax.stop_gradient(jnp.mean(g_repr, 0))   # any centre gives the same distances
    x, y = sa_repr - centre, g_repr - centre
    sq = (jnp.sum(x ** 2, -1)[:, None] + jnp.sum(y ** 2, -1)[None, :]
          - 2.0 * jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST))
    rows = jnp.arange(b)
    cols = positive_offset + rows
    k = min(exact_neighbours, n - 1)
    if k > 0:
        near = jax.lax.stop_gradient(sq).at[rows, cols].set(jnp.inf)
        _, idx = jax.lax.top_k(-near, k)                                  # [b, k]
        sq = sq.at[rows[:, None], idx].set(_sq_dist(sa_repr[:, None, :], g_repr[idx]))
    g_pos = jax.lax.dynamic_slice_in_dim(g_repr, positive_offset, b)
    sq = sq.at[rows, cols].set(_sq_dist(sa_repr, g_pos))
    return -jnp.sqrt(jnp.maximum(sq, _CLAMP))


def rowwise_energy(sa_repr, g_repr):
    """f[i] = -||phi_i - psi_i||_2 for paired rows -> [B] (elementwise: exact)."""
    return -jnp.sqrt(jnp.maximum(_sq_dist(sa_repr, g_repr), _CLAMP))


class CRLNetworks:
    """The three networks of one agent and their init; apply functions are pure."""

    def __init__(self, cfg: NetworksConfig, state_dim: int, action_dim: int, goal_dim: int):
        self.state_dim, self.action_dim, self.goal_dim = state_dim, action_dim, goal_dim
        self.actor = Actor(cfg.actor, action_dim)
        self.sa_encoder = Encoder(cfg.critic, cfg.repr_dim)
        self.g_encoder = Encoder(cfg.critic, cfg.repr_dim)

    def init(self, key):
        """Returns (actor_params, critic_params); critic = {"sa_encoder", "g_encoder"}."""
        k_actor, k_sa, k_g = jax.random.split(key, 3)
        obs = jnp.zeros((1, self.state_dim + self.goal_dim))
        sa = jnp.zeros((1, self.state_dim + self.action_dim))
        g = jnp.zeros((1, self.goal_dim))
        actor_params = self.actor.init(k_actor, obs)["params"]
        critic_params = {"sa_encoder": self.sa_encoder.init(k_sa, sa)["params"],
                         "g_encoder": self.g_encoder.init(k_g, g)["params"]}
        return actor_params, critic_params

    def policy(self, actor_params, obs):
        return self.actor.apply({"params": actor_params}, obs)

    def encode_sa(self, critic_params, state, action):
        return self.sa_encoder.apply({"params": critic_params["sa_encoder"]},
                                     jnp.concatenate([state, action], -1))

    def encode_g(self, critic_params, goal):
        return self.g_encoder.apply({"params": critic_params["g_encoder"]}, goal)


def param_count(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def count_params(cfg: NetworksConfig, state_dim: int, action_dim: int, goal_dim: int):
    """{"actor": n, "critic": n} without allocating (shape evaluation only)."""
    nets = CRLNetworks(cfg, state_dim, action_dim, goal_dim)
    actor, critic = jax.eval_shape(nets.init, jax.random.PRNGKey(0))
    return {"actor": param_count(actor), "critic": param_count(critic)}
