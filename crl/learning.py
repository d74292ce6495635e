"""CRL losses and the update step: pure functions over an explicit TrainState.

One SGD step on a minibatch of B relabelled transitions (state, action, goal):
  1. actor and entropy temperature, with the pre-update critic;
  2. critic: InfoNCE over the B x B logits f(s_i, a_i, g_j), positives on the diagonal, plus
     logsumexp_penalty * mean(logsumexp_j^2).
`make_learner` returns jitted functions: `update` (one minibatch), `update_many` (relabel a batch
of segments, shuffle, run many minibatches in one compiled scan), and a pmap'ed `update_many`
that splits the batch across local devices with exactly the single-device result: goal
representations are all-gathered so every device sees the full B x B logits of its rows.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from crl.config import Config
from crl.networks import CRLNetworks, pairwise_energy, rowwise_energy, squash_gaussian
from crl.relabel import relabel

AXIS = "devices"   # pmap axis name


class TrainState(NamedTuple):
    actor_params: Any
    critic_params: Any
    log_alpha: jax.Array          # scalar
    actor_opt_state: Any
    critic_opt_state: Any
    alpha_opt_state: Any
    key: jax.Array
    steps: jax.Array              # SGD steps taken (int32 scalar)


def _global_mean(x, axis_name):
    return jax.lax.pmean(x, axis_name) if axis_name else x


def critic_loss(critic_params, nets: CRLNetworks, batch, logsumexp_penalty: float,
                axis_name: Optional[str] = None):
    """InfoNCE (forward) with logsumexp regulariser. batch rows are this device's rows."""
    sa = nets.encode_sa(critic_params, batch["state"], batch["action"])      # [b, D]
    g = nets.encode_g(critic_params, batch["goal"])                          # [b, D]
    if axis_name:
        offset = jax.lax.axis_index(axis_name) * sa.shape[0]
        g = jax.lax.all_gather(g, axis_name, tiled=True)                     # [B, D]
    else:
        offset = 0
    logits = pairwise_energy(sa, g, offset)   # [b, B]; positives (exact) at [i, offset + i]
    labels = offset + jnp.arange(sa.shape[0])
    positive = logits[jnp.arange(sa.shape[0]), labels]
    lse = jax.nn.logsumexp(logits, axis=1)
    loss = -jnp.mean(positive - lse) + logsumexp_penalty * jnp.mean(lse ** 2)
    correct = jnp.argmax(logits, axis=1) == labels
    negatives_mean = (jnp.sum(logits, axis=1) - positive) / (logits.shape[1] - 1)
    metrics = {
        "critic_loss": loss,
        "logits_pos": jnp.mean(positive),
        "logits_neg": jnp.mean(negatives_mean),
        "logsumexp": jnp.mean(lse),
        "categorical_accuracy": jnp.mean(correct.astype(jnp.float32)),
    }
    return loss, metrics


def actor_loss(actor_params, critic_params, log_alpha, nets: CRLNetworks, batch, key,
               axis_name: Optional[str] = None):
    """mean(alpha * log pi(a|s,g) - f(s, a, g)), a ~ pi reparameterised; grads to the actor only.

    The noise is drawn for the global batch and each device takes its rows, so a pmap'ed step
    samples exactly the actions of the single-device step.
    """
    obs = jnp.concatenate([batch["state"], batch["goal"]], -1)
    mean, log_std = nets.policy(actor_params, obs)
    b = mean.shape[0]
    if axis_name:
        num_devices = jax.lax.psum(1, axis_name)
        noise = jax.random.normal(key, (b * num_devices,) + mean.shape[1:])
        noise = jax.lax.dynamic_slice_in_dim(noise, jax.lax.axis_index(axis_name) * b, b)
    else:
        noise = jax.random.normal(key, mean.shape)
    action, log_prob = squash_gaussian(mean, log_std, noise)
    sa = nets.encode_sa(critic_params, batch["state"], action)
    g = nets.encode_g(critic_params, batch["goal"])
    q = rowwise_energy(sa, g)
    alpha = jnp.exp(jax.lax.stop_gradient(log_alpha))
    loss = jnp.mean(alpha * log_prob - q)
    return loss, {"actor_loss": loss, "entropy": -jnp.mean(log_prob), "q_policy": jnp.mean(q),
                  "log_prob": log_prob}


