"""Shared helpers of the tests that start real processes on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Re-exported for the tests: one implementation, shared with the benchmarks.
from crl.localhost import free_port, free_port_block, port_open, stop_process, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def start_role(args, log_path) -> subprocess.Popen:
    """`python -m crl.cli ARGS` with output to log_path; stop it with stop_process."""
    log = open(log_path, "ab")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "crl.cli", *map(str, args)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


