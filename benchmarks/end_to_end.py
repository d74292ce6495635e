"""Benchmark: `crl local` (every role its own process) vs the in-process driver (`crl train`) on
the same config, at the same update-to-data ratio.

    python -m benchmarks.end_to_end [--env point_maze_u] [--actors 2] [--width 64]
        [--window 60] [--driver-steps 120000] [--no-sandwich] [--quick]

Order: driver, crl local, driver again (the ratio uses the mean of the two driver runs, so a
drift of the machine's load shows). Rates are steady-state:
  - driver: `crl train --num-evals 10`; env steps and SGD steps per second between the
    evaluation rows of history.jsonl from 30% of the budget to the end (compile excluded).
  - crl local: this benchmark scrapes every role's /metrics every 2 s; the window starts 10 s
    after the learner has taken its first SGD step and every actor has written, and lasts
    --window seconds; then the launcher is stopped (SIGINT, by PID).
Where the time goes (crl local, over the window): the learner loop's wall-time fractions waiting
for a sample (crl_learner_wait_seconds_total) and dispatching / waiting for the update
(crl_learner_compute_seconds_total), the rest being host-side checks, checkpoints and polling;
the publisher thread's busy fraction (crl_learner_publish_duration_seconds: off the update loop); each actor's fractions in the jitted unroll
(crl_actor_unroll_duration_seconds) and writing (crl_actor_write_duration_seconds: includes waiting for the rate
limiter); the replay table's rate-limiter waits; and the CPU seconds each role's process used
(from /proc), which on 2 cores is the budget they share.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Dict

from benchmarks import common


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _children_roles(pid: int) -> Dict[str, int]:
    """{role name: pid} of the launcher's children, from their command lines."""
    out = {}
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return out
    for k in kids:
        try:
            argv = open(f"/proc/{k}/cmdline").read().split("\0")
        except OSError:
            continue
        if "app.cli" not in argv:
            continue
        role = argv[argv.index("app.cli") + 1]
        if role == "actor" and "--actor-id" in argv:
            role = f"actor{argv[argv.index('--actor-id') + 1]}"
        out[role] = int(k)
    return out


def run_driver(cfg_path: str, run_dir: str, steps: int, log_path: str, timeout_s: float) -> Dict:
    proc = common.spawn(["-m", "app.cli", "train", "--config", cfg_path, "--num-evals", 10,
                         "--learner.total_env_steps", steps, "--run.run_dir", run_dir], log_path)
    try:
        proc.wait(timeout=timeout_s)
    except Exception:
        common.stop_process(proc, timeout_s=10)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"crl train exited with {proc.returncode}; see {log_path}")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "history.jsonl"))]
    start = next(r for r in rows if r["env_steps"] >= 0.3 * steps)
    end = rows[-1]
    dt = end["wall_s"] - start["wall_s"]
    return {"env_steps_per_s": (end["env_steps"] - start["env_steps"]) / dt,
            "sgd_steps_per_s": (end["sgd_steps"] - start["sgd_steps"]) / dt, "window_s": dt,
            "utd": (end["sgd_steps"] - start["sgd_steps"]) / max(end["env_steps"] - start["env_steps"], 1),
            "total_wall_s": end["wall_s"]}


