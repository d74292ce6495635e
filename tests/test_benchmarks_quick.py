"""The benchmark suite in its quick form, so it cannot rot: `python -m benchmarks.run_all --quick`
runs every benchmark (real processes on 127.0.0.1: replay server, writers, sampler, params server
and clients, `crl local`, `crl train`), prints its figures and appends result lines. Asserted:
every benchmark ran and wrote lines with machine, versions and config, its key figures are
present, and every figure is a positive finite number. NO timing or target is asserted (the quick
sizes are too small to mean anything; docs/benchmarks.md has the real figures).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO

KEY_FIGURES = {
    "update_step": {"sgd_steps_per_s", "samples_per_s", "step_s", "compile_s", "peak_rss_mb",
                    "xla_peak_mb"},
    "learner_pipeline": {"device_sgd_steps_per_s", "pipeline_sgd_steps_per_s",
                         "ratio_pipeline_device", "role_sgd_steps_per_s", "ratio_role_device",
                         "sample_only_mb_per_s"},
    "actor": {"bare_env_steps_per_s", "actor_env_steps_per_s", "ratio_actor_bare",
              "loop_s", "write_s"},
    "replay": {"insert_env_steps_per_s", "insert_mb_per_s", "sample_env_steps_per_s",
               "sample_mb_per_s"},
    "params": {"latency_s", "mb_per_s", "publish_s", "max_fetch_s"},
    "end_to_end": {"local_env_steps_per_s", "local_sgd_steps_per_s", "driver_env_steps_per_s",
                   "driver_sgd_steps_per_s", "ratio_env_steps", "ratio_sgd_steps"},
}
RUN_ID = "ci-quick"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmarks.jsonl"
    env = dict(os.environ, CRL_BENCH_RUN_ID=RUN_ID, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)   # conftest forces 2 CPU devices; benchmarks measure one
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-12000:])
    print(proc.stderr[-4000:])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, rows


@pytest.mark.timeout(1900)
def test_every_benchmark_runs(quick_run):
    proc, rows = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["benchmark"] for r in rows} == set(KEY_FIGURES)
    assert "== Targets ==" in proc.stdout          # the summary table was printed


def test_lines_carry_machine_versions_config(quick_run):
    _, rows = quick_run
    assert rows
    for r in rows:
        assert r["run_id"] == RUN_ID and r["quick"] is True
        assert r["config"] and r["case"]
        assert r["machine"]["cpus"] >= 1 and r["machine"]["platform"]
        assert r["versions"]["jax"] and r["versions"]["dm-reverb"]


def test_figures_present_positive_finite(quick_run):
    _, rows = quick_run
    for bench, keys in KEY_FIGURES.items():
        found = set()
        for r in (r for r in rows if r["benchmark"] == bench):
            for k, v in r["figures"].items():
                assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (bench, r["case"], k, v)
            found |= set(r["figures"])
        assert keys <= found, (bench, sorted(keys - found))


def test_report_and_scaling_model_render(quick_run, tmp_path):
    _, rows = quick_run
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import report, scaling
    text = report.render(rows, markdown=True)
    for title in ("Update step", "Learner pipeline", "Actor", "Replay", "Params", "End to end",
                  "Targets"):
        assert title in text
    model = scaling.model(rows, [4, 64, 1024], pod_cores=16, refresh_s=1.0)
    assert len(model["rows"]) == 3
    out = scaling.render(model, markdown=True)
    assert "Learner and actors" in out and "Network and memory" in out
