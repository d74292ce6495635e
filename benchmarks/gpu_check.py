"""GPU check: what a GPU machine does with this learner, in one command.

    uv run --frozen --extra cuda python -m benchmarks.gpu_check [--local-minutes 10]
    uv run --frozen python -m benchmarks.gpu_check --tiny --out /tmp/gpu_check.jsonl   # CPU, ~2 min

1. Update step (`Learner.sgd_step`, the real losses, one minibatch) at depth 4 / 64 / 256 (actor
   and critic), variants fp32, bf16, fp32+remat: SGD steps/s, compile s, peak memory (XLA's
   memory analysis of the compiled step, and the device's peak bytes in use where the backend
   reports it) and achieved TFLOP/s against the card's peak (PEAK_TFLOPS: dense tensor-core
   peak, TF32 for fp32 since JAX runs float32 matmuls in TF32 on these cards by default, BF16 for
   bf16; unknown cards: not reported). FLOPs: XLA's cost analysis counts a loop body ONCE, not
   once per trip, so for the scanned residual blocks it is only right at depth 4 (one block, no
   loop); the rate uses the analytic matmul count (benchmarks.update_step.sgd_step_flops) and
   the depth-4 line prints XLA's count beside it as a cross-check.
2. pmap == single device: one SGD step of the pmap'ed update over 2 devices equals the
   single-device step (params after the step, metrics) within float32 reduction-order noise. On
   a machine with fewer than 2 devices it runs in a CPU child with 2 forced host devices.
3. Critic distance precision on this hardware: crl.networks.pairwise_energy (jitted, float32, on
   the default device) against an elementwise float64 reference, representations of norm 10 and
   30, positives 0.01 apart, duplicated goals (negatives as close as the positive).
4. Optional (--local-minutes N): `crl local` on ant with the paper's schedule scaled to one
   machine (1 actor process) for N minutes; env steps/s, SGD steps/s and UTD from the roles'
   /metrics (as app/launcher.py scrapes them), over the window after training starts.

Each figure is printed and recorded with benchmarks.common.record (results/benchmarks.jsonl by
default; --out elsewhere). Exit status 1 if the pmap or precision check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, Optional

# Dense tensor-core peak TFLOP/s per card: (TF32, BF16). Matched on jax's device_kind.
PEAK_TFLOPS = {
    "H200": (494.7, 989.4),
    "H100 PCIe": (378.0, 756.0),
    "H100": (494.7, 989.4),          # SXM / HBM3
    "A100": (156.0, 312.0),
}
VARIANTS = {"fp32": (False, "float32"), "bf16": (False, "bfloat16"), "fp32+remat": (True, "float32")}
S, A, GOAL = 29, 8, (0, 1)           # ant sizes


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    for name, (tf32, bf16) in PEAK_TFLOPS.items():   # most specific names first
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else tf32
    return None


def _cfg(depth: int, width: int, batch: int, remat: bool, dtype: str, devices: int = 1):
    from crl import config as C
    o = {"env.name": "ant", "algo.batch_size": batch, "learner.minibatches_per_call": 1,
         "learner.segments_per_call": max(batch // 100 + 1, 1), "learner.num_devices": devices,
         "replay.min_size_steps": 100_000, "replay.capacity_steps": 1_000_000}
    for net in ("actor", "critic"):
        o.update({f"network.{net}.depth": depth, f"network.{net}.width": width,
                  f"network.{net}.remat": remat, f"network.{net}.dtype": dtype})
    return C.load(overrides=o)


def _minibatch(batch: int, seed: int = 1):
    import jax
    import jax.numpy as jnp
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"state": jax.random.normal(k[0], (batch, S)),
            "action": jnp.tanh(jax.random.normal(k[1], (batch, A))),
            "goal": jax.random.normal(k[2], (batch, len(GOAL)))}


def update_case(depth: int, variant: str, width: int, batch: int, min_time: float) -> Dict:
    import jax
    from benchmarks.update_step import sgd_step_flops
    from crl.learning import make_learner
    remat, dtype = VARIANTS[variant]
    learner = make_learner(_cfg(depth, width, batch, remat, dtype), S, A, GOAL)
    ts = jax.block_until_ready(learner.init(jax.random.PRNGKey(0)))
    mb = _minibatch(batch)
    t0 = time.perf_counter()
    compiled = learner.sgd_step.lower(ts, mb).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) if mem is not None else float("nan")
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    ts, m = compiled(ts, mb)                    # warm-up
    jax.block_until_ready(m)
    n, t0 = 0, time.perf_counter()
    while True:
        ts, m = compiled(ts, mb)
        n += 1
        if n >= 3 and time.perf_counter() - t0 >= min_time:
            jax.block_until_ready(m)
            el = time.perf_counter() - t0
            if el >= min_time:
                break
    finite = bool(all(math.isfinite(float(v)) for v in m.values()))
    flops = sgd_step_flops(batch, width, depth, 64, S, A, len(GOAL), remat)
    dev = jax.devices()[0]
    stats = {}
    try:
        stats = dev.memory_stats() or {}
    except Exception:   # noqa: BLE001 - CPU backends may not report
        pass
    peak = peak_tflops(dev.device_kind, dtype) if dev.platform == "gpu" else None
    r = {"depth": depth, "variant": variant, "compile_s": compile_s, "sgd_steps_per_s": n / el,
         "step_ms": 1e3 * el / n, "xla_peak_mib": xla_peak / 2**20,
         "device_peak_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20,
         "analytic_gflop_per_step": flops / 1e9,
         "xla_gflop_per_step": cost.get("flops", float("nan")) / 1e9,
         "achieved_tflops": flops * n / el / 1e12, "finite": finite,
         "device": f"{dev.platform}:{dev.device_kind}"}
    if peak:
        r["peak_tflops"] = peak
        r["fraction_of_peak"] = r["achieved_tflops"] / peak
    return r


def pmap_check(width: int, batch: int, depth: int) -> Dict:
    """One pmap'ed SGD step over 2 devices vs the single-device step (same state, same batch)."""
    import jax
    import numpy as np
    from crl.learning import make_learner, replicate, unreplicate
    if jax.local_device_count() < 2:
        return _pmap_in_cpu_child(width, batch, depth)
    learner = make_learner(_cfg(depth, width, batch, False, "float32", 2), S, A, GOAL, num_devices=2)
    ts = learner.init(jax.random.PRNGKey(0))
    b = _minibatch(batch, seed=3)
    single, m1 = learner.sgd_step(ts, b)
    sharded = jax.tree_util.tree_map(lambda x: x.reshape((2, batch // 2) + x.shape[1:]), b)
    multi, m2 = learner.sgd_step_pmap(replicate(ts, 2), sharded)
    multi, m2 = unreplicate(multi), unreplicate(m2)
    worst = 0.0       # max |a - b| / (atol / rtol + |b|): <= rtol passes assert_allclose
    rtol, atol = 2e-4, 1e-5
    for x, y in zip(jax.tree_util.tree_leaves((single, m1)), jax.tree_util.tree_leaves((multi, m2))):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y) / (atol / rtol + np.abs(y)))))
    return {"pmap_equals_single": worst <= rtol, "pmap_max_rel_diff": worst,
            "pmap_devices": f"{jax.devices()[0].platform} x2", "pmap_rtol": rtol}


