"""benchmarks/gpu_check.py --tiny: every check of the GPU check runs on CPU at small sizes
(the update step at depth 4 in fp32 / bf16 / remat and at depth 8, pmap == single device on the
2 forced host devices, the critic's distance precision); `crl local` is left out (--local-minutes
0). Its figures are printed and written to a results file in tmp_path, never to results/."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0
    assert "pmap == single device (cpu x2): PASS" in proc.stdout
    assert "distance precision (cpu:cpu): PASS" in proc.stdout
    assert "all checks passed" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["benchmark"] == "gpu_check" and r["quick"] for r in rows)
    cases = {r["case"]: r for r in rows}
    for case in ("update fp32 depth=4", "update bf16 depth=4", "update fp32+remat depth=4",
                 "update fp32 depth=8"):
        f = cases[case]["figures"]
        for k in ("compile_s", "sgd_steps_per_s", "xla_peak_mib", "achieved_tflops"):
            assert f[k] > 0, (case, k)
        assert cases[case]["extra"]["finite"]
        assert "peak_tflops" not in f          # a CPU has no entry in the peak table
    assert cases["update fp32 depth=4"]["figures"]["xla_gflop_per_step"] > 0
    assert cases["pmap equals single"]["extra"]["pmap_equals_single"] is True
    prec = cases["distance precision"]
    assert prec["extra"]["precision_ok"] is True
    assert all(v < 1e-3 for v in prec["figures"].values())
    assert len(prec["figures"]) + len(prec["extra"].get("not_positive", {})) == 8  # 0 = exact


def test_peak_table():
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_check import peak_tflops
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "float32") == 378.0
    assert peak_tflops("NVIDIA H200", "float32") == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert peak_tflops("Tesla T4", "float32") is None
