"""`crl critic-map`: what the critic learned about a maze.

For a goal g (default: the free cell farthest from the start by path), the learned distance
d(s, g) = ||phi(s, a) - psi(g)|| is evaluated at `--per-cell` x `--per-cell` points in every free
cell of the maze (s = the point at rest; for the ant, the default pose moved there) and drawn as a
heatmap with the walls, one panel per run / checkpoint side by side. The action a is, by default,
the best of 9 probes (zero and 8 unit directions for the point mass: d = min_a ||phi(s,a) - psi(g)||,
i.e. the value of the best action); `--action policy|zero|mean` changes that.

Numbers (Spearman rank correlation over the points of the free cells):
  rho_path: learned distance vs. the true shortest-path distance (8-connected Dijkstra on the
    same fine grid, no corner cutting: the maze's geodesic distance at 1/per_cell cell resolution),
  rho_line: learned distance vs. the straight-line (Euclidean) distance, which ignores walls,
  agree_path: over the pairs of points that path and straight line order differently (p is
    nearer than q by line but farther by path), the fraction the critic orders as the path does
    (1 = the critic follows the maze's topology, 0 = it follows the straight line),
  the same three averaged over every free cell as the goal ("all goals"), and cell-level
  correlations (per-cell mean learned distance vs. BFS cell distance / cell-centre line distance).
The paper's finding: shallow critics track the straight line, deep ones the path.

Params: a run directory of `crl sweep` (params.npz), a `crl local` / cluster run (Orbax learner
checkpoints: RUN@STEP for one step, RUN@all for every kept step), RUN@init (that run's config,
freshly initialised: the untrained baseline), or a sweep directory (all its runs; one heatmap per
setting, numbers for every seed).
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crl import config as C
from app.research import runs as R

HELP = ("heatmap of the learned distance ||phi(s,a) - psi(g)|| over a maze for a goal (several "
        "runs/checkpoints side by side) and its rank correlation with the shortest-path and "
        "straight-line distances")


# ----------------------------------------------------------------------------- statistics
def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side
    is constant or there are fewer than 3 points."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def path_agreement(learned: np.ndarray, path: np.ndarray, line: np.ndarray,
                   max_points: int = 1500, seed: int = 0) -> float:
    """Over pairs (p, q) that path and line distance order oppositely, the fraction the learned
    distance orders as the path does (ties count half). NaN when no pair disagrees."""
    learned, path, line = (np.asarray(x, np.float64).ravel() for x in (learned, path, line))
    if len(learned) > max_points:
        idx = np.random.default_rng(seed).choice(len(learned), max_points, replace=False)
        learned, path, line = learned[idx], path[idx], line[idx]
    dp = np.sign(path[:, None] - path[None, :])
    dl = np.sign(line[:, None] - line[None, :])
    conflict = (dp * dl) < 0
    conflict = np.triu(conflict, 1)
    if not conflict.any():
        return float("nan")
    dd = np.sign(learned[:, None] - learned[None, :])[conflict]
    dp = dp[conflict]
    return float(np.mean(np.where(dd == dp, 1.0, np.where(dd == 0, 0.5, 0.0))))


# ----------------------------------------------------------------------------- maze geometry
class MazeGrid:
    """Sample points of a maze at per_cell x per_cell points per cell, and their distances.

    Fine grid index (r, c) covers cell (r // k, c // k); its point is at layout coordinates
    (r + 0.5) / k, (c + 0.5) / k cells, i.e. world x = ((r + 0.5) / k - 0.5 - i_R) * cell_size
    (crl.envs.mazes: row i is world x, column j world y, start-cell centre at the origin).
    """

    def __init__(self, maze: str, cell_size: float, per_cell: int = 8):
        from crl.envs import mazes
        self.maze, self.cell_size, self.k = maze, float(cell_size), int(per_cell)
        self.grid = mazes.grid(maze)
        self.start = mazes.start_cell(maze)
        k = self.k
        self.walls = np.kron(self.grid, np.ones((k, k), bool))       # [R*k, C*k]
        self.shape = self.walls.shape
        rr, cc = np.meshgrid(np.arange(self.shape[0]), np.arange(self.shape[1]), indexing="ij")
        i0, j0 = self.start
        self.xy = np.stack([((rr + 0.5) / k - 0.5 - i0) * self.cell_size,
                            ((cc + 0.5) / k - 0.5 - j0) * self.cell_size], -1).astype(np.float32)
        self.free = ~self.walls
        self.free_idx = np.argwhere(self.free)                       # [N, 2] fine (r, c)
        self.points = self.xy[self.free]                             # [N, 2] world

    def cell_centre(self, cell: Tuple[int, int]) -> np.ndarray:
        i0, j0 = self.start
        return np.array([(cell[0] - i0) * self.cell_size, (cell[1] - j0) * self.cell_size],
                        np.float32)

    def geodesic(self, goal_xy: np.ndarray) -> np.ndarray:
        """World shortest-path distance from goal_xy to every fine point (inf for walls).

        Every free point of the goal's cell starts at its straight-line distance to the goal (a
        cell is convex and free: nothing blocks the line), then Dijkstra on the fine grid,
        8-connected, a diagonal step only when both side points are free (no corner cutting)."""
        goal_xy = np.asarray(goal_xy, np.float64)
        i0, j0 = self.start
        cell = (int(round(goal_xy[0] / self.cell_size + i0)),
                int(round(goal_xy[1] / self.cell_size + j0)))
        if not (0 <= cell[0] < self.grid.shape[0] and 0 <= cell[1] < self.grid.shape[1]) \
                or self.grid[cell]:
            raise ValueError(f"goal {tuple(goal_xy)} is not in a free cell")
        R_, C_ = self.shape
        k = self.k
        dist = np.full(self.shape, np.inf)
        heap = []
        for r in range(cell[0] * k, cell[0] * k + k):
            for c in range(cell[1] * k, cell[1] * k + k):
                dist[r, c] = float(np.linalg.norm(self.xy[r, c] - goal_xy))
                heap.append((dist[r, c], (r, c)))
        heapq.heapify(heap)
        step = self.cell_size / k
        moves = [(1, 0, 1.0), (-1, 0, 1.0), (0, 1, 1.0), (0, -1, 1.0),
                 (1, 1, math.sqrt(2)), (1, -1, math.sqrt(2)), (-1, 1, math.sqrt(2)),
                 (-1, -1, math.sqrt(2))]
        free = self.free
        while heap:
            d, (r, c) = heapq.heappop(heap)
            if d > dist[r, c]:
                continue
            for dr, dc, w in moves:
                nr, nc = r + dr, c + dc
                if not (0 <= nr < R_ and 0 <= nc < C_) or not free[nr, nc]:
                    continue
                if dr and dc and not (free[r + dr, c] and free[r, c + dc]):
                    continue
                nd = d + w * step
                if nd < dist[nr, nc]:
                    dist[nr, nc] = nd
                    heapq.heappush(heap, (nd, (nr, nc)))
        return dist

    def line(self, goal_xy: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self.xy.astype(np.float64) - np.asarray(goal_xy, np.float64), axis=-1)

    def to_image(self, values_free: np.ndarray) -> np.ndarray:
        """[N] values at the free points -> [R*k, C*k] with NaN at walls."""
        img = np.full(self.shape, np.nan)
        img[self.free] = values_free
        return img


def default_goal_cell(maze: str) -> Tuple[int, int]:
    """The free cell farthest from the start by BFS path (first in row-major order on ties)."""
    from crl.envs import mazes
    d = mazes.shortest_path_cells(maze, mazes.start_cell(maze))
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(i), int(j)


def correlations(learned_free: np.ndarray, mg: MazeGrid, goal_cell: Tuple[int, int],
                 goal_xy: Optional[np.ndarray] = None) -> Dict[str, float]:
    """rho_path, rho_line, agree_path on fine points and the cell-level rhos, for one goal.
    learned_free: [N] learned distance at mg.points."""
    from crl.envs import mazes
    goal_xy = mg.cell_centre(goal_cell) if goal_xy is None else np.asarray(goal_xy, np.float32)
    path = mg.geodesic(goal_xy)[mg.free]
    line = mg.line(goal_xy)[mg.free]
    out = {"rho_path": spearman(learned_free, path), "rho_line": spearman(learned_free, line),
           "agree_path": path_agreement(learned_free, path, line),
           "rho_path_line": spearman(path, line)}
    # Cell level: mean learned distance per free cell vs BFS cell distance / centre distance.
    cells = mazes.free_cells(mg.maze)
    bfs = mazes.shortest_path_cells(mg.maze, goal_cell)
    cell_of = mg.free_idx // mg.k
    per_cell = np.array([learned_free[(cell_of[:, 0] == i) & (cell_of[:, 1] == j)].mean()
                         for i, j in cells])
    reach = bfs[cells[:, 0], cells[:, 1]] >= 0
    centres = np.stack([mg.cell_centre((i, j)) for i, j in cells])
    out["rho_path_cells"] = spearman(per_cell[reach], bfs[cells[:, 0], cells[:, 1]][reach])
    out["rho_line_cells"] = spearman(per_cell[reach],
                                     np.linalg.norm(centres - goal_xy, axis=-1)[reach])
    return out


# ----------------------------------------------------------------------------- learned distance
def probe_states(env, xy: np.ndarray) -> np.ndarray:
    """States [N, state_dim] with the agent at rest at each (x, y)."""
    xy = np.asarray(xy, np.float32)
    if env.state_dim == 4 and tuple(env.goal_indices) == (0, 1):      # point mass
        return np.concatenate([xy, np.zeros_like(xy)], -1)
    if hasattr(env, "sys") and env.state_dim == 29:                   # ant: default pose, at rest
        q = np.asarray(env.sys.init_q, np.float32)[:15]
        s = np.tile(np.concatenate([q, np.zeros(14, np.float32)]), (len(xy), 1))
        s[:, 0:2] = xy
        return s
    raise ValueError(f"critic-map supports the point-mass and ant mazes, not {type(env).__name__}")


def probe_actions(action_dim: int) -> np.ndarray:
    """Zero and, for 2-d actions, the 8 unit directions; else zero and +-1 on each axis."""
    acts = [np.zeros(action_dim)]
    if action_dim == 2:
        for a in range(8):
            ang = a * math.pi / 4
            acts.append(np.array([math.cos(ang), math.sin(ang)]))
    else:
        for i in range(action_dim):
            for s in (1.0, -1.0):
                e = np.zeros(action_dim)
                e[i] = s
                acts.append(e)
    return np.clip(np.stack(acts), -1, 1).astype(np.float32)


def learned_distances(nets, actor_params, critic_params, states: np.ndarray, goals: np.ndarray,
                      mode: str = "best", chunk: int = 8192) -> np.ndarray:
    """[G, N] learned distance ||phi(s_n, a) - psi(g_g)|| with a chosen per `mode`:
    best (min over probe actions), mean (mean over them), zero, policy (tanh of the actor's mean
    for (s_n, g_g))."""
    import jax
    import jax.numpy as jnp
    from crl.networks import deterministic_action

    states = jnp.asarray(states, jnp.float32)
    goals = jnp.asarray(goals, jnp.float32)
    N, G = states.shape[0], goals.shape[0]
    psi = jax.jit(nets.encode_g)(critic_params, goals)                     # [G, D]
    enc_sa = jax.jit(nets.encode_sa)

    def chunked_phi(s, a):
        outs = [enc_sa(critic_params, s[i:i + chunk], a[i:i + chunk])
                for i in range(0, s.shape[0], chunk)]
        return jnp.concatenate(outs, 0)

    def dist(phi, psi_):   # [..., D] x [..., D] -> [...]
        return jnp.sqrt(jnp.maximum(jnp.sum((phi - psi_) ** 2, -1), 0.0))

    if mode == "policy":
        policy = jax.jit(nets.policy)
        out = []
        for g in range(G):
            obs = jnp.concatenate([states, jnp.broadcast_to(goals[g], (N, goals.shape[1]))], -1)
            mean, _ = policy(actor_params, obs)
            phi = chunked_phi(states, deterministic_action(mean))
            out.append(dist(phi, psi[g][None]))
        return np.asarray(jnp.stack(out))
    acts = probe_actions(nets.action_dim)
    if mode == "zero":
        acts = acts[:1]
    A = acts.shape[0]
    s_rep = jnp.repeat(states, A, axis=0)
    a_rep = jnp.tile(jnp.asarray(acts), (N, 1))
    phi = chunked_phi(s_rep, a_rep).reshape(N, A, -1)                    # [N, A, D]
    d = dist(phi[None], psi[:, None, None, :])                            # [G, N, A]
    if mode in ("best", "zero"):
        return np.asarray(jnp.min(d, -1))
    if mode == "mean":
        return np.asarray(jnp.mean(d, -1))
    raise ValueError(f"unknown action mode {mode!r}; choose best, mean, zero or policy")


# ----------------------------------------------------------------------------- params sources
class Source:
    """One panel's params. kind: "final" (params.npz), "untrained", or "call N" (Orbax step)."""

    def __init__(self, label, run_dir, cfg, actor, critic, kind="final"):
        self.label, self.run_dir, self.cfg = label, run_dir, cfg
        self.actor, self.critic, self.kind = actor, critic, kind


