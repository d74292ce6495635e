"""Runs every benchmark, then prints the table of this run's figures.

    uv run --frozen python -m benchmarks.run_all [--quick] [--only update_step params ...]
        [--depths 4 16 64 256 1024] [--out results/benchmarks.jsonl]

Each benchmark runs as its own process (a clean JAX/TensorFlow runtime and its own peak memory)
and appends its lines, tagged with one run id, to --out. A benchmark that fails is reported and
the others still run; the exit status is 1 if any failed. --quick: reduced sizes and durations
(CI; figures are not meaningful). Print the table again later with
`python -m benchmarks.report --run latest`, the cluster model with `python -m benchmarks.scaling`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import common

BENCHMARKS = ["update_step", "learner_pipeline", "actor", "replay_throughput", "params",
              "end_to_end"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="update-step depths (default 4 16 64 256; e.g. add 1024 on a GPU)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per benchmark before it is stopped (default 3600; quick 900)")
    common.add_common_args(p)
    a, rest = p.parse_known_args(argv)
    rid = common.run_id()
    names = a.only or BENCHMARKS
    timeout = a.timeout or (900 if a.quick else 3600)
    print(f"[run_all] run {rid}: {', '.join(names)}{' (quick)' if a.quick else ''}; "
          f"results -> {a.out}", flush=True)
    failed = []
    t_all = time.perf_counter()
    for name in names:
        args = ["-m", f"benchmarks.{name}", "--out", a.out] + (["--quick"] if a.quick else []) + rest
        if name == "update_step" and a.depths:
            args += ["--depths", *map(str, a.depths)]
        t0 = time.perf_counter()
        proc = common.spawn(args, env=common.child_env(CRL_BENCH_RUN_ID=rid), passthrough=True)
        try:
            rc = proc.wait(timeout=timeout)
        except Exception:
            common.stop_process(proc, timeout_s=30)
            rc = "timeout"
        dt = time.perf_counter() - t0
        print(f"[run_all] {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {dt:.0f} s\n", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"[run_all] done in {time.perf_counter() - t_all:.0f} s; failed: {failed or 'none'}\n")
    from benchmarks import report
    print(report.render(common.load_results(a.out, rid), markdown=False))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