def alpha_loss(log_alpha, log_prob, target_entropy: float):
    """alpha * mean(stop_grad(-log pi - H_target))."""
    return jnp.exp(log_alpha) * jnp.mean(jax.lax.stop_gradient(-log_prob - target_entropy))


class Learner(NamedTuple):
    """The jitted algorithm of one config. All functions are pure."""
    nets: CRLNetworks
    init: Callable                  # key -> TrainState
    sgd_step: Callable              # (TrainState, transitions [B]) -> (TrainState, metrics)
    update_many: Callable           # (TrainState, segments [N, T]) -> (TrainState, metrics)
    sgd_step_pmap: Optional[Callable]      # replicated state, transitions [D, B/D]
    update_many_pmap: Optional[Callable]   # replicated state, segments [D, N/D, T]
    num_devices: int


def make_learner(cfg: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int],
                 num_devices: int = 1) -> Learner:
    goal_indices = tuple(int(i) for i in goal_indices)
    nets = CRLNetworks(cfg.network, state_dim, action_dim, len(goal_indices))
    a = cfg.algo
    actor_opt = optax.adam(a.actor_lr)
    critic_opt = optax.adam(a.critic_lr)
    alpha_opt = optax.adam(a.alpha_lr)
    target_entropy = -a.target_entropy_scale * action_dim
    batch_size = a.batch_size
    num_minibatches = cfg.learner.minibatches_per_call

    def init(key) -> TrainState:
        key, k_init = jax.random.split(key)
        actor_params, critic_params = nets.init(k_init)
        log_alpha = jnp.zeros((), jnp.float32)
        return TrainState(actor_params, critic_params, log_alpha,
                          actor_opt.init(actor_params), critic_opt.init(critic_params),
                          alpha_opt.init(log_alpha), key, jnp.zeros((), jnp.int32))

    def sgd_step(ts: TrainState, batch, axis_name=None):
        key, k_actor = jax.random.split(ts.key)
        # 1. actor and temperature, with the pre-update critic.
        (_, actor_metrics), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
            ts.actor_params, ts.critic_params, ts.log_alpha, nets, batch, k_actor, axis_name)
        log_prob = actor_metrics.pop("log_prob")
        alpha_grad = jax.grad(alpha_loss)(ts.log_alpha, log_prob, target_entropy)
        # 2. critic.
        (_, critic_metrics), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(
            ts.critic_params, nets, batch, a.logsumexp_penalty, axis_name)
        if axis_name:
            # Each device's loss is the mean over its rows: the mean over devices is the global
            # mean, and all_gather's transpose already routed the cross-device goal gradients.
            actor_grads, critic_grads, alpha_grad = jax.lax.pmean(
                (actor_grads, critic_grads, alpha_grad), axis_name)
            actor_metrics = jax.lax.pmean(actor_metrics, axis_name)
            critic_metrics = jax.lax.pmean(critic_metrics, axis_name)
        updates, actor_opt_state = actor_opt.update(actor_grads, ts.actor_opt_state)
        actor_params = optax.apply_updates(ts.actor_params, updates)
        updates, alpha_opt_state = alpha_opt.update(alpha_grad, ts.alpha_opt_state)
        log_alpha = optax.apply_updates(ts.log_alpha, updates)
        updates, critic_opt_state = critic_opt.update(critic_grads, ts.critic_opt_state)
        critic_params = optax.apply_updates(ts.critic_params, updates)
        metrics = {**actor_metrics, **critic_metrics,
                   "alpha": jnp.exp(log_alpha),
                   "actor_grad_norm": optax.global_norm(actor_grads),
                   "critic_grad_norm": optax.global_norm(critic_grads)}
        new = TrainState(actor_params, critic_params, log_alpha, actor_opt_state,
                         critic_opt_state, alpha_opt_state, key, ts.steps + 1)
        return new, metrics

    def update_many(ts: TrainState, segments, axis_name=None):
        """Relabel [N, T] segments, shuffle, and run num_minibatches SGD steps (one scan).

        Under pmap, N and batch_size are per device (the global batch split D ways).
        """
        per_device_batch = batch_size // (num_devices if axis_name else 1)
        key, k_relabel, k_perm = jax.random.split(ts.key, 3)
        if axis_name:   # different relabelling and shuffles on each device
            dev = jax.lax.axis_index(axis_name)
            k_relabel, k_perm = jax.random.fold_in(k_relabel, dev), jax.random.fold_in(k_perm, dev)
        transitions = relabel(k_relabel, segments, a.discount, goal_indices)
        n = transitions["state"].shape[0]
        idx = jax.random.permutation(k_perm, n)[: num_minibatches * per_device_batch]
        minibatches = jax.tree_util.tree_map(
            lambda x: x[idx].reshape(num_minibatches, per_device_batch, -1), transitions)

        def body(state, mb):
            return sgd_step(state, mb, axis_name)

        ts, metrics = jax.lax.scan(body, ts._replace(key=key), minibatches)
        return ts, jax.tree_util.tree_map(jnp.mean, metrics)

    sgd_step_pmap = update_many_pmap = None
    if num_devices > 1:
        sgd_step_pmap = jax.pmap(functools.partial(sgd_step, axis_name=AXIS), axis_name=AXIS)
        update_many_pmap = jax.pmap(functools.partial(update_many, axis_name=AXIS),
                                    axis_name=AXIS, donate_argnums=(0,))
    return Learner(nets, jax.jit(init), jax.jit(sgd_step), jax.jit(update_many, donate_argnums=(0,)),
                   sgd_step_pmap, update_many_pmap, num_devices)


