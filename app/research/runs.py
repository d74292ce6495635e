"""Run directories as the research tools read and write them.

A run directory holds `config.yaml` (the resolved config) and an evaluation history: `history.jsonl`
(written by `crl train` and `crl sweep`: one row per evaluation with `env_steps`, `time_at_goal`,
...) or `eval.jsonl` (written by the evaluator role of `crl local` / the cluster: `params_version`,
`time_at_goal`, ...). `crl sweep` also writes `params.npz` (final actor and critic params, see
save_params) and `result.json` (status, wall time). A sweep directory holds one run directory per
grid point under `runs/`, plus `sweep.json`.

No JAX here: params are stored as flat numpy arrays keyed by their path in the params tree.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from crl import config as C

PARAMS_FILE = "params.npz"
META_KEY = "__meta__"


# ----------------------------------------------------------------------------------- params
def flatten_tree(tree: Any, prefix: str = "") -> Dict[str, np.ndarray]:
    """Nested dicts of arrays -> {"a/b/c": np.ndarray}."""
    out: Dict[str, np.ndarray] = {}
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            out.update(flatten_tree(v, f"{prefix}{k}/"))
    else:
        out[prefix.rstrip("/")] = np.asarray(tree)
    return out


def save_params(path: str, actor_params: Any, critic_params: Any,
                meta: Optional[Dict[str, Any]] = None) -> None:
    """Writes {"actor": ..., "critic": ...} params (any nested dicts of arrays) to one .npz."""
    flat = flatten_tree({"actor": actor_params, "critic": critic_params})
    flat[META_KEY] = np.frombuffer(json.dumps(meta or {}).encode(), dtype=np.uint8)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **flat)
    os.replace(tmp, path)


def load_params(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(actor_params, critic_params, meta) as nested dicts of numpy arrays."""
    with np.load(path) as z:
        flat = {k: z[k] for k in z.files}
    meta = json.loads(flat.pop(META_KEY).tobytes().decode()) if META_KEY in flat else {}
    from params.wire import unflatten
    tree = unflatten(list(flat), list(flat.values()))
    return tree["actor"], tree["critic"], meta


# ----------------------------------------------------------------------------------- runs
def read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass          # a line cut by a crash: skip it
    return rows


def load_history(run_dir: str) -> List[Dict[str, Any]]:
    """Evaluation rows of a run, oldest first; [] when the run has none yet."""
    for name in ("history.jsonl", "eval.jsonl"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return read_jsonl(path)
    return []


def history_x(row: Dict[str, Any], index: int) -> Tuple[str, float]:
    """(x-axis name, value) of an evaluation row: env steps when known, else params version."""
    if "env_steps" in row:
        return "env steps", float(row["env_steps"])
    if "params_version" in row:
        return "params version", float(row["params_version"])
    return "evaluation", float(index)


def load_config(run_dir: str) -> C.Config:
    """The run's resolved config (its config.yaml), validated."""
    return C.load(os.path.join(run_dir, "config.yaml"))


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return default


def natural_key(text: str):
    """'d16' after 'd4': digit runs compare as numbers."""
    import re
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def find_runs(root: str) -> List[str]:
    """Run directories under root: root itself if it holds config.yaml, else every directory up
    to three levels below that does (a sweep's runs/<point>/ included), sorted."""
    if os.path.exists(os.path.join(root, "config.yaml")):
        return [root]
    found = []
    base_depth = root.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if dirpath.count(os.sep) - base_depth >= 3:
            dirnames[:] = []
        if "config.yaml" in filenames and dirpath != root:
            found.append(dirpath)
            dirnames[:] = []
    return sorted(found, key=natural_key)
