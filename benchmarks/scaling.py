"""Cluster scaling model from measured per-component figures (docs/scaling.md explains it).

    python -m benchmarks.scaling [--run latest | RUN_ID] [--file results/benchmarks.jsonl]
        [--markdown] [--depths 4 16 64 256 1024] [--pod-cores 16] [--refresh-s 1.0]

For the paper's setting (humanoid, batch 512, width 256, critic depth d, actor depth min(d, 512),
UTD = 800 SGD steps per 31,744 env steps) it prints, per depth: the learner's SGD rate on one
GPU, the env steps/s that rate consumes, how many actor pods produce them, the network bandwidth
of trajectories (actors -> replay), samples (replay -> learner) and params (learner -> actors),
and the learner's and replay's memory. Every column says where its number comes from:

  M  measured in this run (on the machine of the run: CPU here, GPU if run on one)
  F  fitted to measured points (linear in depth) and evaluated at a depth not measured
  P  projected: a measured figure combined with a stated assumption (see ASSUMPTIONS)

On a GPU machine, `python -m benchmarks.run_all` followed by this command prints the same table
with the update step measured on the GPU (the GPU projection is then replaced by M/F figures).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, Sequence

from benchmarks import common
from benchmarks.update_step import ENV_DIMS, linear_fit, sgd_step_flops

S, A, GOAL = ENV_DIMS["humanoid"]
G = len(GOAL)
WIDTH, BATCH, REPR = 256, 512, 64
UTD = 800 / 31_744                 # the paper's schedule: 800 minibatches per 512 envs x 62 steps
BYTES_PER_STEP = 4 * (S + A + 3)   # one stored env step: state, action, episode id, trunc., version
ASSUMPTIONS = {
    # The paper: Humanoid U-Maze at depth 1024 (actor 512) took 134 h for 400M env steps on one
    # 80 GB GPU. Counting all of it as SGD gives the sustained FLOP rate of its update; the env
    # time it also contains makes this rate (and the projected learner speed) a lower bound.
    "paper_d1024_hours": 134.0, "paper_d1024_env_steps": 400e6,
    # Humanoid depth 4: 1.5 h for 100M env steps; minus the projected SGD time, the rest is env
    # stepping on the same GPU: the env rate of one GPU actor pod (512 envs).
    "paper_d4_hours": 1.5, "paper_d4_env_steps": 100e6,
    "gpu_step_overhead_ms": 0.5,      # per SGD step, launch/optimizer/relabel (assumed)
    "replay_steps": 512 * 10_000,     # replay capacity of the paper: 10,000 steps x 512 envs
    # Sampling: a learner call fetches segments_per_call x T steps for minibatches x batch used.
    "fetch_default": (32 * 1000) / (8 * BATCH),     # config defaults with T = 1000: 7.8x
    "fetch_matched": 1.25,                          # 32 x 1000 fetched for 50 x 512 used
}


def _rows(rows, bench, pred=lambda r: True):
    return [r for r in rows if r["benchmark"] == bench and pred(r)]


def _fig(r, k, default=float("nan")):
    return r["figures"].get(k, default) if r else default


def _on_gpu(r) -> bool:
    devs = r["extra"].get("devices") or r["machine"].get("devices", [])
    return any(("gpu" in d.lower() or "cuda" in d.lower()) for d in devs)


def params_of(depth: int) -> Dict[str, int]:
    from crl import config as C
    from crl.networks import count_params
    cfg = C.NetworksConfig(actor=C.NetworkConfig(depth=min(depth, 512), width=WIDTH),
                           critic=C.NetworkConfig(depth=depth, width=WIDTH), repr_dim=REPR)
    return count_params(cfg, S, A, G)


class Fit:
    """Measured values by depth, linear fit elsewhere; tags M or F."""

    def __init__(self, points: Dict[int, float]):
        self.points = {d: v for d, v in points.items() if v is not None and math.isfinite(v)}
        xs = sorted(self.points)
        # Fit on the deepest points (the intercept region at depth 4 is not linear).
        use = xs[-3:] if len(xs) >= 3 else xs
        self.slope, self.icpt = (linear_fit(use, [self.points[x] for x in use])
                                 if len(use) >= 2 else (float("nan"), float("nan")))

    def __call__(self, depth: int, effective: float = None):
        """Value at `depth` (measured if there), else the fit at `effective` (default depth)."""
        if depth in self.points and effective in (None, depth):
            return self.points[depth], "M"
        return self.icpt + self.slope * (depth if effective is None else effective), "F"


def model(rows: Sequence[Dict], depths: Sequence[int], pod_cores: int, refresh_s: float) -> Dict:
    us = _rows(rows, "update_step", lambda r: "depth=" in r["case"])
    by = lambda variant, key: {r["config"]["depth"]: _fig(r, key) for r in us  # noqa: E731
                               if r["config"]["variant"] == variant}
    gpu = bool(us) and _on_gpu(us[0])
    step = Fit(by("fp32", "step_s"))
    mem = Fit(by("fp32", "xla_peak_mb"))
    mem_remat = Fit(by("fp32+remat", "xla_peak_mb"))

    a = ASSUMPTIONS
    f1024 = sgd_step_flops(BATCH, WIDTH, 1024, REPR, S, A, G, False, actor_depth=512)
    t1024 = a["paper_d1024_hours"] * 3600 / (a["paper_d1024_env_steps"] * UTD)
    gpu_flops_per_s = f1024 / t1024

    def gpu_step(d):
        if gpu:
            return step(d, (3 * min(d, 512) + 9 * d) / 12)
        f = sgd_step_flops(BATCH, WIDTH, d, REPR, S, A, G, False, actor_depth=min(d, 512))
        return a["gpu_step_overhead_ms"] / 1e3 + f / gpu_flops_per_s, "P"

    t4, _ = gpu_step(4)
    env_s = a["paper_d4_hours"] * 3600 - a["paper_d4_env_steps"] * UTD * t4
    gpu_pod_rate = a["paper_d4_env_steps"] / env_s

    act = {r["case"]: r for r in _rows(rows, "actor")}
    hum = act.get("humanoid (bare only)")
    ant = act.get("ant")
    actor_eff = _fig(ant, "ratio_actor_bare", 1.0) if ant else 1.0
    cores_here = hum["machine"]["cpus_usable"] if hum else 2
    cpu_pod_rate = (_fig(hum, "bare_env_steps_per_s") / cores_here * pod_cores * actor_eff
                    if hum else float("nan"))

    rp = _rows(rows, "replay")
    insert_mb = max([_fig(r, "insert_mb_per_s", 0) for r in rp] or [float("nan")])
    sample_mb = max([_fig(r, "sample_mb_per_s", 0) for r in rp] or [float("nan")])
    memr = next((r for r in rp if r["case"] == "memory"), None)
    overhead = _fig(memr, "overhead_ratio", 1.0) if memr else 1.0
    pr = _rows(rows, "params")
    big = max(pr, key=lambda r: (r["config"]["clients"], r["config"]["params"]), default=None)
    params_mb_s = _fig(big, "mb_per_s")
    params_clients = big["config"]["clients"] if big else 0
    params_payload_mb = big["config"]["payload_mb"] if big else float("nan")
    publish_mb_s = (max(r["config"]["payload_mb"] / _fig(r, "publish_s") for r in pr)
                    if pr else float("nan"))

    out = []
    for d in depths:
        pc = params_of(d)
        t, tag = gpu_step(d)
        sgd = 1 / t
        env_rate = sgd / UTD
        actor_mb = 4 * pc["actor"] / common.MiB
        total_mb = 4 * (pc["actor"] + pc["critic"]) / common.MiB
        gpu_pods = env_rate / gpu_pod_rate
        cpu_pods = env_rate / cpu_pod_rate
        ad = min(d, 512)
        # The fits are over equal actor and critic depths; an actor shallower than the critic is
        # evaluated at the equivalent depth: FLOP weights actor 3, phi 5, psi 4 (sgd_step_flops)
        # for time, one trunk each (actor, phi, psi) for memory.
        d_time, d_mem = (3 * ad + 9 * d) / 12, (ad + 2 * d) / 3
        cpu_step, cpu_tag = step(d, d_time) if not gpu else (float("nan"), "-")
        m, mtag = mem(d, d_mem)
        mr, mrtag = mem_remat(d, d_mem)
        out.append({
            "depth": d, "actor_depth": min(d, 512), "params_m": (pc["actor"] + pc["critic"]) / 1e6,
            "cpu_step_s": (cpu_step, cpu_tag), "gpu_step_ms": (1e3 * t, tag),
            "sgd_per_s": (sgd, tag), "env_per_s": (env_rate, tag),
            "gpu_pods": (gpu_pods, "P"), "cpu_pods": (cpu_pods, "P"),
            "traj_mb_s": (env_rate * BYTES_PER_STEP / common.MiB, tag),
            "sample_mb_s": (sgd * BATCH * BYTES_PER_STEP * a["fetch_default"] / common.MiB, tag),
            "sample_mb_s_matched": (sgd * BATCH * BYTES_PER_STEP * a["fetch_matched"] / common.MiB, tag),
            "actor_mb": actor_mb, "params_egress_mb_s": (math.ceil(gpu_pods) * actor_mb / refresh_s, "P"),
            "publish_s": (total_mb / publish_mb_s, "P"),
            "publish_per_call": (total_mb / publish_mb_s / (8 * t), "P"),
            "replay_load": (sgd * BATCH * BYTES_PER_STEP * a["fetch_default"] / common.MiB / sample_mb,
                            sgd * BATCH * BYTES_PER_STEP * a["fetch_matched"] / common.MiB / sample_mb),
            "learner_gib": (m / 1024, mtag), "learner_remat_gib": (mr / 1024, mrtag),
            "replay_gib": (a["replay_steps"] * BYTES_PER_STEP * overhead / 2**30, "P"),
        })
    return {"rows": out, "gpu": gpu, "gpu_flops_per_s": gpu_flops_per_s,
            "gpu_pod_rate": gpu_pod_rate, "cpu_pod_rate": cpu_pod_rate, "actor_eff": actor_eff,
            "insert_mb_s": insert_mb, "sample_mb_s": sample_mb, "params_mb_s": params_mb_s,
            "publish_mb_s": publish_mb_s, "params_clients": params_clients,
            "params_payload_mb": params_payload_mb, "replay_overhead": overhead, "pod_cores": pod_cores,
            "refresh_s": refresh_s, "step_fit": (step.slope, step.icpt)}


def _v(x, digits=1):
    v, tag = x if isinstance(x, tuple) else (x, "")
    if v is None or not math.isfinite(v):
        return "–"
    s = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.{digits}f}"
    return f"{s} {tag}".strip()


def render(m: Dict, markdown: bool = False) -> str:
    from benchmarks.report import _table
    depth = ("critic/actor depth", lambda r: f"{r['depth']}/{r['actor_depth']}")
    compute = [depth, ("params M", lambda r: f"{r['params_m']:.1f}"),
               ("CPU step s", lambda r: _v(r["cpu_step_s"], 2)),
               ("GPU step ms", lambda r: _v(r["gpu_step_ms"], 2)),
               ("SGD steps/s per GPU", lambda r: _v(r["sgd_per_s"])),
               ("env steps/s consumed", lambda r: _v(r["env_per_s"])),
               ("GPU actor pods", lambda r: _v(r["gpu_pods"], 2)),
               (f"{m['pod_cores']}-core CPU actor pods", lambda r: _v(r["cpu_pods"], 2)),
               ("learner GiB fp32 / remat",
                lambda r: f"{_v(r['learner_gib'], 2)} / {_v(r['learner_remat_gib'], 2)}")]
    network = [depth, ("trajectories in MB/s", lambda r: _v(r["traj_mb_s"])),
               ("samples out MB/s, default fetch", lambda r: _v(r["sample_mb_s"])),
               ("samples out MB/s, matched fetch", lambda r: _v(r["sample_mb_s_matched"])),
               ("actor params MB", lambda r: f"{r['actor_mb']:,.1f}"),
               (f"params egress MB/s ({m['refresh_s']:g} s refresh, GPU pods)",
                lambda r: _v(r["params_egress_mb_s"])),
               ("publish s (actor+critic, one core)", lambda r: _v(r["publish_s"], 2)),
               ("publish / GPU call of 8 steps", lambda r: _v(r["publish_per_call"], 2)),
               ("replay sampling load, default / matched fetch",
                lambda r: f"{r['replay_load'][0]:.2f} / {r['replay_load'][1]:.2f} P"),
               ("replay GiB", lambda r: _v(r["replay_gib"]))]
    h = "### " if markdown else "== "
    t = "" if markdown else " =="
    lines = [h + "Learner and actors" + t, _table(m["rows"], compute, markdown), "",
             h + "Network and memory" + t, _table(m["rows"], network, markdown), ""]
    note = [
        f"learner: {'update step measured on this GPU' if m['gpu'] else 'GPU step projected'}"
        + ("" if m["gpu"] else f" = {ASSUMPTIONS['gpu_step_overhead_ms']} ms + analytic FLOPs / "
           f"{m['gpu_flops_per_s'] / 1e12:.1f} TFLOP/s (the rate implied by the paper's 134 h at "
           "depth 1024, all counted as SGD)")
        + f"; UTD {UTD:.4f} SGD steps per env step (800 per 31,744).",
        f"GPU actor pod (512 humanoid envs on one GPU): {m['gpu_pod_rate']:,.0f} env steps/s, P "
        "(the paper's 1.5 h per 100M steps at depth 4 minus its projected SGD time).",
        f"CPU actor pod: {m['pod_cores']} cores x humanoid bare-unroll rate per core measured here x "
        f"actor-loop efficiency {m['actor_eff']:.2f} (ant, measured) = {m['cpu_pod_rate']:,.0f} "
        "env steps/s, P (assumes linear scaling in cores).",
        f"replay (measured here, one server on 2 shared cores): up to {m['insert_mb_s']:,.0f} MB/s "
        f"inserted, {m['sample_mb_s']:,.0f} MB/s sampled; stored env step = {BYTES_PER_STEP} B "
        f"raw x {m['replay_overhead']:.2f} server overhead (measured); capacity "
        f"{ASSUMPTIONS['replay_steps']:,} env steps (the paper's 10,000 per env x 512 envs).",
        f"params (measured here): {m['params_mb_s']:,.0f} MB/s in total from one ParameterService "
        f"to {m['params_clients']} clients ({m['params_payload_mb']:,.0f} MB payload) on loopback; "
        f"publish (serialise + sha256) {m['publish_mb_s']:,.0f} MB/s.",
        "samples: a learner call fetches segments_per_call x T steps for minibatches x batch used; "
        f"default config (32 x 1000 for 8 x 512): {ASSUMPTIONS['fetch_default']:.1f}x; matched "
        f"(32 x 1000 for 50 x 512): {ASSUMPTIONS['fetch_matched']:.2f}x.",
    ]
    lines += [("- " if markdown else "  ") + n for n in note]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="latest",
                   help="run id, or 'latest' (default): the newest run with update-step lines")
    p.add_argument("--file", default=common.DEFAULT_OUT)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64, 256, 1024])
    p.add_argument("--pod-cores", type=int, default=16)
    p.add_argument("--refresh-s", type=float, default=1.0, help="actor params refresh period")
    a = p.parse_args(argv)
    rows = common.load_results(a.file, a.run, require="update_step")
    if not rows:
        print(f"no results in {a.file}; run `python -m benchmarks.run_all` first")
        return 1
    print(f"scaling model from run {rows[0]['run_id']}"
          f"{' (QUICK run: figures not meaningful)' if rows[0]['quick'] else ''}\n")
    print(render(model(rows, a.depths, a.pod_cores, a.refresh_s), markdown=a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
