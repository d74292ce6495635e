"""Benchmark: one CRL SGD step (actor + temperature + critic) against depth, remat and dtype.

    python -m benchmarks.update_step [--depths 4 16 64 256] [--batch 512] [--width 256]
        [--variants fp32 fp32+remat bf16 bf16+remat] [--env-dims humanoid] [--quick]

Depth applies to the actor and both critic encoders. Each (depth, variant) runs in a fresh
process, so its peak RSS is its own: it imports JAX, builds the learner, compiles
`Learner.sgd_step` (timed: compile s), runs one warm-up step, then times steps for at least
--min-time seconds (median step time). Peak memory is reported twice: XLA's own estimate for
the compiled step (`compiled.memory_analysis()`: arguments + outputs + temporaries - aliased)
and the process's peak RSS (compile included).

Figures per case: SGD steps/s, samples/s (batch / step time), step and compile seconds,
achieved GFLOP/s (analytic matmul FLOPs, see `sgd_step_flops`), XLA and RSS peak MiB.
Per variant (across depths): slope of step time vs depth (least squares, ms per layer),
compile-time ratio deepest / shallowest (target <= 1.5), linearity (step time per layer at the
deepest depth / at the middle depth, 1.0 = linear).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Dict, List

from benchmarks import common

ENV_DIMS = {"humanoid": (268, 17, (0, 1, 2)), "ant": (29, 8, (0, 1)), "point": (4, 2, (0, 1))}
VARIANTS = {"fp32": (False, "float32"), "fp32+remat": (True, "float32"),
            "bf16": (False, "bfloat16"), "bf16+remat": (True, "bfloat16")}


def trunk_dense_macs(in_dim: int, width: int, depth: int, out_dim: int) -> int:
    """Multiply-accumulates per sample of one trunk + head: input layer, depth block layers, head."""
    return in_dim * width + depth * width * width + width * out_dim


def sgd_step_flops(batch: int, width: int, depth: int, repr_dim: int, S: int, A: int, G: int,
                   remat: bool, actor_depth: int = None) -> float:
    """Analytic matmul FLOPs of one sgd_step (2 per multiply-accumulate; LayerNorm, activations
    and the optimiser are not counted).

    A forward pass costs F = 2*B*MACs; forward + backward with parameter gradients 3F; forward +
    input gradient only (phi inside the actor loss: the gradient reaches the actor through the
    action) 2F. Actor loss: actor 3F, phi 2F, psi 1F (no gradient path). Critic loss: phi 3F,
    psi 3F, plus the B x B logits matmul (fwd + 2 bwd). remat recomputes the blocks' forward
    once in every backward pass that goes through them (actor 1, phi 2, psi 1).
    `depth` is the critic's; `actor_depth` defaults to it.
    """
    ad = depth if actor_depth is None else actor_depth
    fwd = lambda macs: 2.0 * batch * macs   # noqa: E731
    actor = fwd(trunk_dense_macs(S + G, width, ad, 2 * A))
    phi = fwd(trunk_dense_macs(S + A, width, depth, repr_dim))
    psi = fwd(trunk_dense_macs(G, width, depth, repr_dim))
    flops = 3 * actor + 5 * phi + 4 * psi + 3 * 2.0 * batch * batch * repr_dim
    if remat:
        flops += fwd(ad * width * width) + 3 * fwd(depth * width * width)
    return flops


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / common.MiB


def run_case(depth: int, variant: str, batch: int, width: int, dims: str, min_time: float,
             max_steps: int) -> Dict:
    """Runs one case in this process; returns its figures."""
    import jax
    import jax.numpy as jnp
    from crl import config as C
    from crl.learning import make_learner
    from crl.networks import param_count

    remat, dtype = VARIANTS[variant]
    S, A, goal_idx = ENV_DIMS[dims]
    overrides = {"algo.batch_size": batch, "learner.minibatches_per_call": 1,
                 "learner.segments_per_call": max(batch // 100 + 1, 1),
                 "replay.min_size_steps": 100_000, "replay.capacity_steps": 1_000_000}
    for net in ("actor", "critic"):
        overrides.update({f"network.{net}.depth": depth, f"network.{net}.width": width,
                          f"network.{net}.remat": remat, f"network.{net}.dtype": dtype})
    cfg = C.load(overrides=overrides)
    learner = make_learner(cfg, S, A, goal_idx)
    ts = jax.block_until_ready(learner.init(jax.random.PRNGKey(0)))
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    mb = {"state": jax.random.normal(k[0], (batch, S)),
          "action": jnp.tanh(jax.random.normal(k[1], (batch, A))),
          "goal": jax.random.normal(k[2], (batch, len(goal_idx)))}
    rss_before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = learner.sgd_step.lower(ts, mb).compile()
    compile_s = time.perf_counter() - t0
    compile_cpu_s = time.process_time() - c0     # robust to other processes' load
    mem = compiled.memory_analysis()
    xla_mb = None
    if mem is not None:
        xla_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / common.MiB
        temp_mb = mem.temp_size_in_bytes / common.MiB
    t0 = time.perf_counter()
    ts, m = compiled(ts, mb)
    jax.block_until_ready(ts)
    first_s = time.perf_counter() - t0
    times: List[float] = []
    start, c0 = time.perf_counter(), time.process_time()
    while len(times) < max_steps and (len(times) < 2 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        ts, m = compiled(ts, mb)
        jax.block_until_ready(ts)
        times.append(time.perf_counter() - t0)
    step_cpu_s = (time.process_time() - c0) / len(times)
    step_s = statistics.median(times)
    flops = sgd_step_flops(batch, width, depth, cfg.network.repr_dim, S, A, len(goal_idx), remat)
    params = param_count(ts.actor_params) + param_count(ts.critic_params)
    out = {"depth": depth, "variant": variant, "params": params, "compile_s": compile_s,
           "compile_cpu_s": compile_cpu_s, "step_cpu_s": step_cpu_s,
           "first_step_s": first_s, "step_s": step_s, "steps_timed": len(times),
           "step_s_min": min(times), "sgd_steps_per_s": 1 / step_s, "samples_per_s": batch / step_s,
           "gflop_per_step": flops / 1e9, "gflops_per_s": flops / step_s / 1e9,
           "rss_before_compile_mb": rss_before,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "finite": bool(jnp.isfinite(m["critic_loss"]) and jnp.isfinite(m["actor_loss"])),
           "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}
    if xla_mb is not None:
        out.update(xla_peak_mb=xla_mb, xla_temp_mb=temp_mb)
    return out


def compile_pair(depths: List[int], variant: str, batch: int, width: int, dims: str,
                 rounds: int) -> Dict:
    """Compile times of the shallowest and deepest case side by side in one process, alternating
    (d_min, d_max) x rounds: a fresh learner each time, so nothing is cached in between. The
    ratio of medians is what other processes' load disturbs least."""
    import jax
    import jax.numpy as jnp
    from crl import config as C
    from crl.learning import make_learner
    remat, dtype = VARIANTS[variant]
    S, A, goal_idx = ENV_DIMS[dims]
    times = {d: [] for d in depths}
    cpu = {d: [] for d in depths}
    for _ in range(rounds):
        for d in depths:
            o = {"algo.batch_size": batch, "learner.minibatches_per_call": 1,
                 "learner.segments_per_call": max(batch // 100 + 1, 1),
                 "replay.min_size_steps": 100_000, "replay.capacity_steps": 1_000_000}
            for net in ("actor", "critic"):
                o.update({f"network.{net}.depth": d, f"network.{net}.width": width,
                          f"network.{net}.remat": remat, f"network.{net}.dtype": dtype})
            learner = make_learner(C.load(overrides=o), S, A, goal_idx)
            ts = jax.eval_shape(learner.init, jax.random.PRNGKey(0))
            mb = {"state": jax.ShapeDtypeStruct((batch, S), jnp.float32),
                  "action": jax.ShapeDtypeStruct((batch, A), jnp.float32),
                  "goal": jax.ShapeDtypeStruct((batch, len(goal_idx)), jnp.float32)}
            t0, c0 = time.perf_counter(), time.process_time()
            learner.sgd_step.lower(ts, mb).compile()
            times[d].append(time.perf_counter() - t0)
            cpu[d].append(time.process_time() - c0)
    return {"times": {str(d): v for d, v in times.items()}, "cpu": {str(d): v for d, v in cpu.items()}}


def _expansion_energy(sa_repr, g_repr):
    """The former logits (before the exact energy): ||x||^2 + ||y||^2 - 2 x.y at default precision,
    timed here as the baseline of the exact form."""
    import jax.numpy as jnp
    sq = (jnp.sum(sa_repr ** 2, -1)[:, None] + jnp.sum(g_repr ** 2, -1)[None, :]
          - 2.0 * sa_repr @ g_repr.T)
    return -jnp.sqrt(jnp.maximum(sq, 1e-12))


def energy_pair(depth: int, variant: str, batch: int, width: int, dims: str, rounds: int) -> Dict:
    """Cost of the exact energy against the former expansion, side by side in one process
    (alternating, so the machine's load hits both alike): (1) the critic's logits alone,
    InfoNCE + logsumexp-penalty value and gradient on [batch, repr_dim] representations, also for
    the elementwise [B, B, D] form; (2) the whole sgd_step at `depth`, one learner traced with
    each energy (crl.learning.pairwise_energy swapped while tracing the old one)."""
    import jax
    import jax.numpy as jnp
    from crl import config as C
    from crl import learning
    from crl.networks import pairwise_energy
    remat, dtype = VARIANTS[variant]
    S, A, goal_idx = ENV_DIMS[dims]
    o = {"algo.batch_size": batch, "learner.minibatches_per_call": 1,
         "learner.segments_per_call": max(batch // 100 + 1, 1),
         "replay.min_size_steps": 100_000, "replay.capacity_steps": 1_000_000}
    for net in ("actor", "critic"):
        o.update({f"network.{net}.depth": depth, f"network.{net}.width": width,
                  f"network.{net}.remat": remat, f"network.{net}.dtype": dtype})
    cfg = C.load(overrides=o)
    D = cfg.network.repr_dim

    def elementwise(x, y):
        return -jnp.sqrt(jnp.maximum(jnp.sum((x[:, None] - y[None]) ** 2, -1), 1e-12))

    def loss_of(energy):
        def loss(x, y):
            logits = energy(x, y)
            lse = jax.nn.logsumexp(logits, 1)
            return -jnp.mean(jnp.diag(logits) - lse) + 0.1 * jnp.mean(lse ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x, y = jax.random.normal(k[0], (batch, D)), jax.random.normal(k[1], (batch, D))
    fns = {"old": loss_of(_expansion_energy), "exact": loss_of(pairwise_energy),
           "elementwise": loss_of(elementwise)}
    mb = {"state": jax.random.normal(k[2], (batch, S)),
          "action": jnp.tanh(jax.random.normal(k[3], (batch, A))),
          "goal": jax.random.normal(k[4], (batch, len(goal_idx)))}
    steps = {}
    for name in ("old", "exact"):
        if name == "old":   # traced with the former logits (the critic's offset is 0 here)
            learning.pairwise_energy = lambda sa, g, offset=0: _expansion_energy(sa, g)
        try:
            learner = learning.make_learner(cfg, S, A, goal_idx)
            ts = learner.init(jax.random.PRNGKey(0))
            steps[name] = (learner.sgd_step.lower(ts, mb).compile(), ts)
        finally:
            learning.pairwise_energy = pairwise_energy
    for f in fns.values():
        jax.block_until_ready(f(x, y))
    for c, ts in steps.values():
        jax.block_until_ready(c(ts, mb))
    t_energy = {n: [] for n in fns}
    t_step = {n: [] for n in steps}
    for _ in range(rounds):
        for n, f in fns.items():
            for _ in range(5 if n != "elementwise" else 1):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, y))
                t_energy[n].append(time.perf_counter() - t0)
        for n, (c, ts) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(ts, mb))
            t_step[n].append(time.perf_counter() - t0)
    return {"energy_s": t_energy, "step_s": t_step}


