"""Prometheus helpers shared by the roles: serve /metrics, read another role's /metrics.

Names start with `crl_` and carry their unit (`_seconds`, `_total`, `_bytes`), per DESIGN.md.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.request
from typing import Dict, Optional

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Starts the /metrics HTTP endpoint of this process (a daemon thread)."""
    prometheus_client.start_http_server(port, addr=host)


def parse_metrics(text: str) -> Dict[str, float]:
    """{sample name with labels: value} of a Prometheus text exposition."""
    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(url: str, timeout_s: float = 2.0) -> Dict[str, float]:
    """{sample name with labels: value} of a /metrics endpoint; {} if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse_metrics(resp.read().decode())
    # Not an answer from a role: nobody listening, a half-started server, something else on the
    # port (an HTTP error, a bad status line, a body that is not the text format).
    except (OSError, http.client.HTTPException, UnicodeDecodeError, ValueError):
        return {}


def setup_logging(role: str, level: int = logging.INFO) -> logging.Logger:
    # force: some imports (orbax, TensorFlow) install a root handler at WARNING first, which would
    # silently drop every INFO line of the role.
    logging.basicConfig(level=level, format=f"%(asctime)s {role} %(levelname)s %(message)s",
                        force=True)
    for noisy in ("absl", "orbax", "jax", "tensorflow"):   # dozens of INFO lines per checkpoint
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return logging.getLogger(f"crl.{role}")


class Backoff:
    """Exponential backoff for reconnect loops: 0.1 s doubling to `cap_s`."""

    def __init__(self, cap_s: float = 5.0):
        self.cap_s, self.delay = cap_s, 0.1

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.cap_s)
        return d

    def reset(self) -> None:
        self.delay = 0.1


JAX_ROLES = ("learner", "actor", "evaluator")   # role name prefixes ("actor3")


FINAL_METRICS_DIR = "final_metrics"


def final_metrics_path(run_dir: str, role: str) -> str:
    return os.path.join(run_dir, FINAL_METRICS_DIR, f"{role}.json")


def write_final_metrics(run_dir: str, role: str, log: logging.Logger,
                        registry=prometheus_client.REGISTRY) -> None:
    """Writes <run_dir>/final_metrics/<role>.json = {"pid", "metrics"}: this process's metrics
    once its work is done, so `crl local`'s summary holds what the role did to its end (an
    actor's last flush, made after the launcher's last scrape), not its last scrape. A failed
    write (disk full) is logged, never raised: the role's exit code stays what it was."""
    path = final_metrics_path(run_dir, role)
    tmp = path + ".tmp"
    try:
        metrics = parse_metrics(prometheus_client.generate_latest(registry).decode())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "metrics": metrics}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write %s (%s); a summary will hold this role's last scrape",
                    path, e)


def read_final_metrics(run_dir: str, role: str, pid: int) -> Optional[Dict[str, float]]:
    """The metrics that process `pid` wrote as `role` when it finished; None if it wrote none
    (killed, disk full) or the file is from another process (an earlier life of the role)."""
    try:
        with open(final_metrics_path(run_dir, role)) as f:
            final = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(final, dict) or final.get("pid") != pid:
        return None
    return final.get("metrics")


def run_role(role: str, cfg, args, run_fn) -> int:
    """Common main of a role process: logging, /metrics, SIGTERM/SIGINT -> graceful stop.

    run_fn(stop_event, log) does the work and returns when stop is set. A watchdog ends the
    process if library threads (gRPC, TensorFlow) keep it alive after run_fn returned, so a
    stopped role always exits within a bounded time.
    """
    import signal
    import threading
    log = setup_logging(role)
    serve(metrics_port(cfg, args), cfg.service.host)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    if role.startswith(JAX_ROLES):
        from crl.backend import describe
        log.info("%s", describe())
    code = run_fn(stop, log)
    write_final_metrics(cfg.run.run_dir, role, log)
    log.info("exiting with %d", code)
    logging.shutdown()
    timer = threading.Timer(15.0, lambda: os._exit(code))
    timer.daemon = True
    timer.start()
    return code


def metrics_port(cfg, args, offset: int = 0) -> int:
    port: Optional[int] = getattr(args, "metrics_port", None)
    return port if port is not None else cfg.service.metrics_port + offset
