"""Benchmark: env steps/s of the actor role (writes to Reverb, refreshes params) vs the bare
jitted unroll of the same envs and policy.

    python -m benchmarks.actor [--envs ant point_maze_u] [--num-envs 64] [--segment-length 100]
        [--depth 4] [--width 256] [--window 20] [--quick]

Per env: a replay server (`python -m replay.server`, rate limiter opened wide so inserts never
wait on a learner) and a params publisher (a ParameterServer process publishing a new actor
version every 0.5 s, as a learner does) run as separate processes. Both phases step the same
policy (the publisher's params; its later versions differ by 1e-3). In this process, in order:

  bare     : crl.rollout.Unroller.unroll back to back, one queued ahead (the upper bound)
  actor    : actors.role.run (the real role: PolicyFollower thread, SegmentWriter with bounded
             flushes, the write of unroll k overlapped with unroll k+1) in a thread; env steps
             counted from its crl_actor_env_steps_total
  bare     : again, so the ratio uses the mean of the two bare runs around the role run

Rates are measured between counter increments in a steady window after compile and the first
params. Figures: env steps/s of each, ratio actor / bare (target >= 0.9), and the in-loop
figures from the role's own histograms over the same window (load drift cancels): per
iteration, the seconds it waited for the unroll (the part the overlapped write did not hide)
and the seconds of the write, each also as a share of the loop period. An unroll wait > 0
means the write is hidden: the envs never wait for replay, and what is left between actor and
bare is CPU contention (the write's work shares the cores with XLA's threads).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from benchmarks import common

DIMS_KEY = {"point": "point", "ant": "ant", "humanoid": "humanoid"}


def dims_key(env_name: str) -> str:
    for prefix, key in DIMS_KEY.items():
        if env_name.startswith(prefix):
            return key
    raise ValueError(env_name)


def sample(name: str) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value(name) or 0.0


def measure_role(run_fn, cfg, window: float, warm_increments: int = 2, timeout_s: float = 900):
    """Runs run_fn(cfg, 0, stop, log) in a thread; rate of crl_actor_env_steps_total between its
    increments inside a window that starts after `warm_increments` increments."""
    import logging
    stop = threading.Event()
    log = logging.getLogger("bench.actor")
    err = []

    def target():
        try:
            run_fn(cfg, 0, stop, log)
        except BaseException as e:   # noqa: BLE001 - reported below
            err.append(e)

    base = {k: sample(k) for k in ("crl_actor_env_steps_total", "crl_actor_unroll_duration_seconds_sum",
                                   "crl_actor_unroll_duration_seconds_count", "crl_actor_write_duration_seconds_sum",
                                   "crl_actor_write_duration_seconds_count")}
    th = threading.Thread(target=target, name="actor-role", daemon=True)
    th.start()
    deadline = time.monotonic() + timeout_s
    last, marks = sample("crl_actor_env_steps_total"), []
    t_start = None
    try:
        while time.monotonic() < deadline and not err:
            time.sleep(0.005)
            v = sample("crl_actor_env_steps_total")
            if v == last:
                continue
            last = v
            marks.append((time.perf_counter(), v, {k: sample(k) for k in base}))
            if len(marks) == warm_increments:
                t_start = marks[-1][0]
            if t_start is not None and marks[-1][0] - t_start >= window and \
                    len(marks) >= warm_increments + 3:
                break
        else:
            raise RuntimeError(f"actor loop failed or timed out: {err}")
    finally:
        stop.set()
        th.join(timeout=120)
    (t0, s0, m0), (t1, s1, m1) = marks[warm_increments - 1], marks[-1]
    d = {k: m1[k] - m0[k] for k in base}
    n_unroll = max(d["crl_actor_unroll_duration_seconds_count"], 1)
    n_write = max(d["crl_actor_write_duration_seconds_count"], 1)
    return {"env_steps_per_s": (s1 - s0) / (t1 - t0), "window_s": t1 - t0,
            "unroll_wait_s": d["crl_actor_unroll_duration_seconds_sum"] / n_unroll,
            "write_s": d["crl_actor_write_duration_seconds_sum"] / n_write}


def measure_bare(unroller, params, state, T: int, window: float):
    """Unrolls back to back, the next one always queued before waiting for the previous (as the
    role does), so no host round trip sits between two unrolls: XLA's own stepping rate."""
    import jax
    state, seg, _ = unroller.unroll(state, params, 0, length=T)   # compile + warm
    jax.block_until_ready(seg)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < window:
        state, nxt, _ = unroller.unroll(state, params, 0, length=T)
        jax.block_until_ready(seg)
        seg = nxt
        n += 1
    jax.block_until_ready(seg)
    return state, unroller.num_envs * T * n / (time.perf_counter() - t0)