def _orbax_steps(run_dir: str, cfg: C.Config) -> Tuple[str, List[int]]:
    ckpt = cfg.learner.checkpoint_dir or os.path.join(run_dir, "learner_checkpoints")
    if not os.path.isabs(ckpt) and not os.path.exists(ckpt):
        ckpt = os.path.join(run_dir, "learner_checkpoints")
    if not os.path.isdir(ckpt):
        return ckpt, []
    steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
    return ckpt, steps


def _orbax_params(ckpt_dir: str, step: int):
    """(actor_params, critic_params) of one Orbax learner checkpoint, restored without a
    template (numpy arrays in the saved structure)."""
    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        mgr.close()
    state = restored["state"]
    return state["actor_params"], state["critic_params"]


def _init_params(cfg: C.Config, seed: int = 0):
    import jax
    from crl.envs import make_env
    from crl.networks import CRLNetworks
    env = make_env(cfg.env.name)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    return nets.init(jax.random.PRNGKey(seed))


def resolve_sources(specs: Sequence[str]) -> List[Source]:
    out: List[Source] = []
    for spec in specs:
        path, _, which = spec.partition("@")
        if not os.path.exists(os.path.join(path, "config.yaml")):
            runs = R.find_runs(os.path.join(path, "runs") if os.path.isdir(os.path.join(path, "runs"))
                               else path)
            if not runs:
                raise C.ConfigError(f"{path!r}: no run directory (config.yaml) found")
            out.extend(resolve_sources([r + (f"@{which}" if which else "") for r in runs]))
            continue
        cfg = R.load_config(path)
        name = os.path.basename(os.path.normpath(path))
        if which == "init":
            a, c = _init_params(cfg)
            out.append(Source(f"{name} (untrained)", path, cfg, a, c, "untrained"))
            continue
        npz = os.path.join(path, R.PARAMS_FILE)
        if not which and os.path.exists(npz):
            a, c, meta = R.load_params(npz)
            steps = meta.get("env_steps")
            out.append(Source(name + (f" ({steps:,} steps)" if steps else ""), path, cfg, a, c))
            continue
        ckpt, steps = _orbax_steps(path, cfg)
        if not steps:
            raise C.ConfigError(f"{path!r}: no {R.PARAMS_FILE} and no Orbax checkpoint in {ckpt!r}")
        chosen = steps if which == "all" else [int(which)] if which else [steps[-1]]
        for st in chosen:
            if st not in steps:
                raise C.ConfigError(f"{path!r}: no checkpoint step {st}; kept: {steps}")
            a, c = _orbax_params(ckpt, st)
            out.append(Source(f"{name} @ call {st}", path, cfg, a, c, f"call {st}"))
    return out


