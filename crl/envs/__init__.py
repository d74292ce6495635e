"""Registry of goal-conditioned environments (see base.py for the contract).

Importing this module is cheap (no Brax/MuJoCo import): config validation uses ENV_SPECS to check
names; `make_env` imports the implementing module on demand.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    module: str            # module under crl.envs
    cls: str               # class name in that module
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    episode_length: int = 1000   # the paper's default episode length for this env
    physics: bool = True   # False for the pure-JAX point mass
    # Constructor overrides of the evaluation goal set (make_env(..., goal_set="eval")): the
    # env's `_eval` layout in the authors' code. None: the env has no eval goal set.
    eval_kwargs: Optional[Tuple[Tuple[str, Any], ...]] = None


def _spec(module, cls, episode_length=1000, physics=True, eval_kwargs=None, **kwargs) -> EnvSpec:
    ev = None if eval_kwargs is None else tuple(sorted(eval_kwargs.items()))
    return EnvSpec(module, cls, tuple(sorted(kwargs.items())), episode_length, physics, ev)


ENV_SPECS: Dict[str, EnvSpec] = {
    # Pure-JAX point mass in a maze: the environment of learning tests and examples.
    "point_maze_open": _spec("point_maze", "PointMaze", 100, False, maze="open"),
    "point_maze_u": _spec("point_maze", "PointMaze", 100, False, maze="u"),
    "point_maze_u4": _spec("point_maze", "PointMaze", 150, False, maze="u4"),
    "point_maze_big": _spec("point_maze", "PointMaze", 200, False, maze="big"),
    "point_maze_hardest": _spec("point_maze", "PointMaze", 300, False, maze="hardest"),
    # Brax locomotion (spring pipeline).
    "ant": _spec("ant", "Ant"),
    # Mazes: the authors' layouts; goal_set="eval" = their `_eval` layout (same walls and start,
    # the far goal cells only). Their hardest maze has no eval layout.
    "ant_u4_maze": _spec("ant", "AntMaze", maze="u4", eval_kwargs={"goal_layout": "u4_eval"}),
    "ant_u5_maze": _spec("ant", "AntMaze", maze="u5", eval_kwargs={"goal_layout": "u5_eval"}),
    "ant_big_maze": _spec("ant", "AntMaze", maze="big",
                          eval_kwargs={"goal_layout": "big_eval"}),
    "ant_hardest_maze": _spec("ant", "AntMaze", maze="hardest"),
    "humanoid": _spec("humanoid", "Humanoid"),
    "humanoid_u_maze": _spec("humanoid", "HumanoidMaze", maze="u",
                             eval_kwargs={"goal_layout": "u_eval"}),
    "humanoid_big_maze": _spec("humanoid", "HumanoidMaze", maze="big",
                               eval_kwargs={"goal_layout": "humanoid_big_eval"}),
    # Manipulation (MJX), arm built from primitives.
    "arm_push_easy": _spec("arm", "ArmPush", hard=False),
    "arm_push_hard": _spec("arm", "ArmPush", hard=True),
    "arm_binpick_hard": _spec("arm", "ArmBinpick", hard=True),
}


def env_names():
    return sorted(ENV_SPECS)


def has_eval_goal_set(name: str) -> bool:
    """Whether env `name` has an evaluation goal set (make_env(name, goal_set="eval"))."""
    return ENV_SPECS[name].eval_kwargs is not None


def make_env(name: str, *, far_goals: bool = False, goal_set: str = "train", **overrides):
    """Builds the raw (unwrapped, single) environment `name`.

    far_goals: goals only among the farthest third of the goal set (BFS path in mazes).
    goal_set: "train" (the training goal distribution) or "eval" (the env's `_eval` layout in the
      authors' code, on which their jobs evaluate; ValueError for an env without one).
    """
    if name not in ENV_SPECS:
        raise ValueError(f"unknown env {name!r}; choose one of {env_names()}")
    spec = ENV_SPECS[name]
    if goal_set not in ("train", "eval"):
        raise ValueError(f"goal_set must be 'train' or 'eval', got {goal_set!r}")
    from crl.quiet_mjx import import_mjx
    import_mjx()   # before Brax imports it: without MJX's "Failed to import warp" lines
    module = importlib.import_module(f"crl.envs.{spec.module}")
    kwargs = dict(spec.kwargs)
    if goal_set == "eval":
        if spec.eval_kwargs is None:
            raise ValueError(f"env {name!r} has no eval goal set (goal_set='eval'); envs with "
                             f"one: {[n for n in env_names() if has_eval_goal_set(n)]}")
        kwargs.update(spec.eval_kwargs)
    kwargs.update(overrides)
    return getattr(module, spec.cls)(far_goals=far_goals, **kwargs)