def bench_env(env_name: str, a, q: bool) -> None:
    import jax
    from actors import role as actor_role
    from crl import config as C
    from crl.envs import ENV_SPECS, make_env
    from crl.networks import CRLNetworks
    from params import ParameterClient
    from crl.rollout import Unroller

    key = dims_key(env_name)
    num_envs = a.num_envs or (16 if q else 64)
    T = a.segment_length or (20 if q else 100)
    depth, width = a.depth, a.width or (32 if q else 256)
    window = a.window or (1.0 if q else 20.0)
    env = make_env(env_name)
    S, A = env.state_dim, env.action_size
    work = common.workdir("actor")
    overrides = common.replay_overrides(T, capacity_items=max(4 * num_envs, 256),
                                        segments_per_call=1, minibatches_per_call=1,
                                        batch_size=min(T, 64))
    replay = common.ReplayProcess(work, S, A, overrides)
    params_proc = common.spawn(["-m", "benchmarks._children", "params_server", "--depth", depth,
                                "--width", width, "--dims", key, "--period", 0.5],
                               f"{work}/params.log", pipes=True)
    config = {"env": env_name, "num_envs": num_envs, "segment_length": T, "depth": depth,
              "width": width, "window_s": window, "param_refresh_s": 1.0,
              "publish_period_s": 0.5}
    try:
        nets_cfg = C.NetworksConfig(actor=C.NetworkConfig(depth=depth, width=width),
                                    critic=C.NetworkConfig(depth=4, width=width))
        nets = CRLNetworks(nets_cfg, S, A, env.goal_dim)
        episode_length = T if q else ENV_SPECS[env_name].episode_length
        unroller = Unroller(env, nets, num_envs, episode_length)
        ustate = unroller.reset(jax.random.PRNGKey(1))
        # The same policy as the role's: the params it gets first (version 0) from the publisher.
        ready = common.read_json_line(params_proc, 300, "params server")
        template = {"actor": jax.eval_shape(nets.init, jax.random.PRNGKey(0))[0]}
        with ParameterClient(f"127.0.0.1:{ready['ready']}", template=template) as client:
            params = jax.device_put(client.get(subset="actor")[1]["actor"])
        replay.wait()   # started meanwhile; its start-up must not overlap a measured phase
        ustate, bare1 = measure_bare(unroller, params, ustate, T, window)
        print(f"  bare unroll          {bare1:>10,.0f} env steps/s", flush=True)
        over = dict(overrides)
        over.update({"env.name": env_name, "env.num_envs": num_envs,
                     "network.actor.depth": depth, "network.actor.width": width,
                     "network.critic.width": width, "actor.param_refresh_s": 1.0,
                     "service.replay_address": replay.address,
                     "service.params_address": f"127.0.0.1:{ready['ready']}"})
        if q:
            over["env.episode_length"] = T
        cfg = C.load(overrides=over)
        role = measure_role(actor_role.run, cfg, window)
        print(f"  actor role           {role['env_steps_per_s']:>10,.0f} env steps/s", flush=True)
        ustate, bare2 = measure_bare(unroller, params, ustate, T, window)
        print(f"  bare unroll (again)  {bare2:>10,.0f} env steps/s", flush=True)
        bare = statistics.mean([bare1, bare2])
        ratio = role["env_steps_per_s"] / bare
        seg_mb = common.segment_bytes(T, S, A) / common.MiB
        # In-loop figures: shares of the role's loop period (num_envs * T env steps per
        # iteration), from its own histograms over the same window.
        loop_s = num_envs * T / role["env_steps_per_s"]
        wait_share, write_share = role["unroll_wait_s"] / loop_s, role["write_s"] / loop_s
        print(f"  actor / bare = {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})",
              flush=True)
        print(f"  in the role's loop ({loop_s * 1e3:.1f} ms per unroll): waits for the unroll "
              f"{role['unroll_wait_s'] * 1e3:.1f} ms ({wait_share:.0%}), writes "
              f"{role['write_s'] * 1e3:.1f} ms ({write_share:.0%}) while the next unroll steps: "
              f"{'the write is hidden' if role['unroll_wait_s'] > 0.001 else 'write-bound'}; "
              f"the actor writes {role['env_steps_per_s'] / T * seg_mb:.1f} MB/s", flush=True)
        figures = {"bare_env_steps_per_s": bare, "actor_env_steps_per_s": role["env_steps_per_s"],
                   "ratio_actor_bare": ratio, "loop_s": loop_s,
                   "unroll_wait_s": role["unroll_wait_s"], "write_s": role["write_s"],
                   "unroll_wait_share": wait_share, "write_share": write_share,
                   "write_mb_per_s": role["env_steps_per_s"] / T * seg_mb}
        common.record("actor", env_name, config, figures, out=a.out, quick=q,
                      extra={"bare_runs": [bare1, bare2], "target_ratio": 0.9,
                             "target_met": ratio >= 0.9, "params_bytes": ready["bytes"]})
    finally:
        common.stop_process(params_proc, timeout_s=10)
        replay.stop()


