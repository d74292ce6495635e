"""The `crl` command line: one subcommand per role, plus the launchers.

Every subcommand accepts `--config FILE.yaml` and one `--section.field VALUE` option per config
field (listed with its default in `crl SUBCOMMAND --help`). The config is validated before
anything starts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import typing
from typing import List, Optional

from crl import config as C
from app.cli_help import Parser, field_descriptions

SUBCOMMANDS = {
    "config": "print the resolved config and the parameter count of each network (a dry run)",
    "train": "train in one process with the in-process driver (no servers; debugging, tests)",
    "local": "start replay, learner, actors and evaluator as separate processes on this machine",
    "replay": "run the Reverb replay server role",
    "learner": "run the learner role (samples replay, updates, publishes params)",
    "actor": "run one actor role (steps envs, writes segments to replay)",
    "evaluate": "run the evaluator role (deterministic episodes with the newest params)",
}


# Tool subcommands that are not roles: module -> must define HELP (str), add_arguments(parser)
# and main(args) -> int, and stay cheap to import (no JAX/TF at import time): `crl --help`
# imports them all.
TOOL_COMMANDS = {
    "cluster": "app.cluster",
    "sweep": "app.research.sweep",
    "report": "app.research.report",
    "critic-map": "app.research.critic_map",
    "render": "app.research.render",
}


def _tool_modules():
    import importlib
    out = {}
    for name, module in TOOL_COMMANDS.items():
        try:
            out[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module and not module.startswith(str(e.name)):
                raise
    return out


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    return getattr(tp, "__name__", str(tp))


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML config file; command-line options override it (default: none)")
    group = parser.add_argument_group("config fields (override the YAML file)")
    descriptions = field_descriptions()
    for name, tp, default in C.field_items():
        text = descriptions.get(name, "")
        group.add_argument(f"--{name}", dest=f"cfg:{name}", default=None, metavar=_type_name(tp),
                           help=f"{text} (default: {default!r})".lstrip())


def config_from_args(args: argparse.Namespace) -> C.Config:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return C.load(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="crl", description="Distributed deep residual Contrastive RL (CRL).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `crl SUBCOMMAND --help` for every option and its default.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    parser.subcommands = sub.choices   # {name: its parser}: main() reports unknown flags there
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "train":
            p.add_argument("--num-evals", type=int, default=10,
                           help="evaluations spread over the budget (default: 10)")
        if name == "local":
            p.add_argument("--actors", type=int, default=None,
                           help="actor processes; same as --actor.num_actors (default: from config)")
            p.add_argument("--hang-timeout-s", type=float, default=60.0,
                           help="restart a role whose /metrics has not answered this long "
                                "(stopped or deadlocked) (default: 60)")
            p.add_argument("--dry-run", action="store_true",
                           help="print the resolved config and parameter counts, start nothing")
        if name in ("actor",):
            p.add_argument("--actor-id", type=int, default=0, help="index of this actor (default: 0)")
        if name == "evaluate":
            p.add_argument("--checkpoint", default=None, metavar="RUN[@STEP]",
                           help="evaluate saved params offline (no learner): the newest Orbax "
                                "checkpoint or params.npz of RUN, RUN@STEP, RUN@init; on the "
                                "training and (where the env has one) the evaluation goal set")
            p.add_argument("--episodes", type=int, default=0,
                           help="with --checkpoint: episodes per goal set (default: the run's "
                                "eval.num_envs)")
            p.add_argument("--out", default="",
                           help="with --checkpoint: JSON lines file to append to (default: "
                                "RUN/offline_eval.jsonl)")
        if name in ("replay", "learner", "actor", "evaluate"):
            p.add_argument("--metrics-port", type=int, default=None,
                           help="port of this role's /metrics (default: service.metrics_port)")
        add_config_options(p)
    for name, module in _tool_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(tool_main=module.main)
    return parser


def describe(cfg: C.Config) -> str:
    """What the config means, without allocating the networks: env sizes, parameter counts,
    the GPU placement of `crl local`, advice (the YAML itself is printed separately)."""
    from crl import placement
    from crl.envs import make_env
    from crl.networks import count_params
    env = make_env(cfg.env.name)
    counts = count_params(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    lines = [f"env {cfg.env.name}: state_dim={env.state_dim} goal_dim={env.goal_dim} "
             f"action_dim={env.action_size} episode_length={cfg.episode_length} "
             f"segment_length={cfg.segment_length}",
             f"replay: samples_per_insert={cfg.samples_per_insert:.3f} "
             f"(utd={cfg.replay.utd} gradient steps per env step)",
             f"actor network:  depth {cfg.network.actor.depth:>5} width {cfg.network.actor.width:>5}"
             f"  {counts['actor']:>13,} parameters",
             f"critic (phi+psi): depth {cfg.network.critic.depth:>3} width "
             f"{cfg.network.critic.width:>5}  {counts['critic']:>13,} parameters",
             f"total: {counts['actor'] + counts['critic']:,} parameters "
             f"({4 * (counts['actor'] + counts['critic']) / 2**20:.1f} MiB float32; "
             f"x3 with Adam moments)"]
    gpus = placement.detect_gpus()
    try:
        lines += placement.describe(placement.plan(cfg, gpus))
    except placement.PlacementError as e:
        lines.append(f"placement: impossible on this machine ({len(gpus)} GPU(s)): {e}")
    lines += [f"advice: {a}" for a in C.advice(cfg)]
    return "\n".join(lines)


def prepare_run_dir(cfg: C.Config) -> str:
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    C.dump(cfg, os.path.join(cfg.run.run_dir, "config.yaml"))
    return cfg.run.run_dir


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # with that subcommand's usage and a close match
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "tool_main", None) is not None:
        try:
            return args.tool_main(args)
        except C.ConfigError as e:
            print(f"crl {args.command}: {e}", file=sys.stderr)
            return 2
    if args.command == "evaluate" and args.checkpoint:
        from app.research import offline_eval
        try:
            return offline_eval.main(args.checkpoint, args.episodes, args.__dict__.get(
                "cfg:run.seed") or 0, args.out)
        except C.ConfigError as e:
            print(f"crl evaluate: {e}", file=sys.stderr)
            return 2
    try:
        if args.command == "local" and args.actors is not None:
            setattr(args, "cfg:actor.num_actors", args.actors)
        cfg = config_from_args(args)
    except C.ConfigError as e:
        print(f"crl {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "config" or (args.command == "local" and args.dry_run):
        # stdout is exactly the YAML (`crl config > run.yaml` round-trips through --config);
        # the summary, and whatever imports print, go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            summary = describe(cfg)
        print(summary, file=sys.stderr)
        print(C.dumps(cfg), end="", flush=True)
        if args.command == "config" and os.environ.get("CRL_MEMORY_ESTIMATE", "1") != "0":
            from crl.memory import print_report   # stderr; CRL_MEMORY_ESTIMATE=0 skips it
            with contextlib.redirect_stdout(sys.stderr):
                print_report(cfg, sys.stderr)
        return 0
    if args.command == "train":
        from crl import driver
        run_dir = prepare_run_dir(cfg)
        with open(os.path.join(run_dir, "history.jsonl"), "w") as f:
            def log(msg):
                print(msg, flush=True)
            history = driver.train(cfg, num_evals=args.num_evals, log=log, tensorboard=True)
            for row in history:
                f.write(json.dumps(row) + "\n")
        print(f"[train] done: final time_at_goal={history[-1]['time_at_goal']:.1f}; "
              f"history in {run_dir}/history.jsonl; curves: tensorboard --logdir {run_dir}/tb")
        return 0
    role_main = _role_entry(args.command)
    return role_main(cfg, args)


def _role_entry(command: str):
    if command == "local":
        from app.launcher import main as entry
    elif command == "replay":
        entry = _replay_main
    elif command == "learner":
        from learner.role import main as entry
    elif command == "actor":
        from actors.role import main as entry
    elif command == "evaluate":
        from evaluator.role import main as entry
    else:
        raise ValueError(command)
    return entry


def _replay_main(cfg: C.Config, args) -> int:
    """`crl replay`: the table signature comes from the env's state and action sizes."""
    import logging
    from crl.envs import make_env
    from replay.server import run
    logging.basicConfig(level=logging.INFO, format="%(asctime)s replay %(levelname)s %(message)s")
    env = make_env(cfg.env.name)
    return run(cfg, env.state_dim, env.action_size, metrics_port=args.metrics_port)


if __name__ == "__main__":
    sys.exit(main())