def scaling_figures(rows: List[Dict]) -> Dict[str, float]:
    """Depth scaling of one variant from its per-depth rows (sorted by depth): least-squares slope
    and intercept of the step time (wall and process CPU time), compile-time ratio deepest /
    shallowest (wall and CPU time: CPU time is what other processes' load does not inflate),
    linearity = per-layer time at the deepest depth / at the next one (1.0 = linear), and the
    peak-RSS slope. Process CPU time counts every thread (about 2x wall on 2 idle cores)."""
    xs = [r["depth"] for r in rows]
    g = lambda r, k: r[k]   # noqa: E731
    slope, icpt = linear_fit(xs, [g(r, "step_s") for r in rows])
    slope_cpu, icpt_cpu = linear_fit(xs, [g(r, "step_cpu_s") for r in rows])
    mem_slope, _ = linear_fit(xs, [g(r, "peak_rss_mb") for r in rows])
    per_layer = lambda r, k: r[k] / r["depth"]   # noqa: E731
    return {"slope_ms_per_layer": 1e3 * slope, "intercept_ms": 1e3 * icpt,
            "slope_cpu_ms_per_layer": 1e3 * slope_cpu, "intercept_cpu_ms": 1e3 * icpt_cpu,
            "compile_ratio": g(rows[-1], "compile_s") / g(rows[0], "compile_s"),
            "compile_cpu_ratio": g(rows[-1], "compile_cpu_s") / g(rows[0], "compile_cpu_s"),
            "linearity": per_layer(rows[-1], "step_s") / per_layer(rows[-2], "step_s"),
            "linearity_cpu": per_layer(rows[-1], "step_cpu_s") / per_layer(rows[-2], "step_cpu_s"),
            "rss_mb_per_layer": mem_slope}


