"""The learner's full state on disk, with Orbax.

Saved: every param, every optimiser state, log alpha, the RNG key, the SGD step counter (all in
the TrainState), plus the host counters: params version, env steps seen, update calls. Orbax
writes each step into a temporary directory and renames it when complete, so an interrupted save
is never the one restored; `latest_step` only lists finished ones.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from crl.learning import TrainState, copy_tree

log = logging.getLogger("crl.learner.checkpoint")


def _nonfinite_leaves(tree) -> list:
    """Paths of the float leaves of `tree` holding NaN or Inf."""
    import numpy as np
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


class LearnerCheckpointer:
    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def save(self, step: int, state: TrainState, counters: Dict[str, int],
             wait: bool = True) -> None:
        """Saves `step`, replacing one of that number (Orbax would silently keep the old one, with
        its older counters: the final checkpoint can share the step of a periodic one).

        wait=False returns once Orbax holds the arrays on the host (a copy of `state` is taken
        first, so the caller's next update may donate its buffers) and writes the files in the
        background; the next save, restore, wait() or close() waits for them. Until then the
        previous checkpoint is the newest one on disk."""
        self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            self.manager.delete(step)
        if not wait:
            state = copy_tree(state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            counters=ocp.args.JsonSave({k: int(v) for k, v in counters.items()})))
        if wait:
            self.manager.wait_until_finished()

    def wait(self) -> None:
        """Waits for a save started with wait=False."""
        self.manager.wait_until_finished()

    # The params-version floor: a tiny file beside the steps (Orbax ignores it) holding the
    # lowest version the next start may publish, so that a learner crashing again before its
    # first checkpoint never reuses the versions of its previous start (learner/role.py).
    FLOOR_FILE = "params_version_floor.json"

    def version_floor(self) -> int:
        try:
            with open(os.path.join(self.directory, self.FLOOR_FILE)) as f:
                return int(json.load(f)["next_version"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("unreadable %s (%s); ignoring it", self.FLOOR_FILE, e)
            return 0

    def set_version_floor(self, version: int) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, self.FLOOR_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"next_version": int(version)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, template: TrainState) -> Optional[Tuple[TrainState, Dict[str, int]]]:
        """The newest readable checkpoint as (TrainState, counters), or None if there is none.

        A checkpoint that fails to load (corrupted on disk, or written by a different network
        shape) or that loads with a NaN/Inf in any float array (bytes overwritten on disk decode
        without an error) is logged and skipped for the previous one; if none loads, the error of the
        newest is raised, naming the directory.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as e:   # noqa: BLE001 - a failed background save: older steps remain
            log.error("the last background save in %s failed (%s: %s); restoring from the steps "
                      "on disk", self.directory, type(e).__name__, str(e)[:300])
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template._asdict())
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), counters=ocp.args.JsonRestore()))
            except Exception as e:   # orbax raises several types for unreadable data
                log.error("learner checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                          self.directory, step, type(e).__name__, str(e)[:300])
                errors.append((step, e))
                continue
            bad = _nonfinite_leaves(restored["state"])
            if bad:   # bytes overwritten on disk decode without error; NaN params never train
                log.error("learner checkpoint %s/%d holds non-finite values in %s; trying the "
                          "previous one", self.directory, step, ", ".join(bad[:4]))
                errors.append((step, ValueError(f"non-finite values in {bad[:4]}")))
                continue
            counters = {k: int(v) for k, v in restored["counters"].items()}
            return TrainState(**restored["state"]), counters
        if errors:
            step, e = errors[0]
            raise RuntimeError(f"no readable learner checkpoint in {self.directory} (newest: step "
                               f"{step}: {type(e).__name__}: {e}); move the directory away to "
                               "start fresh, or point learner.checkpoint_dir elsewhere") from e
        return None

    def close(self) -> None:
        self.manager.close()