# ----------------------------------------------------------------------------- main
def analyse(src: Source, goal_cell: Optional[Tuple[int, int]], per_cell: int, mode: str,
            all_goals: bool = True) -> Dict[str, Any]:
    from crl.envs import make_env
    from crl.networks import CRLNetworks
    env = make_env(src.cfg.env.name)
    if not hasattr(env, "maze"):
        raise C.ConfigError(f"{src.cfg.env.name}: not a maze env (critic-map needs a maze)")
    mg = MazeGrid(env.maze, env.cell_size, per_cell)
    goal_cell = tuple(goal_cell) if goal_cell else default_goal_cell(env.maze)
    if mg.grid[goal_cell]:
        raise C.ConfigError(f"goal cell {goal_cell} is a wall of maze {env.maze!r}")
    nets = CRLNetworks(src.cfg.network, env.state_dim, env.action_size, env.goal_dim)
    states = probe_states(env, mg.points)
    from crl.envs import mazes
    cells = [tuple(map(int, c)) for c in mazes.free_cells(env.maze)]
    goal_cells = cells if all_goals else [goal_cell]
    if goal_cell not in goal_cells:
        goal_cells = [goal_cell] + goal_cells
    goals = np.stack([mg.cell_centre(c) for c in goal_cells])
    d = learned_distances(nets, src.actor, src.critic, states, goals, mode)   # [G, N]
    gi = goal_cells.index(goal_cell)
    res = {"label": src.label, "run_dir": src.run_dir, "env": src.cfg.env.name,
           "depth": src.cfg.network.critic.depth, "width": src.cfg.network.critic.width,
           "batch": src.cfg.algo.batch_size, "kind": src.kind,
           "seed": src.cfg.run.seed, "goal_cell": list(goal_cell), "action": mode,
           **correlations(d[gi], mg, goal_cell)}
    if all_goals:
        per = [correlations(d[i], mg, c) for i, c in enumerate(goal_cells)]
        for key in ("rho_path", "rho_line", "agree_path"):
            vals = [p[key] for p in per if np.isfinite(p[key])]
            res[f"all_goals_{key}"] = float(np.mean(vals)) if vals else float("nan")
    res["_image"] = mg.to_image(d[gi])
    res["_grid"] = mg
    return res