def replicate(tree, num_devices: int):
    """Copies a pytree onto num_devices local devices (leading axis) for the pmap'ed update."""
    return jax.device_put_replicated(tree, jax.local_devices()[:num_devices])


def unreplicate(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_segments(segments: Dict[str, Any], num_devices: int):
    """[N, T, ...] -> [D, N/D, T, ...] for the pmap'ed update."""
    return jax.tree_util.tree_map(
        lambda x: x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:]), segments)


def resolve_num_devices(requested: int) -> int:
    """0 = all local devices; otherwise the requested count, checked against what exists."""
    available = jax.local_device_count()
    if requested == 0:
        return available
    if requested > available:
        raise ValueError(f"learner.num_devices = {requested} but only {available} local devices "
                         f"exist ({jax.local_devices()}); lower it or set 0 for all")
    return requested


@jax.jit
def all_finite(tree) -> jax.Array:
    """True iff every float leaf of `tree` is finite (one fused reduction on device)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@jax.jit
def copy_tree(tree):
    """Fresh device buffers for every leaf (a jitted copy never aliases its inputs), so the next
    update, which donates the state's buffers, cannot invalidate them."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def params_of(state: TrainState) -> Dict[str, Any]:
    """{"actor", "critic"}: the params the learner publishes."""
    return {"actor": state.actor_params, "critic": state.critic_params}


# The update-to-data ratio, counted as the Reverb rate limiter counts it: SGD steps per env step
# inserted after the prefill (replay.min_size_steps). The in-process driver and the learner both
# decide how many update calls to run from this one rule.

def sgd_steps_owed(env_steps: int, prefill_steps: int, utd: float) -> float:
    """SGD steps the run owes for `env_steps` received: utd x (env_steps - prefill), >= 0."""
    return utd * max(0, env_steps - prefill_steps)


def update_calls_owed(env_steps: int, sgd_steps: int, *, prefill_steps: int, utd: float,
                      minibatches_per_call: int) -> int:
    """Whole update calls (of `minibatches_per_call` SGD steps) still owed after `sgd_steps`:
    floor((utd x (env_steps - prefill) - sgd_steps) / minibatches_per_call), >= 0. The 1e-9
    absorbs float rounding of utd x steps (0.2 x 800 = 160.00000000000003 must owe 160, and
    0.1 x 30 = 3.0000000000000004 likewise: never a call short or one over)."""
    owed = sgd_steps_owed(env_steps, prefill_steps, utd) - sgd_steps
    return max(0, int(math.floor(owed / minibatches_per_call + 1e-9)))


def measured_utd(sgd_steps: int, env_steps: int, prefill_steps: int) -> Optional[float]:
    """SGD steps per env step received after the prefill; None before the prefill is done."""
    after = env_steps - prefill_steps
    return sgd_steps / after if after > 0 else None


