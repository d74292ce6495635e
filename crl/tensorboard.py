"""TensorBoard event files of a run: <run_dir>/tb/<role>, every scalar with env steps as step.

Env steps are the paper's x axis, so curves of `crl train`, `crl local`, a cluster run and a
sweep point overlay in one TensorBoard (`tensorboard --logdir runs/`). Written with
tensorboardX (already pulled in by Brax; no TensorFlow needed by the writer), which appends
from a background thread and flushes every `flush_s` seconds and at close. A role that cannot
write (disk full, read-only volume) logs it once and goes on: curves are a view, not state.
With run.wandb = "offline" | "online" the same scalars also go to Weights & Biases
(crl/wandb_sink.py), one more sink behind the same `write`.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

log = logging.getLogger("crl.tensorboard")


def logdir(run_dir: str, role: str) -> str:
    return os.path.join(run_dir, "tb", role)


class _EventFiles:
    """TensorBoard sink: tensorboardX's writer (a background thread; flushes every flush_s)."""

    def __init__(self, path: str, flush_s: float):
        from tensorboardX import SummaryWriter
        os.makedirs(path, exist_ok=True)
        self._writer = SummaryWriter(path, flush_secs=max(1, int(flush_s)))

    def add(self, step: int, scalars: Dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class ScalarWriter:
    """Scalars of one role. `write(env_steps, {tag: value})`; non-numbers and NaN are skipped.

    Sinks: TensorBoard event files always, Weights & Biases when the run asks for it
    (ScalarWriter.for_run, run.wandb). A sink that fails is logged once and dropped; the others
    and the role go on."""

    def __init__(self, run_dir: str, role: str, flush_s: float = 10.0,
                 wandb: Optional[Mapping[str, Any]] = None):
        """wandb: keyword arguments of crl.wandb_sink.WandbSink (mode, project, entity,
        config), or None for TensorBoard only."""
        self.path = logdir(run_dir, role)
        self._sinks: List[Tuple[str, Any]] = []
        self._add_sink("TensorBoard events in " + self.path,
                       lambda: _EventFiles(self.path, flush_s))
        if wandb is not None:
            from crl.wandb_sink import WandbSink
            self._add_sink(f"W&B ({wandb.get('mode')}) of {role}",
                           lambda: WandbSink(run_dir, role, **wandb))

    @classmethod
    def for_run(cls, cfg, role: str, flush_s: float = 10.0) -> "ScalarWriter":
        """The writer of `role` in run `cfg` (a crl.config.Config): W&B too unless
        cfg.run.wandb is "off"."""
        run = cfg.run
        wandb = None
        if run.wandb != "off":
            import dataclasses
            wandb = {"mode": run.wandb, "project": run.wandb_project,
                     "entity": run.wandb_entity, "config": dataclasses.asdict(cfg)}
        return cls(run.run_dir, role, flush_s, wandb=wandb)

    def _add_sink(self, name: str, make) -> None:
        try:
            self._sinks.append((name, make()))
        except Exception as e:   # noqa: BLE001 - a view must never stop a role
            self._fail(name, e)

    def _fail(self, name: str, e: BaseException) -> None:
        log.warning("%s not written (%s: %s); training goes on", name, type(e).__name__, e)
        self._sinks = [(n, s) for n, s in self._sinks if n != name]

    def _each(self, call) -> None:
        for name, sink in list(self._sinks):
            try:
                call(sink)
            except Exception as e:   # noqa: BLE001
                self._fail(name, e)

    def write(self, env_steps: int, scalars: Mapping[str, object], prefix: str = "") -> None:
        if not self._sinks:
            return
        clean = {f"{prefix}{tag}": float(value) for tag, value in scalars.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)
                 and math.isfinite(value)}
        if clean:
            self._each(lambda sink: sink.add(int(env_steps), clean))

    def flush(self) -> None:
        self._each(lambda sink: sink.flush())

    def close(self) -> None:
        self._each(lambda sink: sink.close())
        self._sinks = []


def read_scalars(path: str) -> Dict[str, list]:
    """{tag: [(step, value)]} of the event files under `path` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
