"""Shared helpers of the tests that start real processes on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Re-exported for the tests: one implementation, shared with the benchmarks.
from crl.localhost import free_port, free_port_block, port_open, stop_process, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR_ENV = "CRL_RESULTS_DIR"


def record_result(name: str, row: dict, tmp_dir: Path) -> Path:
    """Appends one JSON row of measured figures to `<dir>/<name>.jsonl` and returns the path.

    <dir> is $CRL_RESULTS_DIR when set (scripts/record_reliability sets it to results/, the
    deliberate command that regenerates docs/reliability.md's table), else the test's own
    temporary directory: running the suite never changes the checkout."""
    import json
    out_dir = Path(os.environ.get(RESULTS_DIR_ENV) or tmp_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    return path


def start_role(args, log_path) -> subprocess.Popen:
    """`python -m app.cli ARGS` with output to log_path; stop it with stop_process."""
    log = open(log_path, "ab")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def wait_for_first_params(address: str, timeout_s: float, proc=None) -> None:
    """Waits until the ParameterService at address serves a first version.

    Not the port alone: the learner starts its server, then publishes its initial params, and on
    a loaded machine a get() between the two finds nothing (None) yet."""
    import grpc
    from params import ParameterClient
    client = ParameterClient(address, timeout_s=5)

    def ready() -> bool:
        try:
            return client.health()["ready"]
        except grpc.RpcError:
            return False
    try:
        wait_for(ready, timeout_s, f"the first params at {address}", proc=proc)
    finally:
        client.close()


def random_segments(n, rng, T=100, S=4, A=2):
    """n segments of random states/actions in the replay's segment layout, one episode each."""
    import numpy as np
    from crl.segments import segment_spec
    spec = segment_spec(S, A, T)
    out = {k: np.zeros((n,) + shape, dtype) for k, (shape, dtype) in spec.items()}
    out["state"] = rng.normal(size=out["state"].shape).astype(np.float32)
    out["action"] = rng.uniform(-1, 1, size=out["action"].shape).astype(np.float32)
    out["episode_id"][:] = np.arange(n)[:, None]
    return out


def write_all(writer, segs, timeout_s=240, until=None):
    """One segment per write, retrying while the rate limiter holds inserts (as actors do);
    stops early once until() is true."""
    from replay import ReplayTimeout
    for i in range(segs["state"].shape[0]):
        if until is not None and until():
            return
        one = {k: v[i:i + 1] for k, v in segs.items()}

        def attempt():
            try:
                writer.write(one)
                return True
            except ReplayTimeout:
                return until is not None and until()
        wait_for(attempt, timeout_s, "an insert")


def small_learner_overrides(run_dir, base_port, **more):
    """Config overrides of a tiny learner (width 32, 4 segments x 2 SGD steps per call) with
    replay at base_port and params at base_port + 1; `more` (dotted keys) override these."""
    return {
        "run.run_dir": run_dir, "service.replay_address": f"127.0.0.1:{base_port}",
        "service.params_address": f"127.0.0.1:{base_port + 1}",
        "network.actor.width": 32, "network.critic.width": 32,
        "algo.batch_size": 64, "learner.segments_per_call": 4, "learner.minibatches_per_call": 2,
        "replay.min_size_steps": 400, "replay.capacity_steps": 20_000,
        "learner.total_env_steps": 10**9, "learner.num_devices": 1, **more}
