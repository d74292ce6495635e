"""`crl evaluate --checkpoint RUN[@STEP]`: evaluate saved params offline, no learner needed.

The same deterministic episodes the evaluator role runs (crl.rollout.Unroller.evaluate: tanh of
the actor's mean, one episode per env), on the training goal set and, where the env has one, on
its evaluation goal set (the maze's `_eval` layout the authors report). Params come from RUN
as `crl render` and `crl critic-map` read them: params.npz of a sweep point, the newest Orbax
learner checkpoint, RUN@STEP, or RUN@init. Prints one line per goal set and appends a row to
<RUN>/offline_eval.jsonl (or --out).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict

HELP = "evaluate a checkpoint offline"


def evaluate_checkpoint(spec: str, episodes: int = 0, seed: int = 0) -> Dict[str, Any]:
    """{"source", "env", "episodes", "goal_sets": {name: {"time_at_goal", "success"}}}."""
    import jax
    from crl.envs import has_eval_goal_set, make_env
    from crl.networks import CRLNetworks
    from app.research.critic_map import resolve_sources
    from crl.rollout import Unroller
    sources = resolve_sources([spec])
    if len(sources) != 1:
        from crl.config import ConfigError
        raise ConfigError(f"--checkpoint {spec!r} names {len(sources)} runs; give one run "
                          "directory (RUN or RUN@STEP)")
    src = sources[0]
    cfg = src.cfg
    n = episodes or cfg.eval.num_envs
    goal_sets = ["train"] + (["eval"] if has_eval_goal_set(cfg.env.name) else [])
    out: Dict[str, Any] = {"source": src.label, "run_dir": src.run_dir, "kind": src.kind, "env": cfg.env.name,
                           "episodes": n, "seed": seed, "goal_sets": {}}
    for goal_set in goal_sets:
        env = make_env(cfg.env.name, goal_set=goal_set)
        nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
        r = Unroller(env, nets, n, cfg.episode_length).evaluate(jax.random.PRNGKey(seed),
                                                               src.actor)
        out["goal_sets"][goal_set] = {"time_at_goal": float(r["time_at_goal"]),
                                      "success": float(r["success"])}
    return out


def main(spec: str, episodes: int, seed: int, out_path: str = "") -> int:
    t0 = time.time()
    result = evaluate_checkpoint(spec, episodes, seed)
    result["wall_s"] = round(time.time() - t0, 1)
    for name, r in result["goal_sets"].items():
        print(f"[evaluate] {result['source']}: {name} goals: time_at_goal={r['time_at_goal']:.1f}"
              f" success={r['success']:.2f} over {result['episodes']} episodes")
    path = out_path or os.path.join(result["run_dir"], "offline_eval.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"[evaluate] appended to {path}")
    return 0
