"""Benchmark: insert and sample throughput of the replay server with 1, 2, 4, 8 writer processes,
alone and with a learner-like sampler running at the same time.

    python -m benchmarks.replay_throughput [--dims humanoid] [--segment-length 1000]
        [--writers 1 2 4 8] [--num-envs 64] [--batch 32] [--window 6] [--quick]

The replay role (`python -m replay.server`) runs in its own process with the rate limiter opened
wide (the benchmark measures the server, not the ratio). Writer processes each hold one actor's
write (`--num-envs` segments of `--segment-length` steps, synthetic data of the env's dims) and
write it with `replay.writer.SegmentWriter` (append + bounded flush) in a loop; the sampler
process draws batches of `--batch` segments with `replay.sampler.SegmentSampler` (the learner's
pipeline, numpy out). All children start once and are driven phase by phase; throughput is
counted on the server (rate limiter insert/sample counts) over each phase's window.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common
from benchmarks.update_step import ENV_DIMS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default=None, choices=list(ENV_DIMS))
    p.add_argument("--segment-length", type=int, default=None)
    p.add_argument("--writers", type=int, nargs="+", default=None)
    p.add_argument("--num-envs", type=int, default=None, help="segments per write (one actor)")
    p.add_argument("--batch", type=int, default=None, help="segments per sample (learner call)")
    p.add_argument("--window", type=float, default=None, help="seconds per phase")
    common.add_common_args(p)
    a = p.parse_args(argv)
    q = a.quick
    dims = a.dims or ("point" if q else "humanoid")
    T = a.segment_length or (50 if q else 1000)
    writers_list = a.writers or ([1] if q else [1, 2, 4, 8])
    num_envs = a.num_envs or (16 if q else 64)
    batch = a.batch or (8 if q else 32)
    window = a.window or (1.5 if q else 6.0)
    S, A, _ = ENV_DIMS[dims]
    seg_bytes = common.segment_bytes(T, S, A)
    config = {"dims": dims, "state_dim": S, "action_dim": A, "segment_length": T,
              "segments_per_write": num_envs, "segments_per_sample": batch, "window_s": window,
              "segment_mb": round(seg_bytes / common.MiB, 4)}
    common.header(f"replay: {dims} dims, segments of {T} steps ({seg_bytes / common.MiB:.2f} MB), "
                  f"{num_envs} per write, {batch} per sample")
    work = common.workdir("replay")
    cap = max(8 * batch, int(512 * common.MiB // seg_bytes))   # ~512 MB of segments, FIFO
    replay = common.ReplayProcess(work, S, A, common.replay_overrides(
        T, capacity_items=cap, segments_per_call=batch, minibatches_per_call=1, batch_size=T))
    writers, sampler = [], None
    try:
        replay.wait()
        common.table_counts(replay.address)   # imports Reverb here, not inside the first window
        rss_empty = common.rss_mb(replay.proc.pid)
        args = ["--address", replay.address, "--S", S, "--A", A, "--T", T]
        writers = [common.spawn(["-m", "benchmarks._children", "replay_writer", *args,
                                 "--num-envs", num_envs], f"{work}/writer{i}.log", pipes=True)
                   for i in range(max(writers_list))]
        sampler = common.spawn(["-m", "benchmarks._children", "replay_sampler", *args,
                                "--batch", batch], f"{work}/sampler.log", pipes=True)
        for i, w in enumerate(writers):
            common.read_json_line(w, 600, f"writer {i}")
        common.read_json_line(sampler, 600, "sampler")
        # Warm up every child (first writes, the sampler's dataset) and fill past one sample.
        for c in writers:
            common.send(c, run=0.3)
        for c in writers:
            common.read_json_line(c, 120, "writer warm-up")
        common.send(sampler, run=0.3)
        common.read_json_line(sampler, 120, "sampler warm-up")

        phases = [(k, False) for k in writers_list] + [(0, True)] + [(k, True) for k in writers_list]
        print(f"{'writers':>7} {'sampler':>7} {'insert steps/s':>15} {'insert MB/s':>11} "
              f"{'sample steps/s':>15} {'sample MB/s':>11}", flush=True)
        for k, with_sampler in phases:
            active = writers[:k] + ([sampler] if with_sampler else [])
            for c in active:
                common.send(c, run=window)
            ramp = min(0.5, window / 4)
            time.sleep(ramp)
            i0, s0 = common.table_counts(replay.address)
            t0 = time.perf_counter()
            time.sleep(window - 2 * ramp)
            i1, s1 = common.table_counts(replay.address)
            dt = time.perf_counter() - t0
            own = [common.read_json_line(c, 120 + window, "replay child") for c in active]
            ins, smp = (i1 - i0) / dt, (s1 - s0) / dt
            print(f"{k:>7} {'yes' if with_sampler else 'no':>7} {ins * T:>15,.0f} "
                  f"{ins * seg_bytes / common.MiB:>11.1f} {smp * T:>15,.0f} "
                  f"{smp * seg_bytes / common.MiB:>11.1f}", flush=True)
            figures = {}
            if k:
                figures.update(insert_env_steps_per_s=ins * T,
                               insert_mb_per_s=ins * seg_bytes / common.MiB)
            if with_sampler:
                figures.update(sample_env_steps_per_s=smp * T,
                               sample_mb_per_s=smp * seg_bytes / common.MiB)
            case = (f"writers={k}" if k else "sampler only") + (" +sampler" if k and with_sampler else "")
            common.record("replay", case, {**config, "writers": k, "sampler": with_sampler},
                          figures, out=a.out, quick=q,
                          extra={"inserted_items": i1 - i0, "sampled_items": s1 - s0,
                                 "window_s": dt, "children": own})
        # Memory: the table is full (FIFO at capacity) after the phases above.
        items = common.table_size(replay.address)
        rss_full = common.rss_mb(replay.proc.pid)
        if items:
            per_step = (rss_full - rss_empty) * common.MiB / (items * T)
            raw = seg_bytes / T
            print(f"replay memory: {rss_full:,.0f} MiB RSS holding {items} segments ({items * T:,} env "
                  f"steps): {per_step:,.0f} bytes per stored env step vs {raw:,.0f} raw "
                  f"({per_step / raw:.2f}x); empty server {rss_empty:,.0f} MiB", flush=True)
            common.record("replay", "memory", {**config, "items": items},
                          {"bytes_per_env_step": per_step, "overhead_ratio": per_step / raw,
                           "rss_mb": rss_full, "rss_empty_mb": rss_empty},
                          out=a.out, quick=q)
    finally:
        for c in writers + ([sampler] if sampler else []):
            try:
                common.send(c, stop=True)
            except OSError:
                pass
        for c in writers + ([sampler] if sampler else []):
            common.stop_process(c, timeout_s=10)
        replay.stop()
    common.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
