"""Ports and child processes on 127.0.0.1, shared by the tests, the benchmarks and the tools
that start real servers: free ports, bounded waits, stop by PID (signal, bounded wait, SIGKILL).
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import Any, Callable, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports (each checked by binding it)."""
    for _ in range(100):
        base = free_port()
        if base + n >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no block of free ports found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
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
