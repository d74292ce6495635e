"""Benchmark: the learner fed from Reverb (another process, gRPC) vs fed from arrays on the device.

    python -m benchmarks.learner_pipeline [--depth 4] [--batch 512] [--width 256]
        [--env-dims humanoid] [--segment-length 1000] [--rounds 3] [--calls 6] [--quick]

The replay role (`python -m replay.server`, the process `crl replay` runs) is started with its
rate limiter opened wide (the benchmark measures the pipeline, not the ratio) and prefilled with
synthetic segments. The same `crl.learning.Updater` (relabel on device + `minibatches_per_call`
SGD steps in one compiled call, float metrics back, as the learner role does) is then timed
three ways, interleaved in rounds so the machine's load hits all three alike:

  device   : update(segments already on the device)  -- the upper bound
  pipeline : batch = SegmentSampler.sample(); update(batch.data)  -- sampling, transfer and
             relabelling in series with the compute
  role     : the learner role's own loop object (learner/loop.py LearnerLoop, stepped): call
             k+1 dispatched with Updater.update_async before call k is read, the non-finite row
             filter on every batch, params snapshots handed to the background ParamsPublisher
             (learner/publisher.py) at most every --publish-interval and publish_every calls
             apart; no checkpoints (checkpoint_every past the phase) and no replay polling

Figures: SGD steps/s of each, ratio pipeline / device (the issue's target, >= 0.9), ratio role /
device, the fraction of the pipeline's time spent waiting for a batch, the sampler's own rate
(MB/s, no compute), and what one publish of actor + critic costs (serialise + sha256; on the
publisher thread in the role).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks import common
from benchmarks.update_step import ENV_DIMS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--env-dims", default=None, choices=list(ENV_DIMS))
    p.add_argument("--segment-length", type=int, default=None)
    p.add_argument("--segments-per-call", type=int, default=None)
    p.add_argument("--minibatches-per-call", type=int, default=None)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--publish-interval", type=float, default=0.5,
                   help="learner.publish_interval_s of the role-loop phase")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--calls", type=int, default=None, help="timed update calls per phase")
    common.add_common_args(p)
    a = p.parse_args(argv)
    q = a.quick
    depth = a.depth or 4
    width = a.width or (32 if q else 256)
    batch = a.batch or (64 if q else 512)
    dims = a.env_dims or ("point" if q else "humanoid")
    T = a.segment_length or (50 if q else 1000)
    spc = a.segments_per_call or (8 if q else 32)
    mpc = a.minibatches_per_call or (4 if q else 8)
    rounds = a.rounds or (1 if q else 3)
    calls = a.calls or (3 if q else 6)
    S, A, goal_idx = ENV_DIMS[dims]
    seg_mb = common.segment_bytes(T, S, A) / common.MiB
    config = {"depth": depth, "width": width, "batch": batch, "env_dims": dims,
              "segment_length": T, "segments_per_call": spc, "minibatches_per_call": mpc,
              "prefetch": a.prefetch, "rounds": rounds, "calls_per_phase": calls,
              "mb_per_call": round(spc * seg_mb, 3)}
    common.header(f"learner pipeline: depth {depth} width {width} batch {batch}, {spc} segments "
                  f"x {T} steps ({spc * seg_mb:.1f} MB) and {mpc} SGD steps per call")
    overrides = common.replay_overrides(T, capacity_items=max(4 * spc, 64), segments_per_call=spc,
                                        minibatches_per_call=mpc, batch_size=batch)
    work = common.workdir("pipeline")
    replay_proc = None
    server = sampler = None
    try:
        replay_proc = common.ReplayProcess(work, S, A, overrides)   # starts while we compile
        address = replay_proc.address

        import jax
        from crl import config as C
        from crl.learning import Updater
        from params import ParameterServer

        cfg_over = dict(overrides)
        for net in ("actor", "critic"):
            cfg_over.update({f"network.{net}.depth": depth, f"network.{net}.width": width})
        cfg_over["learner.prefetch"] = a.prefetch
        cfg = C.load(overrides=cfg_over)
        updater = Updater(cfg, S, A, goal_idx, jax.random.PRNGKey(0), num_devices=1)
        host_batches = [common.synthetic_segments(spc, T, S, A, episode_length=T, seed=i)
                        for i in range(3)]
        t0 = time.perf_counter()
        updater.update(host_batches[0])           # compile
        compile_s = time.perf_counter() - t0
        device_batches = [jax.device_put({k: b[k] for k in ("state", "action", "episode_id")})
                          for b in host_batches]
        jax.block_until_ready(device_batches)

        # Replay: wait for the server, prefill.
        replay_proc.wait()
        from replay.sampler import SegmentSampler
        from replay.writer import SegmentWriter
        from crl.segments import segment_spec
        writer = SegmentWriter(address, segment_spec(S, A, T), timeout_s=60)
        for i in range(max(2 * spc, 32) // 16 + 1):
            writer.write(common.synthetic_segments(16, T, S, A, episode_length=T, seed=100 + i))
        writer.close()

        sampler = SegmentSampler(address, spc, timeout_s=60, prefetch=a.prefetch)
        # The sampler's own rate, no compute (queue drained, then timed).
        for _ in range(a.prefetch + 1):
            sampler.sample()
        n_s, t0 = 0, time.perf_counter()
        while n_s < 3 or time.perf_counter() - t0 < (0.5 if q else 3.0):
            sampler.sample()
            n_s += 1
        sample_only_s = (time.perf_counter() - t0) / n_s

        server = ParameterServer("127.0.0.1:0", max_message_mb=cfg.service.max_message_mb).start()
        version = [0]

        def publish():
            st = updater.host_state()
            version[0] += 1
            server.publish({"actor": st.actor_params, "critic": st.critic_params}, version[0])

        publish()   # first publish outside the timing (allocations)

        def device_phase():
            t0 = time.perf_counter()
            for i in range(calls):
                updater.update(device_batches[i % len(device_batches)])
            return time.perf_counter() - t0

        def pipeline_phase():
            for _ in range(a.prefetch + 1):      # steady state: queue as the loop leaves it
                updater.update(sampler.sample().data)
            wait = 0.0
            t0 = time.perf_counter()
            for _ in range(calls):
                tw = time.perf_counter()
                b = sampler.sample()
                wait += time.perf_counter() - tw
                updater.update(b.data)
            return time.perf_counter() - t0, wait

        role_loop = RoleLoop(cfg, updater, sampler, server, version[0], a.publish_interval)

        print(f"{'round':>5} {'device SGD/s':>12} {'pipeline SGD/s':>14} {'role SGD/s':>10} "
              f"{'ratio':>6} {'ratio role':>10} {'wait %':>6}", flush=True)
        per = {"device": [], "pipeline": [], "role": []}
        ratios, ratios_role, waits = [], [], []
        for r in range(rounds):
            d = device_phase()
            pl = pipeline_phase()
            rl = role_loop.phase(calls, warm=a.prefetch + 1)
            rate = lambda seconds: calls * mpc / seconds   # noqa: E731
            per["device"].append(rate(d))
            per["pipeline"].append(rate(pl[0]))
            per["role"].append(rate(rl))
            ratios.append(per["pipeline"][-1] / per["device"][-1])
            ratios_role.append(per["role"][-1] / per["device"][-1])
            waits.append(pl[1] / pl[0])
            print(f"{r:>5} {per['device'][-1]:>12.2f} {per['pipeline'][-1]:>14.2f} "
                  f"{per['role'][-1]:>10.2f} {ratios[-1]:>6.2f} {ratios_role[-1]:>10.2f} "
                  f"{100 * waits[-1]:>6.1f}", flush=True)
        version[0] = role_loop.close()
        # One synchronous publish of actor + critic, timed alone (the role does it off the loop).
        pubs = []
        for _ in range(3):
            tp = time.perf_counter()
            publish()
            pubs.append(time.perf_counter() - tp)
        med = statistics.median
        payload_mb = server._current().total_bytes / common.MiB
        figures = {
            "device_sgd_steps_per_s": med(per["device"]),
            "pipeline_sgd_steps_per_s": med(per["pipeline"]),
            "ratio_pipeline_device": med(ratios),
            "role_sgd_steps_per_s": med(per["role"]),
            "ratio_role_device": med(ratios_role),
            "device_call_s": mpc / med(per["device"]),
            "sample_only_batches_per_s": 1 / sample_only_s,
            "sample_only_mb_per_s": spc * seg_mb / sample_only_s,
            "required_mb_per_s": spc * seg_mb * med(per["device"]) / mpc,
            "publish_s": med(pubs),
            "publish_mb_per_s": payload_mb / med(pubs),
            "compile_s": compile_s,
        }
        ratio = figures["ratio_pipeline_device"]
        print(f"pipeline / device = {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'}); "
              f"the learner role's loop (async + publisher thread): "
              f"{figures['ratio_role_device']:.2f}; waiting "
              f"{100 * med(waits):.1f}% of the pipeline's time; sampler alone "
              f"{figures['sample_only_mb_per_s']:.0f} MB/s vs {figures['required_mb_per_s']:.0f} "
              f"MB/s needed; one publish {1e3 * figures['publish_s']:.0f} ms "
              f"({payload_mb:.1f} MB)")
        common.record("learner_pipeline", f"depth={depth} {dims}", config, figures, out=a.out,
                      quick=q, extra={"wait_fraction": med(waits), "payload_mb": payload_mb,
                                      "target_ratio": 0.9, "target_met": ratio >= 0.9,
                                      "rounds": {k: v for k, v in per.items()}})
    finally:
        if sampler is not None:
            sampler.close()
        if server is not None:
            server.stop(None)
        if replay_proc is not None:
            replay_proc.stop()
    common.cleanup()
    return 0


class RoleLoop:
    """The learner role's loop (learner/loop.py LearnerLoop) stepped over the benchmark's sampler
    and a ParamsPublisher on the benchmark's server: no checkpoints, no replay polling (the
    budget is out of reach), no TensorBoard."""

    def __init__(self, cfg, updater, sampler, server, version: int, interval_s: float):
        import dataclasses
        import logging
        import jax
        from learner.loop import LearnerLoop, LoopSettings, LoopState
        from learner.publisher import ParamsPublisher
        log = logging.getLogger("bench")
        self.publisher = ParamsPublisher(server, interval_s, log).start()
        settings = dataclasses.replace(LoopSettings.from_config(cfg), checkpoint_every=10**9,
                                       total_env_steps=10**18, sample_timeout_s=60.0)
        self.loop = LearnerLoop(settings, updater, lambda: sampler, self.publisher,
                                checkpointer=None, log=log, device=jax.local_devices()[0],
                                state=LoopState(params_version=version,
                                                sgd_steps=updater.sgd_steps))

    def phase(self, calls: int, warm: int) -> float:
        """Seconds the loop takes for `calls` update calls (dispatched and settled), after
        `warm` calls that fill the pipeline."""
        s = self.loop.state
        for n in (warm, calls):   # the last pass is the timed one
            self.loop.drain()
            t0 = time.perf_counter()
            target = s.update_calls + n
            while s.update_calls + len(s.pending) < target:
                self.loop.step()
            self.loop.drain()
        dt = time.perf_counter() - t0
        while not self.publisher.idle():   # before other phases publish newer versions
            time.sleep(0.01)
        return dt

    def close(self) -> int:
        """Stops the publisher (the offer it had not taken is published); returns the newest
        version."""
        left = self.publisher.stop()
        if left is not None:
            self.publisher.publish_now(*left)
        return self.loop.state.params_version


if __name__ == "__main__":
    sys.exit(main())