def linear_fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return slope, my - slope * mx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--env-dims", default="humanoid", choices=list(ENV_DIMS))
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per case")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (peak RSS is then cumulative)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    common.add_common_args(p)
    a = p.parse_args(argv)
    if a.child:   # one case, figures as one JSON line on stdout
        spec = json.loads(a.child)
        if "pair" in spec:
            print(json.dumps(compile_pair(**spec["pair"])), flush=True)
            return 0
        if "energy" in spec:
            print(json.dumps(energy_pair(**spec["energy"])), flush=True)
            return 0
        cases = spec.pop("cases")
        for depth, variant in cases:
            print(json.dumps(run_case(depth, variant, **spec)), flush=True)
        return 0
    depths = a.depths or ([4, 8] if a.quick else [4, 16, 64, 256])
    batch = a.batch or (64 if a.quick else 512)
    width = a.width or (32 if a.quick else 256)
    min_time = a.min_time if a.min_time is not None else (0.2 if a.quick else 4.0)
    max_steps = 3 if a.quick else a.max_steps
    common.header(f"update step: batch {batch}, width {width}, {a.env_dims} dims")
    spec = {"batch": batch, "width": width, "dims": a.env_dims, "min_time": min_time,
            "max_steps": max_steps}
    variants = a.variants if (a.variants != list(VARIANTS) or not a.quick) else ["fp32", "bf16+remat"]
    # Interleaved (depth-major), so slow drifts of the machine's load spread over all variants.
    cases = [(d, v) for d in depths for v in variants]
    # One process per case (own peak RSS); --quick/--in-process: one process for all cases.
    groups = [cases] if (a.quick or a.in_process) else [[c] for c in cases]
    print(f"{'variant':>11} {'depth':>5} {'params':>11} {'compile s':>9} {'step s':>8} "
          f"{'SGD/s':>7} {'samples/s':>9} {'GFLOP/s':>7} {'XLA MiB':>8} {'RSS MiB':>8}", flush=True)
    results: Dict[str, List[Dict]] = {v: [] for v in variants}
    for group in groups:
        proc = common.spawn(["-m", "benchmarks.update_step", "--child",
                             json.dumps({**spec, "cases": group})], pipes=True)
        try:
            for _ in group:
                r = common.read_json_line(proc, 3600, f"update_step case {group}")
                results[r["variant"]].append(r)
                print(f"{r['variant']:>11} {r['depth']:>5} {r['params']:>11,} {r['compile_s']:>9.1f} "
                      f"{r['step_s']:>8.3f} {r['sgd_steps_per_s']:>7.2f} {r['samples_per_s']:>9,.0f} "
                      f"{r['gflops_per_s']:>7.1f} {r.get('xla_peak_mb', float('nan')):>8,.0f} "
                      f"{r['peak_rss_mb']:>8,.0f}", flush=True)
                if not r["finite"]:
                    print(f"  warning: non-finite loss at depth {r['depth']} {r['variant']}")
                figures = {k: r[k] for k in ("sgd_steps_per_s", "samples_per_s", "step_s",
                                             "compile_s", "compile_cpu_s", "step_cpu_s",
                                             "gflops_per_s", "peak_rss_mb",
                                             "xla_peak_mb", "params") if k in r}
                common.record("update_step", f"{r['variant']} depth={r['depth']}",
                              {**spec, "depth": r["depth"], "variant": r["variant"],
                               "env_dims": a.env_dims}, figures, out=a.out, quick=a.quick,
                              extra={k: r[k] for k in ("first_step_s", "steps_timed", "step_s_min",
                                                       "gflop_per_step", "rss_before_compile_mb",
                                                       "xla_temp_mb", "finite", "devices")
                                     if k in r})
        finally:
            common.stop_process(proc, timeout_s=10)
    # Compile time, shallowest vs deepest, side by side in one process (fp32 or the first variant).
    pv = "fp32" if "fp32" in variants else variants[0]
    _energy_side_by_side(min(depths), pv, spec, a)
    pair_depths = [min(depths), max(depths)]
    if pair_depths[0] == pair_depths[1]:
        return _summaries(results, spec, a)
    proc = common.spawn(["-m", "benchmarks.update_step", "--child", json.dumps({"pair": {
        "depths": pair_depths, "variant": pv, "batch": batch, "width": width, "dims": a.env_dims,
        "rounds": 1 if a.quick else 2}})], pipes=True)
    try:
        pair = common.read_json_line(proc, 3600, "compile side by side")
    finally:
        common.stop_process(proc, timeout_s=10)
    med = {k: {d: statistics.median(v) for d, v in pair[k].items()} for k in ("times", "cpu")}
    lo, hi = str(pair_depths[0]), str(pair_depths[1])
    pr = {"compile_ratio_side_by_side": med["times"][hi] / med["times"][lo],
          "compile_cpu_ratio_side_by_side": med["cpu"][hi] / med["cpu"][lo],
          f"compile_s_depth{lo}": med["times"][lo], f"compile_s_depth{hi}": med["times"][hi]}
    print(f"\ncompile side by side ({pv}, alternating, one process): depth {lo} {med['times'][lo]:.1f} s, "
          f"depth {hi} {med['times'][hi]:.1f} s: ratio {pr['compile_ratio_side_by_side']:.2f} wall, "
          f"{pr['compile_cpu_ratio_side_by_side']:.2f} CPU time (target <= 1.5: "
          f"{'met' if pr['compile_ratio_side_by_side'] <= 1.5 else 'MISSED'})", flush=True)
    common.record("update_step", f"{pv} compile side by side",
                  {**spec, "variant": pv, "depths": pair_depths, "env_dims": a.env_dims,
                   "rounds": len(pair["times"][lo])}, pr, out=a.out, quick=a.quick,
                  extra={"compile_s": pair["times"], "compile_cpu_s": pair["cpu"]})
    return _summaries(results, spec, a)