def run_local(cfg, cfg_path: str, log_path: str, window: float, settle: float,
              timeout_s: float) -> Dict:
    from crl import metrics as M
    base = cfg.service.metrics_port
    actors = [f"actor{i}" for i in range(cfg.actor.num_actors)]
    ports = {"replay": base, "learner": base + 1, "evaluator": base + 2,
             **{a: base + 3 + i for i, a in enumerate(actors)}}
    t_launch = time.monotonic()
    proc = common.spawn(["-m", "app.cli", "local", "--config", cfg_path], log_path)

    def snapshot():
        snap = {"t": time.perf_counter(), "roles": _children_roles(proc.pid)}
        for role, port in ports.items():
            snap[role] = M.scrape(f"http://127.0.0.1:{port}/metrics", timeout_s=2.0)
        snap["cpu"] = {r: _cpu_seconds(pid) for r, pid in snap["roles"].items()}
        return snap

    try:
        deadline = time.monotonic() + timeout_s

        def running():
            s = snapshot()
            ok = (s["learner"].get("crl_learner_sgd_steps_total", 0) > 0 and
                  all(s[a].get("crl_actor_env_steps_total", 0) > 0 for a in actors))
            return s if ok else None

        common.wait_for(running, timeout_s, "crl local to start learning", interval_s=2.0, proc=proc)
        startup_s = time.monotonic() - t_launch
        time.sleep(settle)
        a = snapshot()
        time.sleep(min(window, max(deadline - time.monotonic(), 1)))
        b = snapshot()
        if proc.poll() is not None:
            raise RuntimeError(f"crl local exited early ({proc.returncode}); see {log_path}")
    finally:
        common.stop_process(proc, timeout_s=150, sig=signal.SIGINT)
    dt = b["t"] - a["t"]

    def d(role, name):
        return b[role].get(name, 0.0) - a[role].get(name, 0.0)

    env = sum(d(x, "crl_actor_env_steps_total") for x in actors)
    sgd = d("learner", "crl_learner_sgd_steps_total")
    out = {"env_steps_per_s": env / dt, "sgd_steps_per_s": sgd / dt, "window_s": dt,
           "utd": sgd / max(env, 1), "startup_s": startup_s,
           "learner_wait_frac": d("learner", "crl_learner_wait_seconds_total") / dt,
           "learner_compute_frac": d("learner", "crl_learner_compute_seconds_total") / dt,
           "learner_publish_frac": d("learner", "crl_learner_publish_duration_seconds_sum") / dt,
           "actor_unroll_frac": sum(d(x, "crl_actor_unroll_duration_seconds_sum") for x in actors) / dt / len(actors),
           "actor_write_frac": sum(d(x, "crl_actor_write_duration_seconds_sum") for x in actors) / dt / len(actors),
           "actor_rate_limited": sum(d(x, "crl_actor_rate_limited_total") for x in actors),
           "replay_insert_wait_frac": (d("replay", "crl_replay_insert_wait_seconds_total")
                                       or d("replay", "crl_replay_insert_wait_seconds")) / dt,
           "replay_sample_wait_frac": (d("replay", "crl_replay_sample_wait_seconds_total")
                                       or d("replay", "crl_replay_sample_wait_seconds")) / dt,
           "policy_lag": b["learner"].get("crl_learner_policy_lag", float("nan")),
           "cpu_cores_by_role": {r: (b["cpu"].get(r, 0.0) - a["cpu"].get(r, 0.0)) / dt
                                 for r in b["cpu"]}}
    calls = d("learner", "crl_learner_update_calls_total")
    if calls:
        out["learner_compute_s_per_call"] = d("learner", "crl_learner_compute_seconds_total") / calls
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="point_maze_u")
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--window", type=float, default=None, help="seconds of crl local measured")
    p.add_argument("--driver-steps", type=int, default=None)
    p.add_argument("--no-sandwich", action="store_true", help="run the driver once, not twice")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="more config overrides, e.g. --set algo.batch_size=512")
    common.add_common_args(p)
    a = p.parse_args(argv)
    q = a.quick
    from crl import config as C
    actors = a.actors or (1 if q else 2)
    width = a.width or (32 if q else 64)
    window = a.window or (8.0 if q else 60.0)
    driver_steps = a.driver_steps or (16_000 if q else 120_000)
    base = common.free_port_block(3 + actors + 1)
    rport, pport = common.free_port(), common.free_port()
    overrides = {"env.name": a.env, "actor.num_actors": actors,
                 "network.actor.width": width, "network.critic.width": width,
                 "network.actor.depth": a.depth, "network.critic.depth": a.depth,
                 "learner.total_env_steps": 100_000_000, "learner.num_devices": 1,
                 "service.replay_address": f"127.0.0.1:{rport}",
                 "service.params_address": f"127.0.0.1:{pport}",
                 "service.metrics_port": base}
    if q:
        overrides.update({"env.num_envs": 16, "algo.batch_size": 64,
                          "learner.segments_per_call": 8, "learner.minibatches_per_call": 2,
                          "replay.min_size_steps": 1_600, "replay.capacity_steps": 20_000,
                          "eval.num_envs": 8})
    overrides.update(dict(kv.split("=", 1) for kv in a.set))
    work = common.workdir("e2e")
    overrides["run.run_dir"] = os.path.join(work, "local")
    cfg = C.load(overrides=overrides)
    cfg_path = os.path.join(work, "config.yaml")
    C.dump(cfg, cfg_path)
    config = {"env": a.env, "actors": actors, "num_envs_per_actor": cfg.env.num_envs,
              "width": width, "depth": a.depth, "batch": cfg.algo.batch_size,
              "utd": cfg.replay.utd, "segments_per_call": cfg.learner.segments_per_call,
              "minibatches_per_call": cfg.learner.minibatches_per_call,
              "window_s": window, "driver_env_steps": driver_steps,
              "eval_interval_s": cfg.eval.interval_s}
    common.header(f"end to end: {a.env}, width {width}, depth {a.depth}, {actors} actors, "
                  f"utd {cfg.replay.utd}")
    timeout = 900.0
    drivers = []
    d1 = run_driver(cfg_path, os.path.join(work, "driver1"), driver_steps,
                    os.path.join(work, "driver1.log"), timeout)
    drivers.append(d1)
    print(f"  driver (crl train)   {d1['env_steps_per_s']:>9,.0f} env steps/s  "
          f"{d1['sgd_steps_per_s']:>7.1f} SGD steps/s  (utd {d1['utd']:.4f})", flush=True)
    loc = run_local(cfg, cfg_path, os.path.join(work, "local.log"), window,
                    settle=3.0 if q else 10.0, timeout_s=timeout)
    print(f"  crl local            {loc['env_steps_per_s']:>9,.0f} env steps/s  "
          f"{loc['sgd_steps_per_s']:>7.1f} SGD steps/s  (utd {loc['utd']:.4f}; "
          f"start-up {loc['startup_s']:.0f} s)", flush=True)
    if not (q or a.no_sandwich):
        d2 = run_driver(cfg_path, os.path.join(work, "driver2"), driver_steps,
                        os.path.join(work, "driver2.log"), timeout)
        drivers.append(d2)
        print(f"  driver (again)       {d2['env_steps_per_s']:>9,.0f} env steps/s  "
              f"{d2['sgd_steps_per_s']:>7.1f} SGD steps/s", flush=True)
    drv_env = sum(x["env_steps_per_s"] for x in drivers) / len(drivers)
    drv_sgd = sum(x["sgd_steps_per_s"] for x in drivers) / len(drivers)
    ratio_env = loc["env_steps_per_s"] / drv_env
    ratio_sgd = loc["sgd_steps_per_s"] / drv_sgd
    print(f"  local / driver: env steps {ratio_env:.2f}, SGD steps {ratio_sgd:.2f} "
          f"(target >= 0.9: {'met' if min(ratio_env, ratio_sgd) >= 0.9 else 'MISSED'})")
    print(f"  where the time goes (crl local): learner loop waiting for samples "
          f"{100 * loc['learner_wait_frac']:.0f}% / on the update {100 * loc['learner_compute_frac']:.0f}% / "
          f"other {100 * max(0.0, 1 - loc['learner_wait_frac'] - loc['learner_compute_frac']):.0f}% "
          f"of wall time, publisher thread busy {100 * loc['learner_publish_frac']:.0f}% "
          f"(off the loop); actors unrolling "
          f"{100 * loc['actor_unroll_frac']:.0f}% / writing {100 * loc['actor_write_frac']:.0f}%; "
          f"replay inserts held {100 * loc['replay_insert_wait_frac']:.0f}%, samples held "
          f"{100 * loc['replay_sample_wait_frac']:.0f}%")
    print("  CPU cores used by role: " + ", ".join(
        f"{r} {v:.2f}" for r, v in sorted(loc["cpu_cores_by_role"].items())), flush=True)
    figures = {"local_env_steps_per_s": loc["env_steps_per_s"],
               "local_sgd_steps_per_s": loc["sgd_steps_per_s"],
               "driver_env_steps_per_s": drv_env, "driver_sgd_steps_per_s": drv_sgd,
               "ratio_env_steps": ratio_env, "ratio_sgd_steps": ratio_sgd,
               "local_startup_s": loc["startup_s"]}
    extra = {k: v for k, v in loc.items() if k not in ("env_steps_per_s", "sgd_steps_per_s")}
    extra.update(drivers=drivers, target_ratio=0.9, target_met=min(ratio_env, ratio_sgd) >= 0.9)
    case = f"{a.env} width={width} actors={actors}" + "".join(f" {kv}" for kv in a.set)
    config["overrides"] = a.set
    common.record("end_to_end", case, config, figures,
                  out=a.out, quick=q, extra=extra)
    common.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
