"""The learner's device memory, estimated before a run starts (printed by `crl config`).

What is estimated: the peak memory of ONE call of the compiled update the learner runs,
`crl.learning.make_learner(...).update_many` (relabel a sample of segments, shuffle, then
`minibatches_per_call` SGD steps of the real losses in one scan; the TrainState is donated), per
learner device. The figure is XLA's own buffer assignment of that compiled program
(`jax.jit(f).lower(...).compile().memory_analysis()`):

    peak = arguments + outputs + temporaries - aliased (outputs written into donated arguments)

split into parts that are exact and one that is measured:
- params (float32) and Adam's two moments: 4 and 8 bytes per parameter, exact from the shapes
  (`jax.eval_shape` of the learner's init at the configured depths: nothing is compiled or
  allocated). The donated TrainState's outputs alias these buffers.
- sampled data: the argument of one call, `segments_per_call` segments of `segment_length` steps
  (state, action, episode id), exact from the shapes.
- temporaries: activations kept for the backward pass, gradients, Adam's update, the relabelled
  transitions and their shuffled minibatches, the B x B logits... This is what `network.*.remat`
  changes (remat keeps one [batch, width] input per residual block instead of every layer's
  activations) and it is the one part that is measured, by compiling.

Method. The residual blocks are one scanned block (crl.networks), so the compiled program, and
its temporaries per layer, are the same at every depth: temporaries are affine in depth once the
scan is a real loop. `estimate` compiles the update with the run's batch, width, repr dim,
dtype, segments and env sizes at three depths along the configured actor:critic ratio (the deeper
network at FIT_DEPTHS = 64, 128, 256; the shallower one in proportion, a multiple of 4, at least
4 and at most its configured depth), fits temporaries = a + b x depth by least squares, and
evaluates the fit at the configured depth. Configs whose deeper network is at most
FIT_DEPTHS[-1] deep are compiled directly at their depths (method "direct": XLA's figure itself).

Error (measured on CPU, jax 0.4.34, docs/scaling.md): "direct" is XLA's own analysis (the test
checks equality to the byte). The fit's largest residual at its three points is printed as a
linearity check. Extrapolated to the paper's largest setting (humanoid, critic 1024, actor 512,
batch 512, width 256) the fit was +0.005% off a direct compile at depth 1024 without remat and
0.8% under it with remat (temporaries 2.3% under: a small non-linear remainder); on small test
networks a fit at depths 16 and 32 predicts depth 64 within the tolerance stated in
tests/test_memory.py. Below depth 16 the temporaries are NOT linear (XLA unrolls or removes
one- and two-trip loops), which is why the fit starts at 64.

What the estimate does not include: XLA's per-device runtime overhead and allocator
fragmentation, cuBLAS/cuDNN workspaces, a second update call in flight (the learner dispatches
asynchronously, but the donated state serialises calls), the params snapshot the learner keeps for
publishing (params once more), prefetched batches waiting on the device (learner.prefetch x
sampled data) and, on a GPU, JAX's default preallocation of 75% of the memory. It is computed
by the backend that runs it: on a CPU host it is the CPU compiler's buffer assignment, which
fuses differently from the GPU compiler (by how much is not measured: no GPU was available; the
same call on a GPU machine compiles for the GPU and gives its own figure). Under pmap
(learner.num_devices = D > 1) it compiles the single-device update at batch / D and segments / D,
the per-device shares; the all-gathered goal representations (B x repr dim) are not counted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

from crl.config import Config, override

GiB = 1 << 30
MiB = 1 << 20
FIT_DEPTHS = (64, 128, 256)      # the deeper network's depth at the fit points
DEFAULT_TARGET_GIB = 80.0        # the paper's card (A100/H100 80 GB) when no GPU is present
LINEARITY_WARN = 0.05            # fit residual above which the estimate is called uncertain


@dataclasses.dataclass(frozen=True)
class Analysis:
    """XLA's memory analysis of one compiled update, in bytes."""
    actor_depth: int
    critic_depth: int
    argument: int
    output: int
    temp: int
    alias: int

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak device memory of one update call at the configured depths, in bytes."""
    remat: Tuple[bool, bool]          # (actor, critic)
    actor_depth: int
    critic_depth: int
    params: int                       # float32 parameters, actor + critic
    adam: int                         # Adam's two moments (and step counters)
    data: int                         # one call's sampled segments
    other_state: int                  # the rest of the TrainState (log alpha, key, counters)
    temp: int                         # XLA temporaries: activations, gradients, relabelled data
    unaliased_output: int             # outputs not written into donated buffers (metrics)
    method: str                       # "direct" (compiled at the depths) or "fit"
    points: Tuple[Analysis, ...]      # the compiled updates behind `temp`
    fit_residual: float               # largest relative residual of the linear fit (0: direct)

    @property
    def total(self) -> int:
        return (self.params + self.adam + self.other_state + self.data + self.temp
                + self.unaliased_output)


# ---------------------------------------------------------------------------------------------
# Pure helpers.

def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def fit_depths(actor_depth: int, critic_depth: int,
               points: Sequence[int] = FIT_DEPTHS) -> List[Tuple[int, int]]:
    """(actor, critic) depths of the fit points: the deeper network at each of `points`, the
    other one in proportion (a multiple of 4, at least 4, at most its configured depth)."""
    deep = max(actor_depth, critic_depth)

    def scaled(d, t):
        return min(d, max(4, 4 * round(t * d / deep / 4)))
    return [(scaled(actor_depth, t), scaled(critic_depth, t)) for t in points]


def target_bytes(cfg: Config, device=None) -> Tuple[int, str]:
    """The device memory the estimate is checked against, and where that figure comes from:
    learner.device_memory_gib when set (> 0); else the GPU's own limit when `device` (default:
    JAX's first device) is a GPU; else 80 GiB (the paper's card)."""
    if cfg.learner.device_memory_gib > 0:
        return int(cfg.learner.device_memory_gib * GiB), "learner.device_memory_gib"
    if device is None:
        import jax
        device = jax.devices()[0]
    if device.platform == "gpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:   # noqa: BLE001 - a backend without memory stats
            limit = None
        if limit:
            return int(limit), f"{device.device_kind} (JAX's allocator limit)"
    return int(DEFAULT_TARGET_GIB * GiB), f"the default when no GPU is here: {DEFAULT_TARGET_GIB:g} GiB"


def warnings_for(estimates: Sequence[Estimate], target: int, configured: Tuple[bool, bool]
                 ) -> List[str]:
    """Sentences for the estimates that exceed `target`, naming the remat setting that fits."""
    by = {e.remat: e for e in estimates}
    out = []
    mine = by.get(configured)
    if mine is not None and mine.total > target:
        fits = [e for e in estimates if e.total <= target]
        hint = (f"; {_remat_words(fits[0].remat)} fits ({_fmt(fits[0].total)}): set "
                f"{_remat_flags(fits[0].remat)}" if fits else
                "; no remat setting fits: lower algo.batch_size, the depth or the width, or use "
                "more learner devices (learner.num_devices)")
        out.append(f"the learner's estimated device memory {_fmt(mine.total)} "
                   f"({_remat_words(configured)}) exceeds the target {_fmt(target, 1)}{hint}")
    elif all(e.total > target for e in estimates):
        out.append(f"every remat setting exceeds the target {_fmt(target, 1)}")
    return out


def _fmt(b: float, digits: int = 2) -> str:
    """Bytes as GiB (at least 1 GiB) or MiB."""
    return f"{b / GiB:.{digits}f} GiB" if b >= GiB else f"{b / MiB:.1f} MiB"


def _remat_words(remat: Tuple[bool, bool]) -> str:
    if remat[0] == remat[1]:
        return "remat on" if remat[0] else "remat off"
    return f"remat actor {'on' if remat[0] else 'off'} / critic {'on' if remat[1] else 'off'}"


def _remat_flags(remat: Tuple[bool, bool]) -> str:
    return (f"--network.actor.remat {str(remat[0]).lower()} "
            f"--network.critic.remat {str(remat[1]).lower()}")


def recommendation(estimates: Sequence[Estimate], target: int) -> str:
    """The documented remat choice: remat off when it fits (no recomputation), else remat on
    when that fits, else neither fits."""
    by = {e.remat: e for e in estimates}
    off, on = by.get((False, False)), by.get((True, True))
    if off is not None and off.total <= target:
        return (f"remat off fits ({_fmt(off.total)} of {_fmt(target, 1)}): "
                "network.*.remat false (no recomputation in the backward pass)")
    if on is not None and on.total <= target:
        return (f"remat off does not fit, remat on does ({_fmt(on.total)} of "
                f"{_fmt(target, 1)}): network.actor.remat true, network.critic.remat true")
    return "neither remat setting fits: lower the batch, the depth or the width, or add devices"


# ---------------------------------------------------------------------------------------------
# Compiling.

def _per_device_cfg(cfg: Config, actor_depth: int, critic_depth: int,
                    remat: Tuple[bool, bool]) -> Config:
    d = cfg.learner.num_devices if cfg.learner.num_devices > 1 else 1
    return override(cfg, {
        "network.actor.depth": actor_depth, "network.critic.depth": critic_depth,
        "network.actor.remat": remat[0], "network.critic.remat": remat[1],
        "algo.batch_size": max(1, cfg.algo.batch_size // d),
        "learner.segments_per_call": max(1, cfg.learner.segments_per_call // d)})


def _shapes(cfg: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int]):
    """(learner, TrainState shapes, segment shapes) of one device's update; nothing allocated."""
    import jax
    import jax.numpy as jnp
    from crl.learning import make_learner
    learner = make_learner(cfg, state_dim, action_dim, goal_indices)
    state = jax.eval_shape(learner.init, jax.random.PRNGKey(0))
    n, t = cfg.learner.segments_per_call, cfg.segment_length
    segments = {"state": jax.ShapeDtypeStruct((n, t, state_dim), jnp.float32),
                "action": jax.ShapeDtypeStruct((n, t, action_dim), jnp.float32),
                "episode_id": jax.ShapeDtypeStruct((n, t), jnp.int32)}
    return learner, state, segments