# Published beside the params of every version (subset "progress"): where on the paper's axes
# that version stands, so an evaluator anywhere can place its result at the version's env steps;
# and whether it is the run's final version (the budget was reached: followers finish and exit).
PROGRESS_KEY = "progress"


def progress_of(env_steps: int, sgd_steps: int, finished: bool = False) -> Dict[str, Any]:
    """{"env_steps", "sgd_steps", "finished" (0/1)} as int64 scalars (host arrays: never on the
    device)."""
    import numpy as np
    return {"env_steps": np.asarray(env_steps, np.int64),
            "sgd_steps": np.asarray(sgd_steps, np.int64),
            "finished": np.asarray(int(bool(finished)), np.int64)}


def progress_template() -> Dict[str, Any]:
    """The params client's template of the progress subset."""
    return {PROGRESS_KEY: progress_of(0, 0)}


@functools.partial(jax.jit, static_argnums=(2,))
def _after_update(metrics, state: TrainState, snapshot: bool):
    finite = all_finite((metrics, state.actor_params, state.critic_params, state.log_alpha))
    return finite, jnp.copy(state.steps), (copy_tree(params_of(state)) if snapshot else None)


class UpdateResult(NamedTuple):
    """What one asynchronously dispatched update call returns, all still on the device: reading
    a field (float(), bool(), int(), np.asarray) waits for that call to finish. None of them is
    invalidated by the next call's buffer donation."""
    metrics: Dict[str, jax.Array]      # scalar losses etc.
    finite: jax.Array                  # bool: the metrics and the new params/log_alpha are finite
    steps: jax.Array                   # int: SGD steps taken after this call
    params: Optional[Dict[str, Any]]   # snapshot=True: a copy of the new {"actor", "critic"}


class Updater:
    """Holds the TrainState of one learner and applies the compiled update to sampled segments.

    The thin stateful shell shared by the in-process driver and the learner role: it picks the
    single-device or the pmap'ed update and hides replication. `update` returns host floats
    (it waits for the call); `update_async` returns at once, so the caller can prepare the next
    batch, or dispatch the next call, while this one computes.
    """

    def __init__(self, cfg: Config, state_dim: int, action_dim: int, goal_indices, key,
                 num_devices: int = 1):
        self.num_devices = num_devices
        self.learner = make_learner(cfg, state_dim, action_dim, goal_indices, num_devices)
        state = self.learner.init(key)
        self.state = replicate(state, num_devices) if num_devices > 1 else state

    def update(self, segments) -> Dict[str, float]:
        """segments {state [N, T, S], action [N, T, A], episode_id [N, T]} -> metrics (floats)."""
        return {k: float(v) for k, v in self.update_async(segments).metrics.items()}

    def update_async(self, segments, snapshot: bool = False) -> UpdateResult:
        """Dispatches one update call and returns without waiting for it (JAX's asynchronous
        dispatch): device metrics, an "all finite" flag over the metrics and the new params, the
        new SGD step count and, with snapshot=True, a copy of the new params for publishing.
        The update donates the previous state's buffers, so the state is only ever read
        through what this returns or through the methods below."""
        segments = {k: segments[k] for k in ("state", "action", "episode_id")}
        if self.num_devices > 1:
            self.state, metrics = self.learner.update_many_pmap(
                self.state, shard_segments(segments, self.num_devices))
            metrics = unreplicate(metrics)
        else:
            self.state, metrics = self.learner.update_many(self.state, segments)
        finite, steps, params = _after_update(metrics, self.host_state(), snapshot)
        return UpdateResult(metrics, finite, steps, params)

    def params_snapshot(self) -> Dict[str, Any]:
        """A copy of the current {"actor", "critic"} params that later updates do not invalidate
        (dispatched asynchronously, like an update)."""
        return copy_tree(params_of(self.host_state()))

    def host_state(self) -> TrainState:
        """The (unreplicated) TrainState, e.g. for checkpoints and publishing."""
        return unreplicate(self.state) if self.num_devices > 1 else self.state

    def load_state(self, state: TrainState) -> None:
        self.state = replicate(state, self.num_devices) if self.num_devices > 1 else state

    @property
    def sgd_steps(self) -> int:
        return int(self.host_state().steps)
