"""The run's finished marker, `<run_dir>/finished.json`: the learner writes it at its budget
(after its final checkpoint and the final params version with progress finished=1); the
launcher and a restarted learner read it. One JSON record: env_steps, sgd_steps,
budget_env_steps, params_version, time."""
from __future__ import annotations

import json
import os
from typing import Optional

MARKER_FILE = "finished.json"


def marker_path(run_dir: str) -> str:
    return os.path.join(run_dir, MARKER_FILE)


def write_marker(path: str, record: dict) -> None:
    """Writes the run's finished marker atomically (temp file, fsync, rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(path: str) -> Optional[dict]:
    """The finished marker's record, or None if there is none (or it is unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