def bench_bare_only(env_name: str, a) -> None:
    import jax
    from crl import config as C
    from crl.envs import ENV_SPECS, make_env
    from crl.networks import CRLNetworks
    from crl.rollout import Unroller
    num_envs, T = a.num_envs or 64, a.segment_length or 100
    width = a.width or 256
    window = a.window or 20.0
    env = make_env(env_name)
    nets = CRLNetworks(C.NetworksConfig(actor=C.NetworkConfig(depth=a.depth, width=width),
                                        critic=C.NetworkConfig(depth=4, width=width)),
                       env.state_dim, env.action_size, env.goal_dim)
    params = nets.init(jax.random.PRNGKey(0))[0]
    unroller = Unroller(env, nets, num_envs, ENV_SPECS[env_name].episode_length)
    t0 = time.perf_counter()
    state = unroller.reset(jax.random.PRNGKey(1))
    state, rate = measure_bare(unroller, params, state, T, window)
    print(f"  bare unroll          {rate:>10,.0f} env steps/s (compile + measure "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    common.record("actor", f"{env_name} (bare only)",
                  {"env": env_name, "num_envs": num_envs, "segment_length": T, "depth": a.depth,
                   "width": width, "window_s": window}, {"bare_env_steps_per_s": rate},
                  out=a.out, quick=a.quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=None)
    p.add_argument("--num-envs", type=int, default=None)
    p.add_argument("--segment-length", type=int, default=None)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--window", type=float, default=None, help="seconds per measured phase")
    p.add_argument("--bare-envs", nargs="*", default=None,
                   help="envs measured as bare unrolls only (default: humanoid; quick: none)")
    common.add_common_args(p)
    a = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    envs = a.envs or (["point_maze_u"] if a.quick else ["ant", "point_maze_u"])
    for env_name in envs:
        common.header(f"actor: {env_name}")
        bench_env(env_name, a, a.quick)
    for env_name in (a.bare_envs if a.bare_envs is not None else ([] if a.quick else ["humanoid"])):
        common.header(f"actor: {env_name} (bare unroll only)")
        bench_bare_only(env_name, a)
    common.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