def _nbytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def cache_dir() -> Optional[str]:
    """Where compiled analyses are kept between `crl config` calls ($CRL_MEMORY_CACHE, else
    $XDG_CACHE_HOME/crl/memory or ~/.cache/crl/memory; CRL_MEMORY_CACHE=off: no cache)."""
    import os
    d = os.environ.get("CRL_MEMORY_CACHE")
    if d == "off":
        return None
    return d or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "crl", "memory")


def _cache_key(c: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int]) -> str:
    """Everything the compiled program depends on: the sections that shape the update (the
    per-device config), the env's sizes, and the compiler (jax version, backend, device kind)."""
    import hashlib
    import json
    import jax
    dev = jax.devices()[0]
    what = {s: dataclasses.asdict(getattr(c, s)) for s in ("network", "algo", "learner")}
    what.update(segment_length=c.segment_length, env=c.env.name, state_dim=state_dim,
                action_dim=action_dim, goal_indices=list(map(int, goal_indices)),
                jax=jax.__version__, platform=dev.platform, device=dev.device_kind)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def analyse(cfg: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int],
            actor_depth: int, critic_depth: int, remat: Tuple[bool, bool]) -> Analysis:
    """Compiles one device's update_many at these depths and remat and returns XLA's analysis
    (kept in cache_dir(): the same program is not compiled twice)."""
    import json
    import os
    c = _per_device_cfg(cfg, actor_depth, critic_depth, remat)
    d = cache_dir()
    path = d and os.path.join(d, _cache_key(c, state_dim, action_dim, goal_indices) + ".json")
    if path:
        try:
            with open(path) as f:
                return Analysis(**json.load(f))
        except (OSError, ValueError, TypeError):
            pass   # not there yet, or unreadable: compiled again
    learner, state, segments = _shapes(c, state_dim, action_dim, goal_indices)
    m = learner.update_many.lower(state, segments).compile().memory_analysis()
    a = Analysis(actor_depth, critic_depth, int(m.argument_size_in_bytes),
                 int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                 int(m.alias_size_in_bytes))
    if path:
        try:   # atomic: a reader never sees half a file
            os.makedirs(d, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(dataclasses.asdict(a), f)
            os.replace(tmp, path)
        except OSError:
            pass   # a read-only or full disk: the estimate is still printed
    return a


def exact_parts(cfg: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int],
                remat: Tuple[bool, bool]) -> Dict[str, int]:
    """Bytes of params, Adam moments, the rest of the TrainState and one call's data at the
    configured depths, from shapes alone (no compile)."""
    c = _per_device_cfg(cfg, cfg.network.actor.depth, cfg.network.critic.depth, remat)
    _, state, segments = _shapes(c, state_dim, action_dim, goal_indices)
    params = _nbytes((state.actor_params, state.critic_params))
    adam = _nbytes((state.actor_opt_state, state.critic_opt_state, state.alpha_opt_state))
    return {"params": params, "adam": adam, "other_state": _nbytes(state) - params - adam,
            "data": _nbytes(segments)}


