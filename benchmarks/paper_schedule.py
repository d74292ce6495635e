"""A paper preset scaled to this machine, run with `crl local`, measured from replay's counters.

    python -m benchmarks.paper_schedule [--preset presets/paper/ant_u4_maze.yaml] [--minutes 6]

The preset's schedule shrunk to one machine (issue 11, item 3): 2 actors x 32 envs, 1,000-step
windows, 62-step unrolls (the policy refreshed every 62 env steps), batch 512, depth 4, the
paper's UTD (800 / 31,744) with 16 windows x 25 minibatches per learner call (samples per insert
1, as the paper's 512 x 800), prefill one window per env. Every 10 s it reads Reverb's own
insert and sample counters (rate_limiter_info: exact, both at one instant) and the learner's SGD
steps; it prints the UTD of every minute after the first SGD step and of the whole run (SGD
steps / (new env steps = inserts x 62)), env and SGD steps per second, and the policy lag in SGD
steps per refresh; at the end the learner's own final figures (learner_final.json). A result
line goes to --out (results/benchmarks.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common
from crl import metrics as M

SCALED = {"actor.num_actors": 2, "env.num_envs": 32, "actor.unroll_length": 62,
          "network.actor.depth": 4, "network.critic.depth": 4,
          "learner.segments_per_call": 16, "learner.minibatches_per_call": 25,
          "replay.min_size_steps": 64 * 62, "replay.capacity_steps": 64 * 10_000,
          "learner.num_devices": 1, "eval.num_envs": 8, "eval.num_evals": 0,
          "eval.interval_s": 60, "learner.checkpoint_every": 50}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="presets/paper/ant_u4_maze.yaml")
    p.add_argument("--minutes", type=float, default=6.0, help="training time after the first SGD step")
    common.add_common_args(p)
    a = p.parse_args(argv)
    common.header("paper schedule scaled to this machine")
    from crl import config as C
    from replay import TABLE
    work = common.workdir("crl-bench-paper")
    base = common.free_port_block(12)
    over = dict(SCALED, **{"run.run_dir": os.path.join(work, "run"),
                           "service.replay_address": f"127.0.0.1:{base}",
                           "service.params_address": f"127.0.0.1:{base + 1}",
                           "service.metrics_port": base + 2,
                           "learner.total_env_steps": 10**9})
    cfg = C.load(a.preset, over)
    U = cfg.unroll_length
    args = [sys.executable, "-m", "app.cli", "local", "--config", a.preset,
            *[f"--{k}={v}" for k, v in over.items()]]
    log = open(os.path.join(work, "local.out"), "w")
    proc = subprocess.Popen(args, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=common.child_env())
    import reverb
    client = reverb.Client(cfg.service.replay_address)
    learner_url = f"http://127.0.0.1:{base + 3}/metrics"
    points = []   # (t, sgd steps, inserts, samples)
    t_first = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(10.0)
            m = M.scrape(learner_url, 2.0)
            try:
                info = client.server_info(5)[TABLE].rate_limiter_info
            except Exception:   # replay still starting
                continue
            sgd = m.get("crl_learner_sgd_steps_total", 0.0)
            points.append((time.monotonic(), sgd, int(info.insert_stats.completed),
                           int(info.sample_stats.completed)))
            if sgd > 0 and t_first is None:
                t_first = time.monotonic()
                deadline = t_first + a.minutes * 60 + 5
                print(f"first SGD steps after {len(points) * 10} s; measuring {a.minutes} min",
                      flush=True)
            elif t_first is not None:
                t, s, i, _ = points[-1]
                print(f"  {t - t_first:5.0f}s  sgd={s:,.0f}  env={i * U:,}  "
                      f"utd so far={s / max(1, (i - points[0][2]) * U):.5f}", flush=True)
    finally:
        common.stop_process(proc, timeout_s=240)
        log.close()
    if t_first is None:
        print(open(os.path.join(work, "local.out")).read()[-3000:])
        return 1
    train = [pt for pt in points if pt[0] >= t_first]
    target = cfg.replay.utd
    minutes = []
    for k in range(int((train[-1][0] - train[0][0]) // 60)):
        w = [pt for pt in train if train[0][0] + 60 * k <= pt[0] <= train[0][0] + 60 * (k + 1) + 1]
        (t0, s0, i0, _), (t1, s1, i1, _) = w[0], w[-1]
        minutes.append((s1 - s0) / max(1, (i1 - i0) * U))
    (t0, s0, i0, _), (t1, s1, i1, _) = train[0], train[-1]
    run_utd = (s1 - s0) / max(1, (i1 - i0) * U)
    env_rate, sgd_rate = (i1 - i0) * U / (t1 - t0), (s1 - s0) / (t1 - t0)
    envs = cfg.env.num_envs * cfg.actor.num_actors
    lag = target * envs * U
    final_path = os.path.join(over["run.run_dir"], "learner_final.json")
    final = json.load(open(final_path)) if os.path.exists(final_path) else {}
    print(f"UTD per minute / target: {[round(u / target, 3) for u in minutes]}")
    print(f"UTD over the run: {run_utd:.5f} ({run_utd / target:.3f} of {target:.5f}); "
          f"{env_rate:,.0f} env steps/s, {sgd_rate:.1f} SGD steps/s; policy lag "
          f"{lag:.0f} SGD steps per refresh (every {U} env steps); learner_final: "
          f"utd={final.get('utd')}")
    common.record("paper_schedule", f"{cfg.env.name} scaled", {**over, "preset": a.preset},
                  {"env_steps_per_s": env_rate, "sgd_steps_per_s": sgd_rate,
                   "utd_over_target": run_utd / target, "policy_lag_sgd_steps": lag,
                   "worst_minute_over_target": max(minutes, key=lambda u: abs(u / target - 1))
                   / target if minutes else None},
                  out=a.out, quick=a.quick,
                  extra={"utd_per_minute_over_target": [u / target for u in minutes],
                         "learner_final": final})
    common.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
