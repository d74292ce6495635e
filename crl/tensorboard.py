"""TensorBoard event files of a run: <run_dir>/tb/<role>, every scalar with env steps as step.

Env steps are the paper's x axis, so curves of `crl train`, `crl local`, a cluster run and a
sweep point overlay in one TensorBoard (`tensorboard --logdir runs/`). Written with
tensorboardX (already pulled in by Brax; no TensorFlow needed by the writer), which appends
from a background thread and flushes every `flush_s` seconds and at close. A role that cannot
write (disk full, read-only volume) logs it once and goes on: curves are a view, not state.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Mapping, Optional

log = logging.getLogger("crl.tensorboard")


def logdir(run_dir: str, role: str) -> str:
    return os.path.join(run_dir, "tb", role)


class ScalarWriter:
    """Scalars of one role. `write(env_steps, {tag: value})`; non-numbers and NaN are skipped."""

    def __init__(self, run_dir: str, role: str, flush_s: float = 10.0):
        self.path = logdir(run_dir, role)
        self._writer = None
        self._failed = False
        try:
            from tensorboardX import SummaryWriter
            os.makedirs(self.path, exist_ok=True)
            self._writer = SummaryWriter(self.path, flush_secs=max(1, int(flush_s)))
        except Exception as e:   # noqa: BLE001 - a view must never stop a role
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if not self._failed:
            log.warning("TensorBoard events in %s not written (%s: %s); training goes on",
                        self.path, type(e).__name__, e)
        self._failed = True
        self._writer = None

    def write(self, env_steps: int, scalars: Mapping[str, object], prefix: str = "") -> None:
        if self._writer is None:
            return
        try:
            for tag, value in scalars.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}{tag}", float(value), int(env_steps))
        except Exception as e:   # noqa: BLE001
            self._fail(e)

    def flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except Exception as e:   # noqa: BLE001
                self._fail(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:   # noqa: BLE001
                self._fail(e)
            self._writer = None


def read_scalars(path: str) -> Dict[str, list]:
    """{tag: [(step, value)]} of the event files under `path` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