def estimate(cfg: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int],
             remat: Optional[Tuple[bool, bool]] = None, method: str = "auto",
             points: Sequence[int] = FIT_DEPTHS) -> Estimate:
    """Peak device memory of one learner update call at cfg's depths and `remat` (default: the
    configured one). method "direct": compile at the configured depths; "fit": compile along
    `points` and extrapolate the temporaries linearly; "auto": direct when the deeper network is
    at most points[-1] deep, else fit."""
    ad, cd = cfg.network.actor.depth, cfg.network.critic.depth
    remat = tuple(remat) if remat is not None else (cfg.network.actor.remat,
                                                     cfg.network.critic.remat)
    if method == "auto":
        method = "direct" if max(ad, cd) <= points[-1] else "fit"
    parts = exact_parts(cfg, state_dim, action_dim, goal_indices, remat)
    if method == "direct":
        a = analyse(cfg, state_dim, action_dim, goal_indices, ad, cd, remat)
        rest = parts["params"] + parts["adam"] + parts["other_state"] + parts["data"]
        # Every byte of XLA's figure is accounted for: arguments are the state and the data.
        return Estimate(remat, ad, cd, temp=a.temp, unaliased_output=a.output - a.alias,
                        method="direct", points=(a,), fit_residual=0.0,
                        **{**parts, "data": parts["data"] + a.argument - rest})
    if method != "fit":
        raise ValueError(f"method {method!r}: one of auto, direct, fit")
    depths = fit_depths(ad, cd, points)
    if len(set(depths)) < 2:
        raise ValueError(f"fit points {depths} are not distinct")
    pts = tuple(analyse(cfg, state_dim, action_dim, goal_indices, a_, c_, remat)
                for a_, c_ in depths)
    xs = [max(p.actor_depth, p.critic_depth) for p in pts]
    slope, icpt = linear_fit(xs, [p.temp for p in pts])
    residual = max(abs(slope * x + icpt - p.temp) / p.temp for x, p in zip(xs, pts))
    return Estimate(remat, ad, cd, temp=int(round(slope * max(ad, cd) + icpt)),
                    unaliased_output=pts[-1].output - pts[-1].alias, method="fit", points=pts,
                    fit_residual=residual, **parts)


