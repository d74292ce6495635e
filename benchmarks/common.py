"""Shared helpers of the benchmarks: result lines (machine, versions, config, figures), child
processes on 127.0.0.1 (started and stopped by PID, every wait bounded), ports, synthetic segments.

A result line (one JSON object per line in results/benchmarks.jsonl):
    {"benchmark": "update_step", "case": "depth=64 fp32", "run_id": "...", "quick": false,
     "config": {...}, "figures": {name: positive number}, "extra": {...},
     "machine": {...}, "versions": {...}, "git": "abc1234+dirty", "unix_s": ...}
`figures` hold only positive, finite numbers (throughputs, times, ratios, memory); anything that
may be zero or non-numeric goes in `extra`. `run_id` groups the lines of one `run_all` invocation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# Ports and child processes: the one implementation the tests use too.
from crl.localhost import free_port, free_port_block, stop_process, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = str(REPO / "results" / "benchmarks.jsonl")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "brax", "dm-reverb", "tensorflow", "grpcio",
            "protobuf", "numpy")
MiB = 1 << 20
# TensorFlow (imported with Reverb) logs harmless CUDA-plugin "errors" at import; silence it.
os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("CRL_BENCH_TF_LOG_LEVEL", "3")


# ---------------------------------------------------------------------------------------------
# Result lines.

def run_id() -> str:
    """The id shared by every line of one run (CRL_BENCH_RUN_ID, set by run_all)."""
    rid = os.environ.get("CRL_BENCH_RUN_ID")
    if not rid:
        rid = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        os.environ["CRL_BENCH_RUN_ID"] = rid
    return rid


def versions() -> Dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def mem_available_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def machine() -> Dict[str, Any]:
    m = {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
         "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
         "mem_gib": _mem_gib(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if "jax" in sys.modules:
        import jax
        m["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    return m


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record(benchmark: str, case: str, config: Dict[str, Any], figures: Dict[str, float], *,
           out: str, quick: bool, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Appends one result line to `out` and returns it. A figure that is not a positive finite
    number (e.g. a negative slope fitted to noise) is moved to extra["not_positive"]."""
    extra = dict(extra or {})
    good = {k: _num(v) for k, v in figures.items()
            if v is not None and math.isfinite(float(v)) and float(v) > 0}
    bad = {k: (None if v is None else float(v)) for k, v in figures.items() if k not in good}
    if bad:
        extra["not_positive"] = bad
    line = {"benchmark": benchmark, "case": case, "run_id": run_id(), "quick": bool(quick),
            "config": config, "figures": good, "extra": extra, "machine": machine(), "versions": versions(), "git": git_rev(),
            "unix_s": round(time.time(), 3)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def _num(v):
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else v


def load_results(path: str, run: Optional[str] = None,
                 require: Optional[str] = None) -> List[Dict[str, Any]]:
    """Lines of `path` in the current format; of run `run` ("latest": the newest run id, or the
    newest run with a `require` benchmark line)."""
    rows = []
    if not os.path.exists(path):
        return rows
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "run_id" in r and "figures" in r:
            rows.append(r)
    if run == "latest" and rows:
        cand = [r for r in rows if require is None or r["benchmark"] == require]
        run = (cand or rows)[-1]["run_id"]
    if run:
        rows = [r for r in rows if r["run_id"] == run]
    return rows


_WORKDIRS: List[str] = []


def workdir(prefix: str) -> str:
    """A temporary directory for one benchmark's servers and logs; removed by cleanup() when the
    benchmark succeeds (kept, and named at exit, when it fails or with CRL_BENCH_KEEP=1)."""
    import tempfile
    d = tempfile.mkdtemp(prefix=f"crl-bench-{prefix}-")
    _WORKDIRS.append(d)
    return d


def cleanup() -> None:
    import shutil
    if os.environ.get("CRL_BENCH_KEEP") == "1":
        return
    while _WORKDIRS:
        shutil.rmtree(_WORKDIRS.pop(), ignore_errors=True)


def _report_kept() -> None:
    if _WORKDIRS:
        print(f"benchmark work dirs (logs) kept: {' '.join(_WORKDIRS)}", file=sys.stderr)


import atexit  # noqa: E402
atexit.register(_report_kept)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes and durations (CI): checks the benchmark runs, figures are "
                        "not meaningful")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results file (default: {DEFAULT_OUT})")


def header(title: str) -> None:
    m = machine()
    print(f"== {title} ==  [{m['cpus_usable']} CPUs, load {m['load_avg_1m']}, run {run_id()}]",
          flush=True)


# ---------------------------------------------------------------------------------------------
# Processes.

