"""`crl render`: look at evaluation episodes.

Mazes (point mass, ant, humanoid): N deterministic episodes (tanh of the actor's mean, as
evaluation runs them) drawn over the maze from above as trajectories.png and trajectories.svg
(walls dark, one colour per episode: dot = start, ring = the goal's success radius, cross = the
goal), and episodes.gif, the same episodes moving (opens anywhere, no server).
Brax envs (ant, humanoid, their mazes, arms): each episode to episode_K.html, Brax's own viewer
(brax.io.html). That page loads three.js, lil-gui and pako from public CDNs; with
`--offline-viewer` they are served from OUT/viewer/ instead (Brax's viewer modules copied from
the installed brax package, the three libraries from `--viewer-assets DIR` or fetched once with
`npm pack` into ~/.cache/crl/brax-viewer), so the page works without internet. Pages with ES
modules must come over http: `python -m http.server -d OUT` and open
http://127.0.0.1:8000/episode_0.html.

Params: RUN (params.npz of `crl sweep`, or the newest Orbax learner checkpoint), RUN@STEP,
RUN@init (untrained), or `--env NAME` alone (untrained, default config).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from crl import config as C

HELP = ("render evaluation episodes: Brax envs to Brax's HTML viewer, point-mass mazes to a "
        "picture of the trajectories (PNG + SVG)")

# The CDN URLs in brax 0.12.5's visualizer/index.html and what replaces each offline.
VIEWER_LIBS = {
    "three.module.js": ("three@0.150.1", "package/build/three.module.js"),
    "three-addons/controls/OrbitControls.js": ("three@0.150.1",
                                               "package/examples/jsm/controls/OrbitControls.js"),
    "lil-gui.esm.js": ("lil-gui@0.18.0", "package/dist/lil-gui.esm.js"),
    "pako.min.js": ("pako@2.1.0", "package/dist/pako.min.js"),
}
CDN_REWRITES = [
    ("https://unpkg.com/three@0.150.1/build/three.module.js", "./viewer/three.module.js"),
    ("https://unpkg.com/three@0.150.1/examples/jsm/", "./viewer/three-addons/"),
    ("https://cdn.jsdelivr.net/npm/lil-gui@0.18.0/+esm", "./viewer/lil-gui.esm.js"),
    ("https://unpkg.com/pako@2.1.0/dist/pako.min.js", "./viewer/pako.min.js"),
]
SHIMS = '<script async src="https://unpkg.com/es-module-shims@1.6.3/dist/es-module-shims.js"></script>'
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "crl", "brax-viewer")


# ----------------------------------------------------------------------------- episodes
def run_episodes(env, nets, actor_params, key, num: int, steps: int, keep_pipeline: bool,
                 goal_xy: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """num deterministic episodes of `steps` steps (stopping at termination). Returns numpy
    {"goal_pos" [E, T+1, g], "goal" [E, g], "success" [E, T], "alive" [E, T+1]} plus, with
    keep_pipeline, "pipeline" (the stacked pipeline states [E, T+1, ...], for Brax's viewer)."""
    import jax
    import jax.numpy as jnp
    from crl.networks import deterministic_action

    gi = jnp.asarray(env.goal_indices)
    S = env.state_dim

    def one(k):
        state = env.reset(k)
        if goal_xy is not None:     # point mass: the goal lives in pipeline_state.goal
            g = jnp.asarray(goal_xy, jnp.float32)
            state = state.replace(pipeline_state=state.pipeline_state.replace(goal=g),
                                  obs=state.obs.at[S:].set(g))

        def step(carry, _):
            st, alive = carry
            mean, _ = nets.policy(actor_params, st.obs[None])
            nxt = env.step(st, deterministic_action(mean)[0])
            rec = {"pos": nxt.obs[:S][gi], "success": nxt.metrics["success"] * alive}
            if keep_pipeline:
                rec["pipeline"] = nxt.pipeline_state
            return (nxt, alive * (1.0 - nxt.done)), (rec, alive * (1.0 - nxt.done))

        (_, _), (rec, alive) = jax.lax.scan(step, (state, jnp.float32(1.0)), None, length=steps)
        first = state.obs[:S][gi]
        out = {"goal_pos": jnp.concatenate([first[None], rec["pos"]], 0),
               "goal": state.obs[S:], "success": rec["success"],
               "alive": jnp.concatenate([jnp.ones(1), alive], 0)}
        if keep_pipeline:
            out["pipeline"] = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([a[None], b], 0), state.pipeline_state,
                rec["pipeline"])
        return out

    run = jax.jit(jax.vmap(one))
    res = run(jax.random.split(key, num))
    out = {k: np.asarray(v) for k, v in res.items() if k != "pipeline"}
    if keep_pipeline:
        out["pipeline"] = res["pipeline"]
    return out