# ---------------------------------------------------------------------------------------------
# The report `crl config` prints.

def report(cfg: Config, state_dim: int, action_dim: int, goal_indices: Sequence[int],
           device=None) -> Tuple[str, List[str]]:
    """(text, warnings): the estimate with remat off and on (and the configured setting if it is
    mixed), the target and the remat recommendation. Compiles 2-6 updates (tens of seconds on a
    CPU)."""
    import jax
    configured = (cfg.network.actor.remat, cfg.network.critic.remat)
    settings = [(False, False), (True, True)] + ([configured] if configured[0] != configured[1]
                                                 else [])
    ests = [estimate(cfg, state_dim, action_dim, goal_indices, s) for s in settings]
    target, source = target_bytes(cfg, device)
    e0 = ests[0]
    d = cfg.learner.num_devices if cfg.learner.num_devices > 1 else 1
    backend = jax.devices()[0].platform
    how = ("compiled at the configured depths" if e0.method == "direct" else
           "temporaries fitted on (actor, critic) depths "
           + ", ".join(f"{p.actor_depth}/{p.critic_depth}" for p in e0.points)
           + " and extrapolated")
    lines = [f"learner device memory, per device ({d} device{'s' if d > 1 else ''}; "
             f"batch {cfg.algo.batch_size // d}, {cfg.learner.segments_per_call // d} segments "
             f"x {cfg.segment_length} per call; actor {cfg.network.actor.depth} / critic "
             f"{cfg.network.critic.depth} deep): XLA memory analysis of the update compiled on "
             f"{backend}, {how} (crl/memory.py)",
             f"  params           {e0.params / MiB:>10,.1f} MiB  (float32)",
             f"  Adam moments     {e0.adam / MiB:>10,.1f} MiB",
             f"  sampled data     {e0.data / MiB:>10,.1f} MiB  (one call's segments)"]
    for e in ests:
        fit = (f"; fit residual {100 * e.fit_residual:.1f}%" if e.method == "fit" else "")
        lines.append(f"  {_remat_words(e.remat):<16} activations + temporaries "
                     f"{_fmt(e.temp):>10} -> total {_fmt(e.total):>10}{fit}")
        if e.fit_residual > LINEARITY_WARN:
            lines.append(f"    (temporaries are not linear in depth here: the "
                         f"{_remat_words(e.remat)} estimate is uncertain)")
    lines.append(f"  target {_fmt(target, 1)} per device ({source})")
    lines.append(f"  remat: {recommendation(ests, target)}")
    return "\n".join(lines), warnings_for(ests, target, configured)


def print_report(cfg: Config, file) -> None:
    """`crl config`: the report and its warnings on `file` (stderr: stdout stays the YAML).
    Never fails the command: an error is printed instead."""
    try:
        from crl.envs import make_env
        env = make_env(cfg.env.name)
        print("estimating the learner's device memory (compiles the update, tens of seconds on "
              f"a CPU, once per network shape: kept in {cache_dir()}) ...", file=file, flush=True)
        text, warns = report(cfg, env.state_dim, env.action_size, env.goal_indices)
    except Exception as e:   # noqa: BLE001 - the estimate is advice, never a failure
        print(f"learner memory estimate failed: {type(e).__name__}: {e}", file=file)
        return
    print(text, file=file)
    for w in warns:
        print(f"WARNING: {w}", file=file)