def _energy_side_by_side(depth: int, variant: str, spec: Dict, a) -> None:
    """Exact energy vs the former expansion (and the elementwise form), one child, alternating."""
    proc = common.spawn(["-m", "benchmarks.update_step", "--child", json.dumps({"energy": {
        "depth": depth, "variant": variant, "batch": spec["batch"], "width": spec["width"],
        "dims": a.env_dims, "rounds": 3 if a.quick else 15}})], pipes=True)
    try:
        r = common.read_json_line(proc, 3600, "energy side by side")
    finally:
        common.stop_process(proc, timeout_s=10)
    e = {n: statistics.median(v) for n, v in r["energy_s"].items()}
    st = {n: statistics.median(v) for n, v in r["step_s"].items()}
    f = {"energy_ratio_exact_old": e["exact"] / e["old"],
         "energy_ratio_elementwise_exact": e["elementwise"] / e["exact"],
         "step_ratio_exact_old": st["exact"] / st["old"],
         "energy_exact_ms": 1e3 * e["exact"], "energy_old_ms": 1e3 * e["old"],
         "energy_elementwise_ms": 1e3 * e["elementwise"],
         "step_exact_s": st["exact"], "step_old_s": st["old"]}
    print(f"\nenergy side by side ({variant}, batch {spec['batch']}, one process, alternating): "
          f"logits loss + grad: former expansion {f['energy_old_ms']:.2f} ms, exact "
          f"{f['energy_exact_ms']:.2f} ms (ratio {f['energy_ratio_exact_old']:.2f}), elementwise "
          f"[B, B, D] {f['energy_elementwise_ms']:.1f} ms ({f['energy_ratio_elementwise_exact']:.1f}x "
          f"exact); sgd_step at depth {depth}: {st['old']:.3f} s -> {st['exact']:.3f} s "
          f"(ratio {f['step_ratio_exact_old']:.3f})", flush=True)
    common.record("update_step", f"{variant} energy side by side",
                  {**spec, "variant": variant, "depth": depth, "env_dims": a.env_dims,
                   "rounds": len(r["step_s"]["old"])}, f, out=a.out, quick=a.quick,
                  extra={"energy_s": r["energy_s"], "step_s": r["step_s"]})