def _setting(r: Dict[str, Any]) -> Tuple:
    return (r["env"], r["depth"], r["width"], r["batch"], r["kind"])


def write_outputs(results: List[Dict[str, Any]], out_dir: str, panels: Sequence[int],
                  title: str, columns: int = 0) -> None:
    from app.research import plot
    from app.research.report import mean_se
    os.makedirs(out_dir, exist_ok=True)
    pans = []
    for i in panels:
        r = results[i]
        mg: MazeGrid = r["_grid"]
        gi, gj = r["goal_cell"]
        si, sj = mg.start
        pans.append({"values": r["_image"], "per_cell": mg.k,
                     "title": r["label"][:48],
                     "subtitle": f"rho path {r['rho_path']:.2f} | rho line {r['rho_line']:.2f} | "
                                 f"agree {r['agree_path']:.2f}",
                     "markers": [((gi + 0.5) * mg.k, (gj + 0.5) * mg.k, "goal"),
                                 ((si + 0.5) * mg.k, (sj + 0.5) * mg.k, "start")]})
    cell_px = 56 if max(results[0]["_grid"].grid.shape) <= 8 else 40
    plot.heatmap_panels(pans, cell_px=cell_px, title=title, columns=columns).save(
        os.path.join(out_dir, "critic_map.png"))
    np.savez_compressed(os.path.join(out_dir, "critic_map.npz"),
                        **{f"panel{i}": results[i]["_image"] for i in range(len(results))})
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    with open(os.path.join(out_dir, "critic_map.json"), "w") as f:
        json.dump(clean, f, indent=1)
    # Markdown: per panel, then per (env, depth, width) over seeds.
    keys = ["rho_path", "rho_line", "agree_path", "all_goals_rho_path", "all_goals_rho_line",
            "all_goals_agree_path", "rho_path_cells", "rho_line_cells"]
    keys = [k for k in keys if any(k in r for r in clean)]
    md = [f"# {title}", "", "![critic map](critic_map.png)", "",
          "Spearman rank correlation of the learned distance ||phi(s,a) - psi(g)|| with the "
          "shortest-path distance (rho path) and the straight-line distance (rho line); agree = "
          "fraction of point pairs that path and line order differently which the critic orders "
          "as the path (1 topology, 0 straight line). `all goals` = mean over every free cell as "
          "the goal; `cells` = per-cell means vs BFS cell distance. Mean ± SE over seeds.", "",
          f"straight line vs path on these points (rho): {clean[0]['rho_path_line']:.2f}", ""]
    groups: Dict[Tuple, List[Dict]] = {}
    for r in clean:
        groups.setdefault(_setting(r), []).append(r)
    md += ["| env | depth | width | batch | params | n | "
           + " | ".join(k.replace("_", " ") for k in keys) + " |", "|" + "---|" * (6 + len(keys))]
    for (env, depth, width, batch, kind), rs in groups.items():
        cells = []
        for k in keys:
            m, se, n = mean_se([r.get(k, float("nan")) for r in rs])
            cells.append("n/a" if not np.isfinite(m) else
                         f"{m:.2f}" + (f" ± {se:.2f}" if n > 1 else ""))
        md.append(f"| {env} | {depth} | {width} | {batch} | {kind} | {len(rs)} | "
                  + " | ".join(cells) + " |")
    md += ["", "| panel | seed | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
           "|" + "---|" * (2 + len(keys))]
    for r in clean:
        md.append(f"| {r['label']} | {r['seed']} | "
                  + " | ".join(f"{r.get(k, float('nan')):.2f}" for k in keys) + " |")
    with open(os.path.join(out_dir, "critic_map.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN[@STEP|@all|@init]",
                   help="run directories, sweep directories, or RUN@init / RUN@STEP / RUN@all")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--goal", default=None, metavar="ROW,COL",
                   help="goal cell of the maze layout (default: the cell farthest from the start "
                        "by path)")
    p.add_argument("--per-cell", type=int, default=8,
                   help="sample points per cell side (default: 8)")
    p.add_argument("--action", choices=("best", "mean", "zero", "policy"), default="best",
                   help="action in phi(s, a): best of the probe actions (default), their mean, "
                        "zero, or the policy's deterministic action")
    p.add_argument("--panels", choices=("setting", "all"), default="setting",
                   help="heatmaps: one per setting (first seed; numbers still for every run) or "
                        "one per run (default: setting)")
    p.add_argument("--no-all-goals", action="store_true",
                   help="skip the correlations averaged over every free cell as the goal")
    p.add_argument("--columns", type=int, default=0,
                   help="heatmaps per row (default: all in one row)")
    p.add_argument("--title", default=None)