def episode_summaries(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for e in range(res["success"].shape[0]):
        alive = res["alive"][e] > 0.5
        length = int(alive.sum())          # states up to and including the terminal one
        out.append({"time_at_goal": float(res["success"][e].sum()),
                    "success": bool(res["success"][e].max() > 0),
                    "steps": int(min(length, res["success"].shape[1])),
                    "goal": [float(v) for v in res["goal"][e]]})
    return out


# ----------------------------------------------------------------------------- Brax viewer
def fetch_viewer_assets(cache_dir: str = DEFAULT_CACHE) -> str:
    """Puts three.js 0.150.1, lil-gui 0.18.0 and pako 2.1.0 (the versions Brax's viewer names)
    into cache_dir with `npm pack` (npm registry); returns cache_dir. Does nothing if present."""
    if all(os.path.exists(os.path.join(cache_dir, f)) for f in VIEWER_LIBS):
        return cache_dir
    if shutil.which("npm") is None:
        raise C.ConfigError("npm is needed to fetch the viewer's libraries (or pass "
                           "--viewer-assets DIR holding " + ", ".join(VIEWER_LIBS) + ")")
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        packages = sorted({pkg for pkg, _ in VIEWER_LIBS.values()})
        proc = subprocess.run(["npm", "pack", "--silent", *packages], cwd=tmp,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise C.ConfigError(f"npm pack failed: {proc.stderr.strip()[-500:]}")
        for dest, (pkg, member) in VIEWER_LIBS.items():
            name, _, version = pkg.rpartition("@")
            tgz = os.path.join(tmp, f"{name}-{version}.tgz")
            with tarfile.open(tgz) as tf:
                data = tf.extractfile(member).read()
            path = os.path.join(cache_dir, dest)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    return cache_dir


def install_offline_viewer(out_dir: str, assets_dir: str) -> None:
    """OUT/viewer/: Brax's viewer modules (from the installed brax) + the three libraries."""
    import brax
    viewer = os.path.join(out_dir, "viewer")
    src_js = os.path.join(os.path.dirname(brax.__file__), "visualizer", "js")
    shutil.copytree(src_js, os.path.join(viewer, "brax"), dirs_exist_ok=True)
    for dest in VIEWER_LIBS:
        src = os.path.join(assets_dir, dest)
        if not os.path.exists(src):
            raise C.ConfigError(f"{src} is missing (the viewer needs {', '.join(VIEWER_LIBS)})")
        os.makedirs(os.path.dirname(os.path.join(viewer, dest)), exist_ok=True)
        shutil.copy2(src, os.path.join(viewer, dest))


def offline_html(html: str) -> str:
    """Points Brax's page at viewer/ instead of the CDNs; fails loudly if the template changed."""
    for url, local in CDN_REWRITES:
        if url not in html:
            raise RuntimeError(f"Brax's viewer page no longer names {url}; update CDN_REWRITES")
        html = html.replace(url, local)
    return html.replace(SHIMS, "")


def brax_html(env, pipeline, episode: int, length: int, offline: bool) -> str:
    import jax
    from brax.io import html as brax_html_io
    states = [jax.tree_util.tree_map(lambda x: x[episode, t], pipeline) for t in range(length)]
    page = brax_html_io.render(env.sys, states, height="100vh", colab=False,
                               base_url="./viewer/brax/viewer.js" if offline else None)
    return offline_html(page) if offline else page


# ----------------------------------------------------------------------------- point maze
def maze_pictures(env, res: Dict[str, Any], out_dir: str, title: str) -> List[str]:
    """Top-down pictures of a maze env's episodes (point mass, ant or humanoid: x, y of the goal
    slice): trajectories.png / .svg, and episodes.gif, the episodes moving."""
    from crl.envs import mazes
    from app.research import plot
    frame = plot.MazeFrame(mazes.grid(env.maze), mazes.start_cell(env.maze), env.cell_size,
                           cell_px=80 if max(mazes.grid(env.maze).shape) <= 6 else 48)
    eps, moving = [], []
    for e, summary in enumerate(episode_summaries(res)):
        xy = res["goal_pos"][e][:, :2]
        ep = {"goal": res["goal"][e][:2], "success": summary["success"],
              "goal_radius": env.goal_reach_thresh}
        eps.append(dict(ep, xy=xy[: summary["steps"] + 1]))
        # An episode that ended early stays where it ended in the animation.
        held = np.concatenate([xy[: summary["steps"] + 1],
                               np.repeat(xy[summary["steps"]: summary["steps"] + 1],
                                         len(xy) - summary["steps"] - 1, 0)])
        moving.append(dict(ep, xy=held))
    png = os.path.join(out_dir, "trajectories.png")
    svg = os.path.join(out_dir, "trajectories.svg")
    plot.maze_trajectories_png(frame, eps, title).save(png)
    with open(svg, "w") as f:
        f.write(plot.maze_trajectories_svg(frame, eps, title))
    gif = plot.maze_animation_gif(frame, moving, os.path.join(out_dir, "episodes.gif"), title)
    return [png, svg, gif]


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None, metavar="RUN[@STEP|@init]",
                   help="run directory with params (sweep params.npz or Orbax checkpoints)")
    p.add_argument("--env", default=None,
                   help="without RUN: render an untrained policy on this env (default config)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes (default: 8 for point mazes, 1 for Brax envs)")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per episode (default: the run's episode length)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes' starts and goals")
    p.add_argument("--goal", default=None, metavar="ROW,COL",
                   help="point-mass mazes: put every episode's goal at this cell's centre")
    p.add_argument("--offline-viewer", action="store_true",
                   help="Brax envs: serve the viewer's JavaScript from OUT/viewer/ (no CDN)")
    p.add_argument("--viewer-assets", default=None, metavar="DIR",
                   help="directory holding the viewer's libraries (default: fetched with npm "
                        f"into {DEFAULT_CACHE})")


def _params(args):
    from app.research.critic_map import _init_params, resolve_sources
    if args.run:
        src = resolve_sources([args.run])[0]
        return src.cfg, src.actor, src.critic, src.label
    if not args.env:
        raise C.ConfigError("give a RUN directory or --env NAME")
    from crl.envs import ENV_SPECS
    if args.env not in ENV_SPECS:
        raise C.ConfigError(f"--env {args.env!r}: unknown env; choose one of {sorted(ENV_SPECS)}")
    cfg = C.override(C.Config(), {"env.name": args.env})   # only env and networks are used
    a, c = _init_params(cfg, args.seed)
    return cfg, a, c, f"{args.env} (untrained)"


def main(args) -> int:
    import jax
    from crl.envs import make_env
    from crl.networks import CRLNetworks

    cfg, actor, critic, label = _params(args)
    env = make_env(cfg.env.name)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    steps = args.steps or cfg.episode_length
    os.makedirs(args.out, exist_ok=True)
    is_point = not hasattr(env, "sys")
    num = args.episodes or (8 if is_point else 1)
    goal_xy = None
    if args.goal:
        if not is_point:
            raise C.ConfigError("--goal is supported for point-mass mazes only")
        from crl.envs import mazes
        i, j = (int(v) for v in args.goal.split(","))
        if mazes.grid(env.maze)[i, j]:
            raise C.ConfigError(f"--goal {args.goal}: a wall of maze {env.maze!r}")
        i0, j0 = mazes.start_cell(env.maze)
        goal_xy = np.array([(i - i0) * env.cell_size, (j - j0) * env.cell_size], np.float32)
    if args.offline_viewer and not is_point:     # before the (slow) episodes: fail early
        install_offline_viewer(args.out, args.viewer_assets or fetch_viewer_assets())
    res = run_episodes(env, nets, actor, jax.random.PRNGKey(args.seed), num, steps,
                       keep_pipeline=not is_point, goal_xy=goal_xy)
    summaries = episode_summaries(res)
    files: List[str] = []
    if hasattr(env, "maze"):   # top-down pictures and an animation of every maze env
        tag = sum(s["time_at_goal"] for s in summaries) / len(summaries)
        files += maze_pictures(env, res, args.out,
                               f"{label}\n{num} episodes: mean time at goal {tag:.1f} / {steps}")
    if not is_point:
        for e, s in enumerate(summaries):
            path = os.path.join(args.out, f"episode_{e}.html")
            with open(path, "w") as f:
                f.write(brax_html(env, res["pipeline"], e, s["steps"] + 1, args.offline_viewer))
            files.append(path)
    with open(os.path.join(args.out, "episodes.json"), "w") as f:
        json.dump({"source": label, "env": cfg.env.name, "episodes": summaries}, f, indent=1)
    for s_i, s in enumerate(summaries):
        print(f"[render] episode {s_i}: time_at_goal={s['time_at_goal']:.0f} "
              f"success={s['success']} steps={s['steps']}")
    print("[render] wrote " + ", ".join(files))
    if not is_point:
        print(f"[render] view: python -m http.server -d {args.out} 8000, then open "
              f"http://127.0.0.1:8000/episode_0.html" if args.offline_viewer else
              "[render] open the HTML in a browser with internet access (the viewer loads "
              "three.js from a CDN; --offline-viewer serves it locally)")
    return 0
