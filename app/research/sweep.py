"""`crl sweep`: a grid of training runs over env x depth x width x batch size x seed.

Every grid point gets a resolved config (base config < --set overrides < the point's values) that
is validated before anything runs; an invalid point stops the sweep with every bad field named.

Backends:
  local (default): each point is trained with the in-process driver (what `crl train` runs), in
    a child process per point, `--jobs` at a time; the child writes runs/<point>/history.jsonl
    (one row per evaluation), params.npz (final actor and critic params, read by
    `crl critic-map` and `crl render`), result.json and train.log. `--jobs 0` trains in this
    process (tests). Finished points are skipped when the sweep is run again (--force reruns).
  k8s: writes one rendered config per point (k8s/<point>.yaml, run.run_dir under --k8s-run-root)
    and k8s/apply.sh with one `crl cluster apply` command per point; nothing runs. When the runs
    are done, `--collect-from DIR` copies each point's history (eval.jsonl), config and summary
    from DIR/<point>/ into the sweep directory, so `crl report` reads both kinds alike.

Layout: SWEEP_DIR/sweep.json (grid, points, command), SWEEP_DIR/runs/<point>/...
Point names are DNS-1123 labels of at most 57 characters (`crl cluster apply --name NAME` runs
in namespace crl-NAME): e.g. point-maze-u-d16-w64-b256-s2. `crl cluster apply` pins run.run_dir
to the manifests' volume (/data/run in the run's namespace); --k8s-run-root only matters to other
launchers.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from crl import config as C
from app.research import runs as R

HELP = ("run a grid of training runs (env x depth x width x batch size x seed) locally, or write "
        "one config per point for Kubernetes; collects every run's evaluation history")

# Grid axes: option -> config fields it sets (all to the same value).
AXES: Dict[str, Tuple[str, ...]] = {
    "env": ("env.name",),
    "depth": ("network.actor.depth", "network.critic.depth"),
    "actor_depth": ("network.actor.depth",),
    "width": ("network.actor.width", "network.critic.width"),
    "batch": ("algo.batch_size",),
    "seed": ("run.seed", "actor.seed", "learner.seed"),
}
AXIS_TYPES = {"env": str, "depth": int, "actor_depth": int, "width": int, "batch": int, "seed": int}
DEFAULT_APPLY = "crl cluster apply --config {config} --name {name}"


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    overrides: Dict[str, Any]        # dotted config field -> value
    values: Dict[str, Any]           # axis -> value (what the report groups by)


def parse_list(text: str, tp=str) -> List[Any]:
    """'4,16,64' -> [4, 16, 64]; also accepts spaces."""
    items = [t for t in re.split(r"[,\s]+", str(text).strip()) if t]
    if not items:
        raise C.ConfigError(f"empty list {text!r}")
    try:
        return [tp(t) for t in items]
    except ValueError:
        raise C.ConfigError(f"{text!r}: every item must be a {tp.__name__}") from None


def parse_assignments(items: Sequence[str], what: str) -> Dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise C.ConfigError(f"{what} {item!r}: expected section.field=value")
        out[key.strip()] = value.strip()
    return out


MAX_NAME = 57   # `crl cluster apply --name` runs in namespace crl-NAME, a 63-character label


def dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-+", "-", label)[:MAX_NAME].rstrip("-")


def point_name(cfg: C.Config, extra: Dict[str, Any]) -> str:
    net = cfg.network
    name = f"{cfg.env.name}-d{net.critic.depth}"
    if net.actor.depth != net.critic.depth:
        name += f"-ad{net.actor.depth}"
    name += f"-w{net.critic.width}"
    if net.actor.width != net.critic.width:
        name += f"-aw{net.actor.width}"
    name += f"-b{cfg.algo.batch_size}"
    for field, value in extra.items():
        name += f"-{field.split('.')[-1]}{value}"
    name += f"-s{cfg.run.seed}"
    return dns_label(name)


def expand_grid(axes: Dict[str, List[Any]], grid: Optional[Dict[str, List[Any]]] = None
                ) -> List[Dict[str, Any]]:
    """Cartesian product of the axes (in AXES order, then extra --grid fields), seeds last, so
    the seeds of one setting run one after another. Returns one {axis or field: value} per point."""
    grid = grid or {}
    names = [a for a in AXES if a in axes and a != "seed"] + list(grid)
    if "seed" in axes:
        names.append("seed")
    lists = [axes[n] if n in axes else grid[n] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*lists)]


def overrides_of(values: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for axis, value in values.items():
        for field in AXES.get(axis, (axis,)):
            out[field] = value
    return out


def build_points(base_config: Optional[str], base_overrides: Dict[str, Any],
                 axes: Dict[str, List[Any]], grid: Optional[Dict[str, List[Any]]] = None,
                 run_root: str = "") -> List[Tuple[Point, C.Config]]:
    """Resolves and validates the config of every grid point; raises ConfigError naming every
    invalid point and field. run.run_dir of each is <run_root>/<point name>."""
    grid = grid or {}
    points, errors, seen = [], [], {}
    for values in expand_grid(axes, grid):
        ov = dict(base_overrides)
        ov.update(overrides_of(values))
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        try:
            cfg = C.load(base_config, ov)
        except C.ConfigError as e:
            errors.append(f"point {label}: {e}")
            continue
        name = point_name(cfg, {f: cfg_value(cfg, f) for f in grid})
        if name in seen:
            errors.append(f"points {seen[name]} and {label} resolve to the same run {name}")
            continue
        seen[name] = label
        ov["run.run_dir"] = os.path.join(run_root, name) if run_root else name
        cfg = C.override(cfg, {"run.run_dir": ov["run.run_dir"]})
        resolved = {a: _axis_value(cfg, a) for a in AXES}
        resolved.update({f: cfg_value(cfg, f) for f in grid})
        points.append((Point(name, ov, resolved), cfg))
    if errors:
        raise C.ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
    return points


def cfg_value(cfg: C.Config, dotted: str):
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _axis_value(cfg: C.Config, axis: str):
    return cfg_value(cfg, AXES[axis][-1])


# ----------------------------------------------------------------------------------- running
def run_point(run_dir: str, num_evals: int, log_file=None) -> Dict[str, Any]:
    """Trains one point with the in-process driver (crl train), from run_dir/config.yaml; writes
    history.jsonl, params.npz and result.json there. Returns the result dict."""
    import jax
    import numpy as np
    from crl import driver

    cfg = R.load_config(run_dir)
    out = log_file or sys.stdout
    t0 = time.time()
    hist_path = os.path.join(run_dir, "history.jsonl")
    with open(hist_path + ".partial", "w") as hist:
        def log(msg):
            print(msg, file=out, flush=True)
        # Curves in the point's own directory, wherever the sweep was moved to.
        history, state = driver.train(C.override(cfg, {"run.run_dir": run_dir}),
                                      num_evals=num_evals, log=log, return_state=True,
                                      tensorboard=True)
        for row in history:
            hist.write(json.dumps(row) + "\n")
    os.replace(hist_path + ".partial", hist_path)
    host = jax.device_get(state)
    R.save_params(os.path.join(run_dir, R.PARAMS_FILE), host.actor_params, host.critic_params,
                  meta={"sgd_steps": int(np.asarray(host.steps)),
                        "log_alpha": float(np.asarray(host.log_alpha)),
                        "env_steps": history[-1]["env_steps"]})
    result = {"status": "ok", "wall_s": time.time() - t0,
              "final_time_at_goal": history[-1]["time_at_goal"], "evaluations": len(history)}
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _worker_argv(run_dir: str, num_evals: int) -> List[str]:
    return [sys.executable, "-m", "app.research.sweep", "--worker", run_dir,
            "--num-evals", str(num_evals)]


def _done(run_dir: str) -> bool:
    res = R.read_json(os.path.join(run_dir, "result.json"), {})
    return res.get("status") == "ok" and os.path.exists(os.path.join(run_dir, "history.jsonl"))


def run_local(points: List[Tuple[Point, C.Config]], num_evals: int, jobs: int, force: bool,
              out=None) -> int:
    """Trains every point not yet done; returns the number of failed points."""
    out = out or sys.stdout
    todo = []
    for p, cfg in points:
        run_dir = cfg.run.run_dir
        if not force and _done(run_dir):
            print(f"[sweep] {p.name}: done already, skipped (--force reruns)", file=out, flush=True)
            continue
        os.makedirs(run_dir, exist_ok=True)
        C.dump(cfg, os.path.join(run_dir, "config.yaml"))
        for stale in ("result.json", "history.jsonl"):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
        todo.append((p, run_dir))
    failed = 0
    t0 = time.time()
    if jobs <= 0:      # in this process
        for i, (p, run_dir) in enumerate(todo):
            print(f"[sweep] {i + 1}/{len(todo)} {p.name}: training in-process", file=out, flush=True)
            try:
                with open(os.path.join(run_dir, "train.log"), "w") as log:
                    res = run_point(run_dir, num_evals, log_file=log)
                print(f"[sweep] {p.name}: time_at_goal={res['final_time_at_goal']:.1f} "
                      f"({res['wall_s']:.0f}s)", file=out, flush=True)
            except Exception as e:   # one failed point does not stop the sweep
                failed += 1
                _write_failure(run_dir, repr(e))
                print(f"[sweep] {p.name}: FAILED {e!r}", file=out, flush=True)
        return failed

    pending = list(todo)
    running: List[Tuple[Point, str, subprocess.Popen, float, Any]] = []
    finished = 0
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    try:
        while pending or running:
            while pending and len(running) < jobs:
                p, run_dir = pending.pop(0)
                log = open(os.path.join(run_dir, "train.log"), "w")
                proc = subprocess.Popen(_worker_argv(run_dir, num_evals), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                print(f"[sweep] start {p.name} (pid {proc.pid}; log {run_dir}/train.log)", file=out,
                      flush=True)
                running.append((p, run_dir, proc, time.time(), log))
            time.sleep(0.5)
            for item in list(running):
                p, run_dir, proc, started, log = item
                rc = proc.poll()
                if rc is None:
                    continue
                running.remove(item)
                log.close()
                finished += 1
                res = R.read_json(os.path.join(run_dir, "result.json"), {})
                if rc == 0 and res.get("status") == "ok":
                    elapsed = time.time() - t0
                    eta = elapsed / finished * (len(todo) - finished) / 1.0
                    print(f"[sweep] done {p.name}: time_at_goal={res['final_time_at_goal']:.1f} "
                          f"({time.time() - started:.0f}s; {finished}/{len(todo)}; "
                          f"about {eta / 60:.0f} min left)", file=out, flush=True)
                else:
                    failed += 1
                    _write_failure(run_dir, f"worker exited with {rc}; see train.log")
                    print(f"[sweep] FAILED {p.name}: exit {rc}; see {run_dir}/train.log", file=out,
                          flush=True)
    except KeyboardInterrupt:
        for _, _, proc, _, _ in running:
            proc.terminate()
        for _, _, proc, _, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    return failed


def _write_failure(run_dir: str, error: str) -> None:
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump({"status": "failed", "error": error}, f, indent=1)


def emit_k8s(sweep_dir: str, points: List[Tuple[Point, C.Config]], apply_template: str,
             out=None, apply_args: str = "") -> str:
    """One rendered config per point plus apply.sh (run from anywhere; relative paths in
    apply_args, e.g. --overlay k8s/overlays/gpu, are relative to where it is run); returns its
    path."""
    out = out or sys.stdout
    k8s_dir = os.path.join(sweep_dir, "k8s")
    os.makedirs(k8s_dir, exist_ok=True)
    lines = ["#!/usr/bin/env bash", "# One run per grid point; written by crl sweep --backend k8s.",
             "set -euo pipefail", 'HERE="$(cd "$(dirname "$0")" && pwd)"']
    for p, cfg in points:
        path = os.path.join(k8s_dir, f"{p.name}.yaml")
        C.dump(cfg, path)
        line = apply_template.format(config=f'"$HERE/{p.name}.yaml"', name=shlex.quote(p.name))
        lines.append(line + (f" {apply_args}" if apply_args else ""))
    apply_sh = os.path.join(k8s_dir, "apply.sh")
    with open(apply_sh, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(apply_sh, 0o755)
    print(f"[sweep] wrote {len(points)} configs and {apply_sh}", file=out)
    return apply_sh


def collect(sweep_dir: str, points: List[Tuple[Point, C.Config]], source: str,
            out=None) -> int:
    """Copies <source>/<point>/{eval.jsonl,history.jsonl,summary.json,params.npz} into the
    sweep's runs/<point>/ (with the point's config); returns the number of points found."""
    out = out or sys.stdout
    found = 0
    for p, cfg in points:
        src = os.path.join(source, p.name)
        dst = os.path.join(sweep_dir, "runs", p.name)
        files = [f for f in ("eval.jsonl", "history.jsonl", "summary.json", R.PARAMS_FILE)
                 if os.path.exists(os.path.join(src, f))]
        if not files:
            print(f"[sweep] {p.name}: nothing in {src}", file=out)
            continue
        os.makedirs(dst, exist_ok=True)
        C.dump(cfg, os.path.join(dst, "config.yaml"))
        for f in files:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
        found += 1
    print(f"[sweep] collected {found}/{len(points)} runs from {source}", file=out)
    return found


# ----------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("example (the committed CPU experiment, docs/research.md):\n"
                "  crl sweep --out runs/sweep_u --env point_maze_u --depth 4,16,64 --width 64 \\\n"
                "    --batch 256 --seeds 0,1,2 --set learner.total_env_steps=64000")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR", help="sweep directory")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="base YAML config (a preset from presets/, say); default: built-in defaults")
    p.add_argument("--env", default=None, help="comma-separated env names (default: from config)")
    p.add_argument("--depth", default=None,
                   help="comma-separated depths, set on actor and critic (e.g. 4,16,64)")
    p.add_argument("--actor-depth", default=None,
                   help="comma-separated actor depths when they differ from --depth")
    p.add_argument("--width", default=None, help="comma-separated widths (actor and critic)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every point, e.g. learner.total_env_steps=64000")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="extra grid axis over any config field, e.g. algo.critic_lr=1e-4,3e-4")
    p.add_argument("--num-evals", type=int, default=10,
                   help="evaluations spread over each run's budget (local backend; default: 10)")
    p.add_argument("--jobs", type=int, default=1,
                   help="points trained at once, each in its own process; 0 = in this process "
                        "(default: 1)")
    p.add_argument("--backend", choices=("local", "k8s"), default="local")
    p.add_argument("--k8s-run-root", default="/runs",
                   help="run.run_dir root inside the cluster (k8s backend; default: /runs)")
    p.add_argument("--apply-template", default=DEFAULT_APPLY,
                   help=f"command per point for the k8s backend (default: {DEFAULT_APPLY!r})")
    p.add_argument("--apply-args", default="",
                   help="extra arguments of every apply line, e.g. '--overlay k8s/overlays/gpu'")
    p.add_argument("--collect-from", metavar="DIR", default=None,
                   help="copy finished runs' histories from DIR/<point>/ into the sweep (k8s)")
    p.add_argument("--force", action="store_true", help="rerun points that finished already")
    p.add_argument("--dry-run", action="store_true",
                   help="list the points and their configs' differences, run nothing")


def axes_from_args(args) -> Tuple[Dict[str, List[Any]], Dict[str, List[Any]]]:
    axes: Dict[str, List[Any]] = {}
    for axis, opt in (("env", "env"), ("depth", "depth"), ("actor_depth", "actor_depth"),
                      ("width", "width"), ("batch", "batch"), ("seed", "seeds")):
        text = getattr(args, opt)
        if text is not None:
            axes[axis] = parse_list(text, AXIS_TYPES[axis])
    grid = {k: parse_list(v) for k, v in parse_assignments(args.grid, "--grid").items()}
    return axes, grid


def main(args) -> int:
    axes, grid = axes_from_args(args)
    base = parse_assignments(args.set, "--set")
    sweep_dir = args.out
    run_root = (os.path.join(args.k8s_run_root, dns_label(os.path.basename(
        os.path.abspath(sweep_dir)))) if args.backend == "k8s"
        else os.path.join(sweep_dir, "runs"))
    points = build_points(args.config, base, axes, grid, run_root)
    print(f"[sweep] {len(points)} points:", flush=True)
    for p, _ in points:
        print(f"  {p.name}", flush=True)
    if args.dry_run:
        return 0
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump({"command": "crl sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:])
                   if len(sys.argv) > 1 and sys.argv[1] == "sweep" else None,
                   "base_config": args.config, "set": base,
                   "axes": axes, "grid": grid, "backend": args.backend,
                   "num_evals": args.num_evals,
                   "points": [{"name": p.name, "values": p.values, "run_dir": cfg.run.run_dir}
                              for p, cfg in points]}, f, indent=1)
    if args.collect_from:
        return 0 if collect(sweep_dir, points, args.collect_from) else 1
    if args.backend == "k8s":
        emit_k8s(sweep_dir, points, args.apply_template, apply_args=args.apply_args)
        return 0
    t0 = time.time()
    failed = run_local(points, args.num_evals, args.jobs, args.force)
    print(f"[sweep] finished in {(time.time() - t0) / 60:.1f} min; {failed} failed; "
          f"report: crl report {sweep_dir}", flush=True)
    return 1 if failed else 0


def _worker_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.research.sweep")
    parser.add_argument("--worker", required=True, metavar="RUN_DIR")
    parser.add_argument("--num-evals", type=int, default=10)
    a = parser.parse_args(argv)
    try:
        run_point(a.worker, a.num_evals)
    except Exception as e:
        _write_failure(a.worker, repr(e))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