def _pmap_in_cpu_child(width: int, batch: int, depth: int) -> Dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--pmap-child",
                          json.dumps([width, batch, depth])], env=env, capture_output=True,
                         text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"pmap child failed ({out.returncode}): {out.stderr[-2000:]}")
    r = json.loads(lines[-1])
    r["pmap_devices"] += " (CPU child: fewer than 2 devices here)"
    return r


def precision_check() -> Dict:
    """pairwise_energy on this device vs elementwise float64, close pairs at norm 10 and 30."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from crl.networks import pairwise_energy
    out: Dict[str, Any] = {}
    f = jax.jit(pairwise_energy)
    for norm in (10.0, 30.0):
        for dup in (False, True):
            k1, k2 = jax.random.split(jax.random.PRNGKey(int(norm) + dup))
            u, e = jax.random.normal(k1, (256, 64)), jax.random.normal(k2, (256, 64))
            if dup:
                u = u.at[1::2].set(u[0::2])
            x = norm * u / jnp.linalg.norm(u, axis=1, keepdims=True)
            y = x + 0.01 * e / jnp.linalg.norm(e, axis=1, keepdims=True)
            if dup:
                y = y.at[1::2].set(y[0::2])
            x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
            ref = -np.sqrt(np.sum((x64[:, None] - y64[None]) ** 2, -1))
            got = np.asarray(f(x, y), np.float64)
            rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
            name = f"norm{int(norm)}{'_dup' if dup else ''}"
            out[f"{name}_pos_rel_err"] = float(np.max(np.diag(rel)))
            out[f"{name}_max_rel_err"] = float(np.max(rel))
    out["precision_ok"] = all(v < 1e-3 for k, v in out.items() if k.endswith("rel_err"))
    out["precision_device"] = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    return out


def local_run(minutes: float, tiny: bool, workdir: str) -> Dict:
    """`crl local` on ant, the paper's schedule on one machine, for `minutes`; rates from /metrics."""
    from benchmarks import common
    from crl import metrics as Mx
    base = common.free_port_block(8)
    size = (["--env.num_envs", "8", "--env.episode_length", "200",
             "--replay.segment_length", "200", "--replay.min_size_steps", "1600", "--learner.segments_per_call", "8",
             "--learner.minibatches_per_call", "4", "--algo.batch_size", "128",
             "--network.actor.width", "32", "--network.critic.width", "32",
             "--network.actor.depth", "4", "--network.critic.depth", "4", "--eval.num_envs", "8"]
            if tiny else ["--env.num_envs", "512", "--eval.num_envs", "128"])
    args = ["-m", "app.cli", "local", "--config", "presets/paper/ant_big_maze.yaml",
            "--env.name", "ant", "--eval.goal_set", "train", "--actors", "1",
            "--run.run_dir", os.path.join(workdir, "run"),
            "--learner.total_env_steps", str(10**12), *size,
            "--service.replay_address", f"127.0.0.1:{base}",
            "--service.params_address", f"127.0.0.1:{base + 1}",
            "--service.metrics_port", str(base + 2)]
    proc = common.spawn(args, os.path.join(workdir, "local.log"))
    urls = {"learner": f"http://127.0.0.1:{base + 3}/metrics",
            "actor0": f"http://127.0.0.1:{base + 5}/metrics"}
    samples = []
    t_end = time.monotonic() + 60 * minutes
    try:
        while time.monotonic() < t_end and proc.poll() is None:
            time.sleep(5)
            try:
                m = {k: Mx.scrape(u) for k, u in urls.items()}
            except Exception:   # noqa: BLE001 - roles still starting
                continue
            samples.append((time.monotonic(), m["actor0"].get("crl_actor_env_steps_total", 0.0),
                            m["learner"].get("crl_learner_sgd_steps_total", 0.0),
                            m["learner"].get("crl_learner_utd", float("nan"))))
    finally:
        common.stop_process(proc, timeout_s=60)
    train = [s for s in samples if s[2] > 0]
    if len(train) < 2:
        return {"local_ok": False, "local_log": os.path.join(workdir, "local.log")}
    (t0, e0, g0, _), (t1, e1, g1, utd) = train[0], train[-1]
    return {"local_ok": True, "env_steps_per_s": (e1 - e0) / (t1 - t0),
            "sgd_steps_per_s": (g1 - g0) / (t1 - t0), "utd": utd, "window_s": t1 - t0}


