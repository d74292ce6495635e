"""`crl report SWEEP_DIR`: the paper's kind of outputs from a directory of runs.

Metric (as in the paper): time at goal of a run = mean of its last 5 evaluations (`--last`); a
setting's value = mean over its seeds ± standard error (sample std / sqrt(n), n = seeds). Runs
are grouped by their config with the seeds and run-local fields (run dir, ports, checkpoint
paths) left out, so any field that differs between runs (depth, width, batch size, env, or a
`--grid` field) makes its own row.

Writes to OUT (default SWEEP_DIR/report): report.md (table, per-run table, figures),
results.json, learning_curves[_ENV].png, depth_scaling[_ENV].png, depth_vs_width[_ENV].png
(time at goal against critic parameters: depth scaling at each width and width scaling at each
depth), batch_by_depth[_ENV].png. A figure whose axis has one value in the sweep is skipped and
the report says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crl import config as C
from app.research import runs as R

HELP = ("turn a sweep's runs into a time-at-goal table (mean of the last 5 evaluations ± standard "
        "error over seeds), depth/width/batch plots and learning curves (PNG + markdown)")

# Fields that do not define a setting: seeds and what is local to one run.
IGNORED_PREFIXES = ("run.", "service.", "actor.seed", "learner.seed", "replay.checkpoint",
                    "learner.checkpoint", "learner.prefetch", "learner.publish_every",
                    "eval.interval_s", "actor.param_refresh_s", "actor.write_timeout_s")
MAIN_FIELDS = {"env.name": "env", "network.critic.depth": "depth",
               "network.critic.width": "width", "algo.batch_size": "batch"}


def mean_se(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, standard error = sample std / sqrt(n), n); SE is NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    se = float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(np.mean(v)), se, n


def last_k_mean(history: Sequence[Dict[str, Any]], k: int = 5, metric: str = "time_at_goal") -> float:
    vals = [float(r[metric]) for r in history if metric in r]
    if not vals:
        return float("nan")
    return float(np.mean(vals[-k:]))


def flat_config(cfg: C.Config) -> Dict[str, Any]:
    return {name: _get(cfg, name) for name, _, _ in C.field_items()}


def _get(cfg, dotted):
    node = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node


def _setting_fields(flat: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in flat.items() if not k.startswith(IGNORED_PREFIXES)}


class Run:
    def __init__(self, run_dir: str, k: int):
        self.dir = run_dir
        self.cfg = R.load_config(run_dir)
        self.flat = flat_config(self.cfg)
        self.seed = self.cfg.run.seed
        self.history = R.load_history(run_dir)
        self.value = last_k_mean(self.history, k)
        self.final = (float(self.history[-1]["time_at_goal"]) if self.history else float("nan"))
        res = R.read_json(os.path.join(run_dir, "result.json"), {}) or {}
        self.wall_s = res.get("wall_s") or (self.history[-1].get("wall_s") if self.history else None)
        self.status = res.get("status", "unknown" if self.history else "no history")
        self.x = [R.history_x(r, i) for i, r in enumerate(self.history)]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.dir))


class Group:
    def __init__(self, key: Tuple, fields: Dict[str, Any], runs: List[Run]):
        self.key, self.fields, self.runs = key, fields, runs
        self.mean, self.se, self.n = mean_se([r.value for r in runs])

    def get(self, field: str):
        return self.fields.get(field, self.runs[0].flat.get(field))

    def curve(self) -> Tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """(x name, x, mean over seeds, SE over seeds) of the learning curves, on the x values of
        the longest run (others interpolated; beyond a run's end it does not count)."""
        runs = [r for r in self.runs if r.history]
        if not runs:
            return "env steps", np.zeros(0), np.zeros(0), np.zeros(0)
        ref = max(runs, key=lambda r: len(r.history))
        xname = ref.x[0][0]
        xs = np.array([x for _, x in ref.x])
        ys = np.full((len(runs), len(xs)), np.nan)
        for i, r in enumerate(runs):
            rx = np.array([x for _, x in r.x])
            ry = np.array([float(h["time_at_goal"]) for h in r.history])
            inside = xs <= rx.max() + 1e-9
            ys[i, inside] = np.interp(xs[inside], rx, ry)
        mean = np.nanmean(ys, 0)
        cnt = np.sum(np.isfinite(ys), 0)
        std = np.array([np.nanstd(ys[:, j], ddof=1) if cnt[j] > 1 else np.nan
                        for j in range(len(xs))])
        return xname, xs, mean, std / np.sqrt(np.maximum(cnt, 1))


def group_runs(runs: List[Run]) -> Tuple[List[Group], List[str]]:
    """Groups runs by their setting; returns (groups, varying fields other than the main ones)."""
    settings = [_setting_fields(r.flat) for r in runs]
    varying = sorted({k for s in settings for k in s if len({json.dumps(t.get(k)) for t in settings}) > 1})
    key_fields = list(MAIN_FIELDS) + [f for f in varying if f not in MAIN_FIELDS]
    groups: Dict[Tuple, List[Run]] = {}
    for r, s in zip(runs, settings):
        key = tuple(json.dumps(s.get(f)) for f in key_fields) + (json.dumps(s, sort_keys=True),)
        groups.setdefault(key, []).append(r)
    out = [Group(k, {f: rs[0].flat.get(f) for f in key_fields}, sorted(rs, key=lambda r: r.seed))
           for k, rs in groups.items()]
    out.sort(key=lambda g: tuple(_sort_key(g.fields[f]) for f in key_fields))
    extra = [f for f in varying if f not in MAIN_FIELDS and f != "network.actor.depth"
             and f != "network.actor.width"]
    # Show actor depth/width only where they differ from the critic's.
    for f, base in (("network.actor.depth", "network.critic.depth"),
                    ("network.actor.width", "network.critic.width")):
        if any(g.get(f) != g.get(base) for g in out):
            extra.append(f)
    return out, extra


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def fmt_value(mean: float, se: float, n: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if n < 2 or not np.isfinite(se):
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {se:.1f}"


def markdown_table(groups: List[Group], extra: List[str], k: int) -> str:
    cols = ["env", "depth", "width", "batch"] + [f.split(".", 1)[-1] for f in extra]
    head = cols + ["seeds", f"time at goal (last {k})", "per seed", "env steps", "wall min / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        steps = [r.x[-1][1] for r in g.runs if r.x]
        walls = [r.wall_s for r in g.runs if r.wall_s]
        row = [str(g.get(f)) for f in MAIN_FIELDS] + [str(g.get(f)) for f in extra]
        row += [str(g.n), fmt_value(g.mean, g.se, g.n),
                ", ".join(f"{r.value:.1f}" for r in g.runs),
                f"{max(steps):,.0f}" if steps else "n/a",
                f"{np.mean(walls) / 60:.1f}" if walls else "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(g: Group, fields: Sequence[str]) -> str:
    short = {"network.critic.depth": "depth", "network.critic.width": "width",
             "algo.batch_size": "batch", "env.name": "env"}
    return " ".join(f"{short.get(f, f.split('.')[-1])} {g.get(f)}" for f in fields)


def _series_over(groups: List[Group], xfield: str, linefield: str, xfn=None) -> List[Dict]:
    """One series per value of linefield, points along xfield (needs >= 2 points)."""
    lines: Dict[Any, List[Group]] = {}
    for g in groups:
        lines.setdefault(g.get(linefield), []).append(g)
    series = []
    for lv, gs in sorted(lines.items(), key=lambda t: _sort_key(t[0])):
        gs = sorted(gs, key=lambda g: g.get(xfield))
        if len({g.get(xfield) for g in gs}) < 2:
            continue
        series.append({"label": f"{_label(gs[0], [linefield])}",
                       "x": [xfn(g) if xfn else g.get(xfield) for g in gs],
                       "y": [g.mean for g in gs], "err": [g.se for g in gs]})
    return series


def critic_params(g: Group) -> Optional[int]:
    """Parameters of phi + psi for the group's config (shape evaluation, no allocation)."""
    try:
        from crl.envs import make_env
        from crl.networks import count_params
        cfg = g.runs[0].cfg
        env = make_env(cfg.env.name)
        return count_params(cfg.network, env.state_dim, env.action_size, env.goal_dim)["critic"]
    except Exception:   # an env that cannot be built here: no params axis
        return None


def make_figures(groups: List[Group], extra: List[str], out_dir: str) -> List[Tuple[str, str]]:
    """Writes the figures; returns [(markdown line, file or '')] describing each."""
    from app.research import plot
    notes: List[Tuple[str, str]] = []
    envs = sorted({g.get("env.name") for g in groups})
    for env in envs:
        eg = [g for g in groups if g.get("env.name") == env]
        sfx = "" if len(envs) == 1 else f"_{env}"
        # Learning curves.
        series, xname = [], "env steps"
        for g in eg:
            xname, xs, m, se = g.curve()
            if len(xs):
                series.append({"label": ", ".join(
                    f"{short}={g.get(f)}" for short, f in
                    [("d", "network.critic.depth"), ("w", "network.critic.width"),
                     ("b", "algo.batch_size")] + [(f.split(".")[-1], f) for f in extra]),
                               "x": list(xs), "y": list(m), "err": list(se), "band": True})
        name = f"learning_curves{sfx}.png"
        plot.line_chart(series, title=f"{env}: time at goal during training (mean ± SE over seeds)",
                        xlabel=xname, ylabel="time at goal").save(os.path.join(out_dir, name))
        notes.append((f"Learning curves, {env}", name))

        widths = sorted({g.get("network.critic.width") for g in eg})
        batches = sorted({g.get("algo.batch_size") for g in eg})
        depths = sorted({g.get("network.critic.depth") for g in eg})
        common_batch = max(batches, key=lambda b: sum(g.get("algo.batch_size") == b for g in eg))
        at_batch = [g for g in eg if g.get("algo.batch_size") == common_batch and not _other(g, extra, eg)]

        # Depth scaling: time at goal vs depth, one line per width.
        series = _series_over(at_batch, "network.critic.depth", "network.critic.width")
        if series:
            name = f"depth_scaling{sfx}.png"
            plot.line_chart(series, title=f"{env}: time at goal vs depth (batch {common_batch}; "
                            f"last-5 mean ± SE)", xlabel="critic depth (log2)",
                            ylabel="time at goal", xlog=True).save(os.path.join(out_dir, name))
            notes.append((f"Depth scaling, {env}", name))
        else:
            notes.append((f"Depth scaling, {env}: skipped (one depth)", ""))

        # Depth vs width: against critic parameters.
        counts = {id(g): critic_params(g) for g in at_batch}
        usable = [g for g in at_batch if counts[id(g)]]
        series = []
        for s in _series_over(usable, "network.critic.depth", "network.critic.width",
                              xfn=lambda g: counts[id(g)]):
            s["label"] = f"{s['label']}: depth varies"
            series.append(s)
        for s in _series_over(usable, "network.critic.width", "network.critic.depth",
                              xfn=lambda g: counts[id(g)]):
            s["label"] = f"{s['label']}: width varies"
            series.append(s)
        if series and (len(widths) > 1 or len(depths) > 1):
            name = f"depth_vs_width{sfx}.png"
            plot.line_chart(series, title=f"{env}: depth vs width scaling (batch {common_batch})",
                            xlabel="critic parameters (phi + psi, log2 axis)",
                            ylabel="time at goal", xlog=True).save(os.path.join(out_dir, name))
            notes.append((f"Depth vs width, {env}" + ("" if len(widths) > 1 else
                          " (one width in this sweep: depth scaling only)"), name))
        else:
            notes.append((f"Depth vs width, {env}: skipped (one depth and one width)", ""))

        # Batch size by depth, at the most common width.
        common_width = max(widths, key=lambda w: sum(g.get("network.critic.width") == w for g in eg))
        at_width = [g for g in eg if g.get("network.critic.width") == common_width
                    and not _other(g, extra, eg)]
        series = _series_over(at_width, "algo.batch_size", "network.critic.depth")
        if series:
            name = f"batch_by_depth{sfx}.png"
            plot.line_chart(series, title=f"{env}: time at goal vs batch size (width {common_width})",
                            xlabel="batch size (log2)", ylabel="time at goal",
                            xlog=True).save(os.path.join(out_dir, name))
            notes.append((f"Batch size by depth, {env}", name))
        else:
            notes.append((f"Batch size by depth, {env}: skipped (one batch size)", ""))
    return notes


def _other(g: Group, extra: List[str], eg: List[Group]) -> bool:
    """True when g differs from the first setting in a field outside depth/width/batch (those
    are plotted per value only in the learning curves and the table)."""
    ref = eg[0]
    return any(g.get(f) != ref.get(f) for f in extra
               if f not in ("network.actor.depth", "network.actor.width"))


def build_report(root: str, out_dir: str, k: int = 5, figures: bool = True) -> Dict[str, Any]:
    run_dirs = R.find_runs(os.path.join(root, "runs") if os.path.isdir(os.path.join(root, "runs"))
                           else root)
    runs = [Run(d, k) for d in run_dirs]
    empty = [r for r in runs if not r.history]
    runs = [r for r in runs if r.history]
    if not runs:
        raise C.ConfigError(f"no run with an evaluation history under {root!r} "
                            "(history.jsonl or eval.jsonl next to config.yaml)")
    os.makedirs(out_dir, exist_ok=True)
    groups, extra = group_runs(runs)
    notes = make_figures(groups, extra, out_dir) if figures else []
    sweep = R.read_json(os.path.join(root, "sweep.json"), {}) or {}
    md = [f"# Sweep report: `{root}`", ""]
    if sweep.get("command"):
        md += ["Command:", "", "```bash", sweep["command"], "```", ""]
    md += [f"Time at goal: per run, the mean of its last {k} evaluations; per setting, the mean "
           f"over seeds ± standard error (sample std / sqrt(n)). {len(runs)} runs in "
           f"{len(groups)} settings.", "", markdown_table(groups, extra, k), ""]
    if empty:
        md += ["Runs without any evaluation yet (left out): "
               + ", ".join(r.name for r in empty), ""]
    md += ["## Runs", "", "| run | seed | status | last-5 mean | final | evaluations |",
           "|---|---|---|---|---|---|"]
    for g in groups:
        for r in g.runs:
            md.append(f"| {r.name} | {r.seed} | {r.status} | {r.value:.1f} | {r.final:.1f} | "
                      f"{len(r.history)} |")
    if notes:
        md += ["", "## Figures", ""]
        for text, file in notes:
            md += [f"{text}:" if file else f"- {text}", ""] + ([f"![{text}]({file})", ""] if file else [])
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    result = {"k": k, "settings": [
        {"fields": g.fields, "seeds": [r.seed for r in g.runs], "mean": g.mean, "se": g.se,
         "n": g.n, "per_seed": [r.value for r in g.runs], "runs": [r.dir for r in g.runs]}
        for g in groups]}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR",
                   help="a sweep directory (crl sweep --out), or any directory of run directories")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR/report)")
    p.add_argument("--last", type=int, default=5,
                   help="evaluations averaged at the end of each run (default: 5, as the paper)")
    p.add_argument("--no-figures", action="store_true", help="table and markdown only")


def main(args) -> int:
    out = args.out or os.path.join(args.sweep_dir, "report")
    res = build_report(args.sweep_dir, out, k=args.last, figures=not args.no_figures)
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    table = text.split("\n\n")
    print(next((t for t in table if t.startswith("| env")), ""))
    print(f"[report] {len(res['settings'])} settings; wrote {out}/report.md and figures")
    return 0
