"""Ports and child processes on 127.0.0.1, shared by the tests, the benchmarks and the tools
that start real servers: free ports, bounded waits, stop by PID (signal, bounded wait, SIGKILL).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Optional, Tuple


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


# Ports are drawn BELOW the kernel's ephemeral range: a client connecting to a port of that range
# before its server listens can be connected to itself (TCP simultaneous open, same source and
# destination port). It then reads its own request back as the reply, and holds the port so the
# server cannot bind it. Seen here: the launcher's /metrics scrape read "GET /metrics HTTP/1.1"
# as the status line and stopped a whole run.
_LOWEST = 20000
_rng = random.Random(int.from_bytes(os.urandom(8), "little"))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A port that is free now, outside the ephemeral range."""
    return free_port_block(1)


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports (each checked by binding it), all below the
    kernel's ephemeral range."""
    top = min(_ephemeral_range()[0], 65536) - n
    if top <= _LOWEST:
        raise RuntimeError(f"no room for {n} ports below the ephemeral range")
    for _ in range(200):
        base = _rng.randrange(_LOWEST, top)
        if all(_bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no block of free ports found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            return s.getsockname() != s.getpeername()   # connected to itself: nobody listens
    except OSError:
        return False


def wait_for(fn: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2,
             proc: Optional[subprocess.Popen] = None) -> Any:
    """fn()'s first truthy value, polled every interval_s. TimeoutError after timeout_s;
    RuntimeError at once if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def stop_process(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM,
                 timeout_s: float = 60.0) -> Optional[int]:
    """Stops one child by its PID: `sig`, a bounded wait, then SIGKILL; closes its pipes."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    return proc.returncode