def _summaries(results: Dict[str, List[Dict]], spec: Dict, a) -> int:
    print()
    for variant, rows in results.items():
        rows.sort(key=lambda r: r["depth"])
        if len(rows) < 2:
            continue
        xs = [r["depth"] for r in rows]
        sc = scaling_figures(rows)
        figures = dict(sc)
        print(f"{variant:>11}: step time = {sc['intercept_ms']:.0f} ms + {sc['slope_ms_per_layer']:.1f} "
              f"ms x depth (CPU time: {sc['slope_cpu_ms_per_layer']:.1f} ms x depth); compile "
              f"ratio depth {xs[-1]} / {xs[0]} = {sc['compile_ratio']:.2f} wall, "
              f"{sc['compile_cpu_ratio']:.2f} CPU time (target <= 1.5: "
              f"{'met' if sc['compile_ratio'] <= 1.5 else 'MISSED'} / "
              f"{'met' if sc['compile_cpu_ratio'] <= 1.5 else 'MISSED'}); linearity (per-layer "
              f"time at {xs[-1]} / at {xs[-2]}) = {sc['linearity']:.2f} wall, "
              f"{sc['linearity_cpu']:.2f} CPU time")
        compile_ratio = sc["compile_ratio"]
        common.record("update_step", f"{variant} depth scaling",
                      {**spec, "variant": variant, "depths": xs, "env_dims": a.env_dims}, figures,
                      out=a.out, quick=a.quick,
                      extra={"target_compile_ratio": 1.5,
                             "compile_target_met": compile_ratio <= 1.5,
                             "compile_target_met_cpu_time": sc["compile_cpu_ratio"] <= 1.5})
    return 0


if __name__ == "__main__":
    sys.exit(main())