def child_env(**extra: str) -> Dict[str, str]:
    """Environment of benchmark child processes: repo on PYTHONPATH, quiet TensorFlow, and no
    forced host device count (tests force 2 CPU devices; a benchmark measures one) unless
    CRL_BENCH_KEEP_XLA_FLAGS=1."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("CRL_BENCH_TF_LOG_LEVEL", "3")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if env.get("CRL_BENCH_KEEP_XLA_FLAGS") != "1":
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        if flags:
            env["XLA_FLAGS"] = " ".join(flags)
        else:
            env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def spawn(args: Sequence[str], log_path: Optional[str] = None, *, pipes: bool = False,
          env: Optional[Dict[str, str]] = None, passthrough: bool = False) -> subprocess.Popen:
    """Starts `python args...` (args[0] may be "-m"). pipes=True: line-based stdin/stdout;
    passthrough=True: output goes to this process's stdout/stderr; else to log_path (or nowhere)."""
    cmd = [sys.executable, *map(str, args)]
    kw: Dict[str, Any] = dict(cwd=str(REPO), env=env or child_env())
    if passthrough:
        kw.update(stdin=subprocess.DEVNULL)
    elif pipes:
        kw.update(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        kw["stderr"] = open(log_path, "ab") if log_path else subprocess.DEVNULL
    else:
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        kw.update(stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(cmd, **kw)
    if pipes:
        import queue
        import threading
        proc.lines = queue.Queue()
        threading.Thread(target=_pump_lines, args=(proc,), daemon=True).start()
    return proc


def _pump_lines(proc: subprocess.Popen) -> None:
    """Reader thread of a pipes=True child: its stdout lines into proc.lines (a queue); None at
    EOF. (select() on a buffered pipe misses lines already read into the buffer.)"""
    try:
        for line in proc.stdout:
            proc.lines.put(line)
    except (OSError, ValueError):
        pass
    proc.lines.put(None)


def read_json_line(proc: subprocess.Popen, timeout_s: float, what: str) -> Dict[str, Any]:
    """Next JSON line from a pipes=True child (non-JSON lines are skipped), bounded."""
    import queue
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer from {what} within {timeout_s:.0f}s")
        try:
            line = proc.lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if line is None:
            proc.lines.put(None)    # stay at EOF for later reads
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)


def send(proc: subprocess.Popen, **msg) -> None:
    proc.stdin.write(json.dumps(msg) + "\n")
    proc.stdin.flush()


# ---------------------------------------------------------------------------------------------
# Replay server and segments.

def replay_overrides(T: int, capacity_items: int, segments_per_call: int = 32,
                     minibatches_per_call: int = 8, batch_size: int = 256,
                     open_limiter: bool = True, **extra) -> Dict[str, Any]:
    """Config overrides for a replay server holding segments of T steps.

    open_limiter: utd_tolerance 1e6 makes the SampleToInsertRatio error buffer so wide that
    neither inserts nor samples ever wait (the benchmark measures the server, not the ratio).
    """
    o = {"replay.segment_length": T, "replay.capacity_steps": capacity_items * T,
         "replay.min_size_steps": segments_per_call * T, "replay.checkpoint_interval_s": 1e9,
         "learner.segments_per_call": segments_per_call,
         "learner.minibatches_per_call": minibatches_per_call, "algo.batch_size": batch_size}
    if open_limiter:
        o["replay.utd_tolerance"] = 1e6
    o.update(extra)
    return o


class ReplayProcess:
    """`python -m replay.server` (the replay role, what `crl replay` runs) in its own process.

    Starts at construction (in the background, so the caller can compile meanwhile); `wait()`
    blocks (bounded) until it serves; `stop()` ends it by its PID without a final checkpoint of
    the throwaway table (SIGINT, then SIGKILL after 2 s)."""

    def __init__(self, workdir: str, state_dim: int, action_dim: int, overrides: Dict[str, Any]):
        os.makedirs(workdir, exist_ok=True)
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ready_file = os.path.join(workdir, "replay.ready")
        if os.path.exists(self.ready_file):
            os.remove(self.ready_file)
        args = ["-m", "replay.server", "--state-dim", state_dim, "--action-dim", action_dim,
                "--port", self.port, "--metrics-port", self.metrics_port,
                "--checkpoint-dir", os.path.join(workdir, "replay_ckpt"),
                "--ready-file", self.ready_file]
        for k, v in overrides.items():
            args += ["--set", f"{k}={v}"]
        self.log_path = os.path.join(workdir, "replay.log")
        self.proc = spawn(args, self.log_path)

    def wait(self, timeout_s: float = 300.0) -> "ReplayProcess":
        wait_for(lambda: os.path.exists(self.ready_file), timeout_s,
                 f"the replay server to start (log: {self.log_path})", proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=2.0, sig=signal.SIGINT)


def rss_mb(pid: int) -> float:
    """Resident set size of a process (MiB), from /proc."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def table_size(address: str, timeout_s: float = 10.0) -> int:
    import reverb
    from replay import TABLE
    return int(reverb.Client(address).server_info(max(1, int(math.ceil(timeout_s))))[TABLE].current_size)


def table_counts(address: str, timeout_s: float = 10.0):
    """(inserts, samples) completed by the segments table, from the server's rate limiter."""
    import reverb
    from replay import TABLE
    info = reverb.Client(address).server_info(max(1, int(math.ceil(timeout_s))))[TABLE]
    rl = info.rate_limiter_info
    return int(rl.insert_stats.completed), int(rl.sample_stats.completed)


def synthetic_segments(n: int, T: int, state_dim: int, action_dim: int, episode_length: int,
                       seed: int = 0) -> Dict[str, Any]:
    """n segments {field: [n, T, ...]} of the replay signature: normal states, actions in
    [-1, 1], episode ids that change every `episode_length` steps at a random phase."""
    import numpy as np
    rng = np.random.default_rng(seed)
    phase = rng.integers(0, episode_length, size=(n, 1))
    t = np.arange(T)[None, :] + phase
    base = (np.arange(n, dtype=np.int64) * 1000 + seed * 10_000_000)[:, None]
    return {"state": rng.standard_normal((n, T, state_dim), dtype=np.float32),
            "action": np.tanh(rng.standard_normal((n, T, action_dim), dtype=np.float32)),
            "episode_id": (base + t // episode_length).astype(np.int32),
            "truncation": ((t + 1) % episode_length == 0).astype(np.float32),
            "params_version": np.zeros((n, T), np.int32)}


def segment_bytes(T: int, state_dim: int, action_dim: int) -> int:
    """Bytes of one segment's payload (float32/int32 fields)."""
    return 4 * T * (state_dim + action_dim + 3)


def fmt(v: float, unit: str = "") -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    s = f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3g}"
    return s + (f" {unit}" if unit else "")