def main(argv=None) -> int:
    from benchmarks import common
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU-sized run of every check (CI; figures not meaningful)")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per case")
    p.add_argument("--local-minutes", type=float, default=0.0,
                   help="also run `crl local` on ant for this many minutes (default 0: skip)")
    p.add_argument("--pmap-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=common.DEFAULT_OUT,
                   help=f"results file (default: {common.DEFAULT_OUT})")
    a = p.parse_args(argv)
    if a.pmap_child:
        print(json.dumps(pmap_check(*json.loads(a.pmap_child))), flush=True)
        return 0
    import jax
    depths = a.depths or ([4, 8] if a.tiny else [4, 64, 256])
    width, batch = (32, 64) if a.tiny else (256, 512)
    min_time = a.min_time if a.min_time is not None else (0.2 if a.tiny else 5.0)
    dev = jax.devices()[0]
    common.header(f"GPU check on {dev.platform}:{dev.device_kind} x{jax.local_device_count()}"
                  f"{' (tiny)' if a.tiny else ''}: batch {batch}, width {width}")
    spec = {"batch": batch, "width": width, "env_dims": "ant", "tiny": a.tiny}
    ok = True

    print(f"{'variant':>10} {'depth':>5} {'compile s':>9} {'SGD/s':>8} {'XLA MiB':>8} "
          f"{'dev MiB':>8} {'TFLOP/s':>8} {'of peak':>8}", flush=True)
    cases = [(d, v) for d in depths for v in a.variants]
    if a.tiny and not a.depths:   # every variant at depth 4, fp32 deeper: compiles dominate
        cases = [c for c in cases if c[0] == depths[0] or c[1] == "fp32"]
    for depth, v in cases:
        r = update_case(depth, v, width, batch, min_time)
        frac = f"{100 * r['fraction_of_peak']:.1f}%" if "fraction_of_peak" in r else "n/a"
        print(f"{v:>10} {depth:>5} {r['compile_s']:>9.1f} {r['sgd_steps_per_s']:>8.1f} "
              f"{r['xla_peak_mib']:>8.0f} {r['device_peak_mib']:>8.0f} "
              f"{r['achieved_tflops']:>8.3f} {frac:>8}", flush=True)
        if depth == 4:
            print(f"{'':>10} depth 4 FLOPs per step: analytic {r['analytic_gflop_per_step']:.3f} "
                  f"GFLOP, XLA cost analysis {r['xla_gflop_per_step']:.3f} GFLOP", flush=True)
        figures = {k: r[k] for k in ("compile_s", "sgd_steps_per_s", "step_ms", "xla_peak_mib",
                                     "device_peak_mib", "achieved_tflops", "peak_tflops",
                                     "fraction_of_peak", "analytic_gflop_per_step",
                                     "xla_gflop_per_step") if k in r}
        common.record("gpu_check", f"update {v} depth={depth}",
                      {**spec, "depth": depth, "variant": v}, figures, out=a.out,
                      quick=a.tiny, extra={"finite": r["finite"], "device": r["device"]})

    pm = pmap_check(width, batch, depths[0])
    ok &= pm["pmap_equals_single"]
    print(f"pmap == single device ({pm['pmap_devices']}): "
          f"{'PASS' if pm['pmap_equals_single'] else 'FAIL'} (max relative difference "
          f"{pm['pmap_max_rel_diff']:.2e}, tolerance {pm['pmap_rtol']:g})", flush=True)
    common.record("gpu_check", "pmap equals single", {**spec, "depth": depths[0]},
                  {"pmap_max_rel_diff": pm["pmap_max_rel_diff"]}, out=a.out, quick=a.tiny,
                  extra={"pmap_equals_single": pm["pmap_equals_single"],
                         "devices": pm["pmap_devices"]})

    pr = precision_check()
    ok &= pr["precision_ok"]
    print(f"distance precision ({pr['precision_device']}): "
          f"{'PASS' if pr['precision_ok'] else 'FAIL'}; " + ", ".join(
              f"{k[:-8]} {v:.1e}" for k, v in pr.items() if k.endswith("_rel_err")), flush=True)
    common.record("gpu_check", "distance precision", spec,
                  {k: v for k, v in pr.items() if k.endswith("_rel_err")}, out=a.out,
                  quick=a.tiny, extra={"precision_ok": pr["precision_ok"],
                                       "device": pr["precision_device"]})

    if a.local_minutes > 0:
        lr = local_run(a.local_minutes, a.tiny, common.workdir("gpu-check"))
        if lr["local_ok"]:
            print(f"crl local (ant, 1 actor, {a.local_minutes:g} min): env steps/s "
                  f"{lr['env_steps_per_s']:,.0f}, SGD steps/s {lr['sgd_steps_per_s']:.1f}, "
                  f"UTD {lr['utd']:.4f} over {lr['window_s']:.0f} s of training", flush=True)
            common.record("gpu_check", "crl local ant", {**spec, "minutes": a.local_minutes},
                          {k: lr[k] for k in ("env_steps_per_s", "sgd_steps_per_s", "utd",
                                              "window_s")}, out=a.out, quick=a.tiny)
            common.cleanup()
        else:
            ok = False
            tail = open(lr["local_log"], errors="replace").read()[-1500:]
            print(f"crl local: no training within {a.local_minutes:g} min (log: "
                  f"{lr['local_log']}):\n{tail}", flush=True)
    print(f"gpu_check: {'all checks passed' if ok else 'a check FAILED'}; results -> {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    if "--tiny" in sys.argv and "XLA_FLAGS" not in os.environ:   # 2 host devices for pmap
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
