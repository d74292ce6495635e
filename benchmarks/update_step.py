"""Benchmark: compile time and speed of one CRL SGD step against depth.

    uv run --frozen python benchmarks/update_step.py [--depths 4 64 256] [--batch 512] [--width 256]

Prints a table and appends one JSON line per depth (machine, versions, config, figures) to
results/benchmarks.jsonl. Depth applies to actor and critic. With the scanned residual blocks the
compile time should stay roughly flat in depth while the step time grows linearly.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from crl import config as C  # noqa: E402
from crl.learning import make_learner  # noqa: E402
from crl.networks import param_count  # noqa: E402


def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()]}


def bench(depth: int, batch: int, width: int, steps: int, remat: bool, dtype: str) -> dict:
    overrides = {"algo.batch_size": batch, "learner.minibatches_per_call": 1,
                 "learner.segments_per_call": max(batch // 100 + 1, 1),
                 "replay.min_size_steps": 100_000, "replay.capacity_steps": 1_000_000}
    for net in ("actor", "critic"):
        overrides.update({f"network.{net}.depth": depth, f"network.{net}.width": width,
                          f"network.{net}.remat": remat, f"network.{net}.dtype": dtype})
    cfg = C.load(overrides=overrides)
    S, A, G = 29, 8, 2     # ant-sized observations
    learner = make_learner(cfg, S, A, (0, 1))
    ts = learner.init(jax.random.PRNGKey(0))
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    mb = {"state": jax.random.normal(k[0], (batch, S)),
          "action": jnp.tanh(jax.random.normal(k[1], (batch, A))),
          "goal": jax.random.normal(k[2], (batch, G))}
    t0 = time.perf_counter()
    compiled = learner.sgd_step.lower(ts, mb).compile()
    compile_s = time.perf_counter() - t0
    ts, m = compiled(ts, mb)
    jax.block_until_ready(ts)
    t0 = time.perf_counter()
    for _ in range(steps):
        ts, m = compiled(ts, mb)
    jax.block_until_ready(ts)
    step_s = (time.perf_counter() - t0) / steps
    return {"benchmark": "update_step", "depth": depth, "width": width, "batch": batch,
            "remat": remat, "dtype": dtype,
            "params": param_count(ts.actor_params) + param_count(ts.critic_params),
            "compile_s": round(compile_s, 3), "step_s": round(step_s, 4),
            "sgd_steps_per_s": round(1 / step_s, 2), "samples_per_s": round(batch / step_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "finite": bool(jnp.isfinite(m["critic_loss"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 64, 256])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="results/benchmarks.jsonl")
    a = p.parse_args(argv)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    info = machine()
    print(f"{'depth':>6} {'params':>12} {'compile s':>10} {'step s':>8} {'SGD/s':>7} {'samples/s':>10}")
    rows = []
    for depth in a.depths:
        r = bench(depth, a.batch, a.width, a.steps, a.remat, a.dtype)
        rows.append(r)
        print(f"{depth:>6} {r['params']:>12,} {r['compile_s']:>10.1f} {r['step_s']:>8.3f} "
              f"{r['sgd_steps_per_s']:>7.2f} {r['samples_per_s']:>10.0f}", flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps({**r, "machine": info, "unix_s": time.time()}) + "\n")
    if len(rows) > 1:
        print(f"compile-time ratio depth {rows[-1]['depth']} / depth {rows[0]['depth']}: "
              f"{rows[-1]['compile_s'] / rows[0]['compile_s']:.2f}; step-time ratio: "
              f"{rows[-1]['step_s'] / rows[0]['step_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
