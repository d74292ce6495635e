"""Weights & Biases sink of crl.tensorboard.ScalarWriter (run.wandb = "offline" | "online").

One W&B run per role (learner, evaluator, driver), grouped by the run directory's name, with
the run's whole config; every scalar is logged at step = env steps, as in TensorBoard. Offline
mode needs no network or account: the run lands in <run_dir>/wandb/offline-run-*/ and
`wandb sync <that dir>` uploads it later. Needs the `wandb` extra (uv sync --frozen --extra
wandb); config validation refuses run.wandb != "off" without it.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

log = logging.getLogger("crl.wandb")

MODES = ("off", "offline", "online")
INSTALL_HINT = "install the extra: uv sync --frozen --extra wandb"


def installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("wandb") is not None


def group_name(run_dir: str) -> str:
    """The W&B group of a run: its directory's name (runs/ant_seed0 -> ant_seed0)."""
    return os.path.basename(os.path.normpath(os.path.abspath(run_dir))) or "crl"


_open_sinks = 0   # W&B runs of this process not yet closed


class WandbSink:
    """add(step, {tag: float}) / flush() / close() onto one W&B run.

    W&B keeps one history row per step and drops rows whose step is below the last one, so a
    step that goes back (it does not in the roles) is skipped here, with one warning."""

    def __init__(self, run_dir: str, role: str, mode: str, project: str, entity: str = "",
                 config: Optional[Mapping[str, Any]] = None):
        if mode not in ("offline", "online"):
            raise ValueError(f"W&B mode {mode!r}: use 'offline' or 'online'")
        if mode == "offline":   # nothing leaves the host, W&B's own crash reports included
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        try:
            import wandb
        except ImportError:
            raise ImportError(f"run.wandb = {mode!r} needs the wandb package: "
                              f"{INSTALL_HINT}") from None
        group = group_name(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        # console="off": W&B does not wrap the role's stdout/stderr (logs stay the role's own);
        # reinit="create_new": several writers in one process (tests, sweeps) are separate runs.
        self._run = wandb.init(
            mode=mode, project=project, entity=entity or None, dir=run_dir, group=group,
            job_type=role, name=f"{group}-{role}", config=dict(config or {}),
            reinit="create_new", settings=wandb.Settings(console="off"))
        self.dir = self._run.dir   # .../wandb/<offline-run-...>/files
        global _open_sinks
        _open_sinks += 1
        self._last_step = -1
        self._warned = False

    def add(self, step: int, scalars: Dict[str, float]) -> None:
        if step < self._last_step:
            if not self._warned:
                log.warning("W&B: step %d after step %d not logged (W&B steps only go forward)",
                            step, self._last_step)
                self._warned = True
            return
        self._last_step = step
        self._run.log(scalars, step=step)

    def flush(self) -> None:
        """Nothing to do: W&B's service writes each row as soon as the next step begins."""

    def close(self) -> None:
        """Finishes the run; the last one of the process also waits for W&B's service to write
        everything out and exit (finish() alone returns before an offline run's file is
        written, and a role may leave with os._exit, which skips W&B's own atexit hook)."""
        global _open_sinks
        self._run.finish()
        _open_sinks -= 1
        if _open_sinks == 0:
            import wandb
            wandb.teardown()


def offline_runs(run_dir: str) -> List[str]:
    """The offline W&B run directories under <run_dir>/wandb, oldest first."""
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))


def read_offline_run(path: str) -> Tuple[Dict[str, str], List[Dict[str, Any]]]:
    """({group, job_type, name, project}, history rows) of one offline run directory, read from
    its run-*.wandb file with W&B's own record reader (the file `wandb sync` uploads)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore
    (records,) = glob.glob(os.path.join(path, "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(records)
    run: Dict[str, str] = {}
    rows: List[Dict[str, Any]] = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = {"group": r.run_group, "job_type": r.job_type, "name": r.display_name,
                   "project": r.project}
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    store.close()
    return run, rows