def main(args) -> int:
    goal = tuple(int(v) for v in args.goal.split(",")) if args.goal else None
    sources = resolve_sources(args.runs)
    results = []
    for s in sources:
        r = analyse(s, goal, args.per_cell, args.action, all_goals=not args.no_all_goals)
        print(f"[critic-map] {r['label']}: rho_path={r['rho_path']:.3f} rho_line={r['rho_line']:.3f} "
              f"agree_path={r['agree_path']:.3f}"
              + (f" | all goals: rho_path={r['all_goals_rho_path']:.3f} "
                 f"rho_line={r['all_goals_rho_line']:.3f}" if "all_goals_rho_path" in r else ""),
              flush=True)
        results.append(r)
    if args.panels == "all":
        panels = list(range(len(results)))
    else:
        seen, panels = set(), []
        for i, r in enumerate(results):
            key = _setting(r)
            if key not in seen:
                seen.add(key)
                panels.append(i)
    env = results[0]["env"]
    title = args.title or (f"{env}: learned distance to the goal (cell {tuple(results[0]['goal_cell'])}), "
                           f"action = {args.action}")
    write_outputs(results, args.out, panels, title, args.columns)
    print(f"[critic-map] wrote {args.out}/critic_map.png, critic_map.md, critic_map.json")
    return 0
