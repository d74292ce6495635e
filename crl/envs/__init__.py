"""Registry of goal-conditioned environments (see base.py for the contract).

Importing this module is cheap (no Brax/MuJoCo import): config validation uses ENV_SPECS to check
names; `make_env` imports the implementing module on demand.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, Tuple


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    module: str            # module under crl.envs
    cls: str               # class name in that module
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    episode_length: int = 1000   # the paper's default episode length for this env
    physics: bool = True   # False for the pure-JAX point mass


def _spec(module, cls, episode_length=1000, physics=True, **kwargs) -> EnvSpec:
    return EnvSpec(module, cls, tuple(sorted(kwargs.items())), episode_length, physics)


ENV_SPECS: Dict[str, EnvSpec] = {
    # Pure-JAX point mass in a maze: the environment of learning tests and examples.
    "point_maze_open": _spec("point_maze", "PointMaze", 100, False, maze="open"),
    "point_maze_u": _spec("point_maze", "PointMaze", 100, False, maze="u"),
    "point_maze_u4": _spec("point_maze", "PointMaze", 150, False, maze="u4"),
    "point_maze_big": _spec("point_maze", "PointMaze", 200, False, maze="big"),
    "point_maze_hardest": _spec("point_maze", "PointMaze", 300, False, maze="hardest"),
    # Brax locomotion (spring pipeline).
    "ant": _spec("ant", "Ant"),
    "ant_u4_maze": _spec("ant", "AntMaze", maze="u4"),
    "ant_u5_maze": _spec("ant", "AntMaze", maze="u5"),
    "ant_big_maze": _spec("ant", "AntMaze", maze="big"),
    "ant_hardest_maze": _spec("ant", "AntMaze", maze="hardest"),
    "humanoid": _spec("humanoid", "Humanoid"),
    "humanoid_u_maze": _spec("humanoid", "HumanoidMaze", maze="u"),
    "humanoid_big_maze": _spec("humanoid", "HumanoidMaze", maze="big"),
    # Manipulation (MJX), arm built from primitives.
    "arm_push_easy": _spec("arm", "ArmPush", hard=False),
    "arm_push_hard": _spec("arm", "ArmPush", hard=True),
    "arm_binpick_hard": _spec("arm", "ArmBinpick", hard=True),
}


def env_names():
    return sorted(ENV_SPECS)


def make_env(name: str, *, far_goals: bool = False, **overrides):
    """Builds the raw (unwrapped, single) environment `name`.

    far_goals: the evaluation variant of the paper (goals sampled far from the start).
    """
    if name not in ENV_SPECS:
        raise ValueError(f"unknown env {name!r}; choose one of {env_names()}")
    spec = ENV_SPECS[name]
    module = importlib.import_module(f"crl.envs.{spec.module}")
    kwargs = dict(spec.kwargs)
    kwargs.update(overrides)
    return getattr(module, spec.cls)(far_goals=far_goals, **kwargs)
