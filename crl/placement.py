"""Where `crl local` puts each role on a machine with GPUs.

Every JAX process left to itself takes 75% of every GPU it sees, so a learner, an evaluator and
N actors started side by side would fight over the same memory. The `gpus` config section
decides instead, and the launcher enforces it per child through the environment JAX reads at
start (CUDA_VISIBLE_DEVICES, XLA_PYTHON_CLIENT_PREALLOCATE, XLA_PYTHON_CLIENT_MEM_FRACTION):

  - replay never sees a GPU (TensorFlow would otherwise map them all);
  - the learner gets the first `gpus.learner` GPUs (its pmap runs over them) and
    `gpus.learner_mem_fraction` of each;
  - the actors and the evaluator are dealt round robin over the other GPUs, each taking an
    equal share of `ROLLOUT_MEMORY` of its GPU (or `gpus.rollout_mem_fraction`); with no GPU
    left they share the learner's GPUs in what the learner leaves (`gpus.share_learner_gpus`),
    or run on the CPU.

`plan(cfg, gpu_ids)` is pure: the dry run prints it and the tests check it without a GPU.
"""
from __future__ import annotations

import math
import os
import subprocess
from typing import Dict, List, Optional, Sequence

from crl.config import local_roles

ROLLOUT_MEMORY = 0.9      # fraction of a GPU the rollout processes on it share, when alone
HEADROOM = 0.05           # what sharing leaves unallocated on a learner's GPU (CUDA contexts)
MIN_SHARED = 0.1          # the least the rollouts may share beside a learner

Env = Dict[str, str]


class PlacementError(ValueError):
    """The `gpus` section cannot be realised on this machine (names the fields)."""


def detect_gpus(environ: Optional[Dict[str, str]] = None) -> List[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what `nvidia-smi -L`
    lists (none without a driver)."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def _cpu() -> Env:
    return {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}


def _gpu(ids: Sequence[str], fraction: float) -> Env:
    fraction = math.floor(fraction * 1000 + 1e-9) / 1000   # rounded down: shares never overflow
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids), "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}"}


def plan(cfg, gpu_ids: Sequence[str]) -> Dict[str, Env]:
    """{role name: environment variables} for replay, learner, evaluator, actor0.. .

    gpu_ids: the GPUs present (detect_gpus()). Raises PlacementError naming the fields when the
    config asks for more than there is or for a split that cannot work."""
    g = cfg.gpus
    count = len(gpu_ids) if g.count < 0 else g.count
    roles = local_roles(cfg)
    rollouts = roles[2:]                  # after replay and the learner: evaluator, actors
    if count == 0:
        return {name: _cpu() for name in roles}
    if count > len(gpu_ids):
        raise PlacementError(f"gpus.count = {g.count}: this machine has {len(gpu_ids)} usable GPU(s)"
                             f" ({','.join(gpu_ids) or 'none'}); lower gpus.count (-1 = all of "
                             "them, 0 = CPU only)")
    if not 1 <= g.learner <= count:
        raise PlacementError(f"gpus.learner = {g.learner}: must be in 1..{count} (the GPUs used)")
    if cfg.learner.num_devices not in (0, g.learner):
        raise PlacementError(f"learner.num_devices = {cfg.learner.num_devices} but gpus.learner = "
                             f"{g.learner}: the learner's pmap runs over the GPUs it is given; set "
                             "learner.num_devices to 0 or to gpus.learner")
    used = list(gpu_ids[:count])
    out: Dict[str, Env] = {"replay": _cpu(),
                           "learner": _gpu(used[:g.learner], g.learner_mem_fraction)}
    rest = used[g.learner:]
    if rest:
        pool, budget = rest, g.rollout_mem_fraction or ROLLOUT_MEMORY
    elif g.share_learner_gpus:
        pool, budget = used[:g.learner], g.rollout_mem_fraction or (
            1.0 - HEADROOM - g.learner_mem_fraction)
        if g.learner_mem_fraction + budget > 1.0 - HEADROOM + 1e-9 or budget < MIN_SHARED:
            raise PlacementError(
                f"gpus.share_learner_gpus = true with gpus.learner_mem_fraction = "
                f"{g.learner_mem_fraction}: nothing is left for the actors and the evaluator on "
                f"the learner's GPUs; lower gpus.learner_mem_fraction (e.g. 0.6)")
    else:
        return {**out, **{name: _cpu() for name in rollouts}}
    per_gpu: Dict[str, List[str]] = {gid: [] for gid in pool}
    for k, name in enumerate(rollouts):
        per_gpu[pool[k % len(pool)]].append(name)
    for gid, names in per_gpu.items():
        share = budget if g.rollout_mem_fraction else budget / max(1, len(names))
        for name in names:
            out[name] = _gpu([gid], share)
    return out


def describe(placement: Dict[str, Env]) -> List[str]:
    """One line per role, as the dry run prints them."""
    lines = []
    for name, env in placement.items():
        ids = env.get("CUDA_VISIBLE_DEVICES", "")
        where = (f"GPU {ids}, {float(env['XLA_PYTHON_CLIENT_MEM_FRACTION']):.0%} of its memory"
                 if ids else "CPU")
        lines.append(f"placement: {name:<10} {where}")
    return lines
