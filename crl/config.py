"""One typed, frozen config tree read by every role (local launcher, pods, tests).

Precedence: dataclass defaults < YAML file (`--config`) < command-line overrides
(`--section.field value`, e.g. `--network.critic.depth 64`). `validate` checks every field before
any process starts and names each bad field with its allowed values.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml

Activation = Literal["swish", "relu"]
DType = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    name: str = "point_maze_u"          # one of crl.envs.env_names()
    episode_length: int = 0             # 0 = the env's default (1000 for Brax envs)
    num_envs: int = 64                  # envs stepped by one actor process (vmapped)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    depth: int = 4                      # Dense layers inside residual blocks; multiple of 4
    width: int = 256                   # units of every Dense layer
    activation: Activation = "swish"    # nonlinearity after each LayerNorm
    residual: bool = True               # False: the same blocks without the skip connection
    layer_norm: bool = True             # LayerNorm before each activation
    # Rematerialise each block in the backward pass: activation memory O(1) instead of O(depth)
    # for about a third more FLOPs. `crl config` estimates both and says which fits.
    remat: bool = False
    dtype: DType = "float32"            # matmul compute dtype; params always float32


@dataclasses.dataclass(frozen=True)
class NetworksConfig:
    actor: NetworkConfig = NetworkConfig()
    critic: NetworkConfig = NetworkConfig()   # both encoders phi(s, a) and psi(g)
    repr_dim: int = 64                  # dimension of phi(s, a) and psi(g)


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    batch_size: int = 256               # relabelled transitions per minibatch (global, all devices)
    discount: float = 0.99              # goal sampling P(j) ∝ discount^(j - t)
    actor_lr: float = 3e-4              # Adam learning rate of the actor
    critic_lr: float = 3e-4             # Adam learning rate of both encoders
    alpha_lr: float = 3e-4              # Adam learning rate of log alpha (entropy temperature)
    logsumexp_penalty: float = 0.1      # weight of mean(logsumexp_j L_ij)^2 in the critic loss
    target_entropy_scale: float = 0.5   # H_target = -scale * |A|


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    capacity_steps: int = 200_000       # env steps held (items = capacity_steps / segment_length)
    # Env steps stored before sampling starts (prefill), counted as items x unroll length; 0 =
    # derived: the larger of 12,800 and one learner sample (segments_per_call x unroll length).
    min_size_steps: int = 0
    segment_length: int = 0             # steps per item; 0 = episode length
    utd: float = 0.05                   # gradient steps per env step, held by the rate limiter
    utd_tolerance: float = 0.1          # rate-limiter slack as a fraction of the prefill, capped at one actor write (>= 1: uncapped, the limiter opened), at least one learner call
    checkpoint_dir: str = ""            # "" = <run_dir>/replay_checkpoints
    checkpoint_interval_s: float = 300.0   # seconds between replay checkpoints


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    num_actors: int = 2                 # actor processes (the local launcher); k8s: replicas
    param_refresh_s: float = 1.0        # how often the background thread asks for newer params
    write_timeout_s: float = 30.0       # bound on every flush to Reverb
    # Env steps per unroll: the actor refreshes its policy this often and writes one item (the
    # window of the last segment_length steps of each env) per unroll. 0 = segment_length (one
    # params version per window, no overlap). Paper: 62 (windows of 1,000 at offsets of 62).
    unroll_length: int = 0
    seed: int = 0                       # base of the actors' env and policy PRNG keys


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    segments_per_call: int = 32         # segments sampled per compiled update call
    minibatches_per_call: int = 8       # SGD steps inside one compiled call
    total_env_steps: int = 400_000      # budget: the run stops when actors have stepped this many
    num_devices: int = 0                # 0 = all local devices (pmap); 1 = no pmap
    # Device memory per learner device, GiB, that `crl config` checks its memory estimate against
    # (crl/memory.py). 0 = the GPU's own limit when run on a GPU, else 80 (the paper's card).
    device_memory_gib: float = 0.0
    prefetch: int = 2                   # sampled batches in flight ahead of the update
    checkpoint_dir: str = ""            # "" = <run_dir>/learner_checkpoints
    checkpoint_every: int = 200         # SGD calls between Orbax checkpoints
    publish_every: int = 1              # at least this many SGD calls between params versions
    # Params are published by a background thread, off the update loop: at most once per
    # publish_interval_s (0 = as often as that thread keeps up), always the newest finite state.
    # Default: actor.param_refresh_s / 2, so every actor poll finds fresher params.
    publish_interval_s: float = 0.5
    # At the env-step budget the learner does the SGD steps still owed for the last data, then
    # publishes and checkpoints the final state; then exits 0 (crl local stops the run on that),
    # or with False keeps serving those params until SIGTERM (a Kubernetes Deployment would
    # otherwise restart a learner that exited).
    exit_at_budget: bool = True
    # With exit_at_budget: seconds the finished learner keeps serving its final params (progress
    # finished=1) before it exits 0, so actors and the evaluator see that the run finished.
    finish_grace_s: float = 30.0
    seed: int = 0                       # PRNG key of the networks' init and the updates


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_envs: int = 64                  # episodes per evaluation (one per env)
    interval_s: float = 10.0            # how often the evaluator looks for newer params
    far_goals: bool = False             # the paper's far-goal evaluation variant
    # Where on the env-step axis to evaluate (the paper: 100 evaluations spread evenly over the
    # budget). The evaluator evaluates the first params version it sees at or past each point
    # k * every_env_steps; num_evals > 0 sets every_env_steps = total_env_steps / num_evals.
    # Both 0: every new version found at each poll (wall-clock cadence).
    every_env_steps: int = 0
    num_evals: int = 0                  # evaluations spread evenly over the budget (0 = not used)
    goal_set: Literal["train", "eval"] = "train"   # "eval": the env's `_eval` layout (authors')


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"             # interface the learner and metrics bind (0.0.0.0 in pods)
    replay_address: str = "127.0.0.1:18000"   # host:port of the Reverb replay server
    params_address: str = "127.0.0.1:18001"   # host:port of the learner's ParameterService
    metrics_port: int = 19000           # local launcher: role k gets metrics_port + k
    rpc_timeout_s: float = 10.0         # bound on every blocking call across processes
    max_message_mb: int = 4             # gRPC chunk size for params streams
    # ParameterService security (docs/reliability.md). Paths, read when a role starts (a
    # Kubernetes Secret mounts them); the token itself is never in the config or the logs.
    tls_cert: str = ""                  # PEM certificate the learner serves; with tls_key: TLS on
    tls_key: str = ""                   # PEM private key of tls_cert
    tls_ca: str = ""                    # PEM roots actors/evaluator trust; "" = tls_cert itself
    tls_server_name: str = ""           # name checked in the certificate; "" = params_address host
    token_file: str = ""                # file holding the shared params token
    token_env: str = "CRL_PARAMS_TOKEN" # else this env var holds it ("" = none; unset = no token)
    require_token: bool = False         # refuse to start without a token (k8s overlays: true)
    # ParameterService throughput (docs/benchmarks.md). Each GetParams stream holds one server
    # thread while it runs: size the pool to at least the actors + evaluators that fetch at once.
    params_max_workers: int = 64
    # What actors and the evaluator fetch: "float32" = as published, bit-exact; "bfloat16" =
    # float32 leaves rounded to bfloat16 on the wire (half the bytes; the fetched leaves are
    # bfloat16 arrays). Off by default: it rounds the LayerNorm scales and biases, which the
    # network computes in float32 even with network.*.dtype = bfloat16.
    params_wire_dtype: DType = "float32"
    # A private directory (e.g. /dev/shm/crl-params) that the actors/evaluator of one host share:
    # one of them fetches each version over the network (checking its sha256) and the others
    # read it from there. Needs room for one payload per subset. "" = off (each fetches).
    params_host_cache: str = ""


@dataclasses.dataclass(frozen=True)
class GpusConfig:
    """GPU placement of `crl local`'s roles (crl/placement.py). Pods get theirs from k8s."""
    count: int = -1                     # GPUs to place roles on: -1 = every usable one, 0 = CPU only
    learner: int = 1                    # the first `learner` GPUs are the learner's (its pmap)
    learner_mem_fraction: float = 0.9   # XLA_PYTHON_CLIENT_MEM_FRACTION of the learner
    share_learner_gpus: bool = False    # no GPU left: actors/evaluator share the learner's
    rollout_mem_fraction: float = 0.0   # per actor/evaluator; 0 = an equal share of what is left


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"       # config, logs, checkpoints, eval.jsonl of this run
    seed: int = 0                       # seed of the in-process driver and the evaluator
    # Weights & Biases, beside TensorBoard: the same scalars at step = env steps, one W&B run
    # per role grouped by the run directory's name. "offline": <run_dir>/wandb, no network
    # (`wandb sync` uploads later); "online": needs WANDB_API_KEY. Extra: uv sync --extra wandb
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "crl-scale"    # W&B project of the runs (run.wandb offline or online)
    wandb_entity: str = ""              # W&B user or team; "" = the API key's default entity


@dataclasses.dataclass(frozen=True)
class Config:
    env: EnvConfig = EnvConfig()
    network: NetworksConfig = NetworksConfig()
    algo: AlgoConfig = AlgoConfig()
    replay: ReplayConfig = ReplayConfig()
    actor: ActorConfig = ActorConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    service: ServiceConfig = ServiceConfig()
    gpus: GpusConfig = GpusConfig()
    run: RunConfig = RunConfig()

    # Derived values: one place, so every role computes them the same way.
    @property
    def episode_length(self) -> int:
        if self.env.episode_length:
            return self.env.episode_length
        from crl.envs import ENV_SPECS
        return ENV_SPECS[self.env.name].episode_length

    @property
    def segment_length(self) -> int:
        return self.replay.segment_length or self.episode_length

    @property
    def eval_every_env_steps(self) -> int:
        """Env steps between evaluation points; 0 = evaluate every new params version."""
        if self.eval.num_evals:
            return max(1, self.learner.total_env_steps // self.eval.num_evals)
        return self.eval.every_env_steps

    @property
    def unroll_length(self) -> int:
        """Env steps between two items of one env (and between policy refreshes)."""
        return self.actor.unroll_length or self.segment_length

    @property
    def samples_per_insert(self) -> float:
        """Reverb items sampled per item inserted so that gradient steps / env steps == utd.

        One learner call samples segments_per_call items and takes minibatches_per_call steps;
        one inserted item brings unroll_length NEW env steps (its window overlaps the previous
        items of its env by segment_length - unroll_length steps).
        """
        steps_per_item_sampled = self.learner.minibatches_per_call / self.learner.segments_per_call
        return self.replay.utd * self.unroll_length / steps_per_item_sampled


class ConfigError(ValueError):
    """A config value is invalid; the message names every bad field and its allowed values."""


# ---------------------------------------------------------------------------------------------
# Flattening, YAML, overrides.

def _is_config(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def field_items(cls=Config, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """[(dotted name, type, default)] of every leaf field, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_config(tp):
            out.extend(field_items(tp, name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((name, tp, default))
    return out


def _coerce(name: str, tp, value):
    """Converts a YAML/CLI value to the field's type, or raises ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("off" in allowed or "on" in allowed):
            value = "on" if value else "off"      # YAML 1.1 reads a bare off / on as a boolean
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: {value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: {_short(value)} is not an integer") from None
        if not -2 ** 63 <= number < 2 ** 63:
            raise ConfigError(f"{name} = {_short(number)}: too large (an integer field holds at "
                              "most 2**63 - 1)")
        return number
    if tp is float:
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name} = {_short(value)}: too large for a number (at most "
                              "~1.8e308)") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not a number") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"{name}: unsupported type {tp}")


def _short(value: Any, limit: int = 40) -> str:
    """repr of a value for a message, a huge one cut (a 400-digit number is not read)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-8:]} ({len(text)} chars)"


def from_dict(data: Dict[str, Any], cls=Config, prefix: str = ""):
    """Builds a config from a nested dict; unknown keys are errors (typos must not pass)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {[prefix + u for u in unknown]}; "
            f"fields of {prefix.rstrip('.') or 'the config'}: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if _is_config(tp):
            kwargs[key] = from_dict(value, tp, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, tp, value)
    return cls(**kwargs)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def override(cfg: Config, dotted: Dict[str, Any]) -> Config:
    """Returns cfg with dotted-name overrides applied, e.g. {"network.critic.depth": 64}."""
    data = to_dict(cfg)
    for name, value in dotted.items():
        node = data
        parts = name.split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"unknown config field {name!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"unknown config field {name!r}")
        node[parts[-1]] = value
    return from_dict(data)


MAX_CONFIG_BYTES = 1 << 20   # a config is a few KiB; anything larger is the wrong file


class _ConfigLoader(yaml.SafeLoader):
    """safe_load, stricter where a config file would silently mean something else: a repeated
    key (YAML keeps the last: a second `algo:` section would drop the first), a key that is not
    a string, and aliases (`*name`: a few lines of nested aliases expand to gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor}: aliases are not allowed in a config file "
                "(write the values out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is not a string (config keys are field names)",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML would keep only the last one: "
                    "merge the two)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class FileRefused(ValueError):
    """read_regular_file would not read the file: not a regular file, or too large."""


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a small regular file (a config, a certificate, a token). Raises OSError if it
    cannot be read, FileRefused if it is not a regular file or holds more than max_bytes: stat
    comes first, since opening a FIFO blocks and reading /dev/zero never ends."""
    import os
    import stat
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused("not a regular file (a directory, device or FIFO)")
    if st.st_size > max_bytes:
        raise FileRefused(f"{st.st_size:,} bytes, more than {max_bytes:,}")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_yaml_file(path: str) -> Any:
    """The YAML document in `path`, or ConfigError naming the file and what is wrong with it
    (missing, not a regular file, too large, not UTF-8 text, not valid YAML, _ConfigLoader's
    rules)."""
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r}: cannot read it ({e.strerror or e})") from None
    except FileRefused as e:
        raise ConfigError(f"config file {path!r}: {e}: give the path of a YAML config "
                          "(a config is a few KiB)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}): is it the "
                          "right file?") from None
    loader = _ConfigLoader(text)
    loader.name = path   # error marks name the file
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not a valid config YAML: {e}") from None
    finally:
        loader.dispose()


def load(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Defaults < YAML file < overrides; then validated."""
    cfg = Config()
    if path:
        cfg = from_dict(read_yaml_file(path))
    if overrides:
        cfg = override(cfg, overrides)
    cfg = derive_defaults(cfg)
    validate(cfg)
    return cfg


DEFAULT_PREFILL_STEPS = 12_800


def derive_defaults(cfg: Config) -> Config:
    """Fields left at 0 = "derived from the env" get their value, so the YAML a run writes holds
    concrete numbers: replay.min_size_steps = max(12,800, one learner sample: segments_per_call
    x unroll length)."""
    from crl.envs import ENV_SPECS
    if cfg.env.name not in ENV_SPECS or cfg.replay.min_size_steps != 0:
        return cfg
    one_sample = cfg.learner.segments_per_call * cfg.unroll_length
    return override(cfg, {"replay.min_size_steps": max(DEFAULT_PREFILL_STEPS, one_sample)})


def dump(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def dumps(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Validation.

def _leaf_values(cfg, prefix: str = ""):
    """(dotted name, value) of every leaf field."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaf_values(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


def local_roles(cfg: Config) -> List[str]:
    """The role processes of `crl local`, in start order; role k serves its metrics on
    service.metrics_port + k."""
    return ["replay", "learner", "evaluator"] + [f"actor{i}" for i in range(cfg.actor.num_actors)]


def _port_errors(cfg: Config) -> List[str]:
    """Two services of one `crl local` run on one port (metrics ports: metrics_port + k for
    replay, learner, evaluator and each actor), or metrics ports past 65535."""
    errs: List[str] = []
    used: Dict[int, str] = {}
    for n in ("replay_address", "params_address"):
        port = getattr(cfg.service, n).rpartition(":")[2]
        if port.isdigit():
            used.setdefault(int(port), f"service.{n}")
    roles = local_roles(cfg)
    top = cfg.service.metrics_port + len(roles) - 1
    if 0 < cfg.service.metrics_port < 65536 and top >= 65536:
        errs.append(f"service.metrics_port = {cfg.service.metrics_port}: the {len(roles)} roles use "
                    f"metrics_port .. metrics_port + {len(roles) - 1} = {top}, past 65535; lower it")
    for k, role in enumerate(roles):
        port = cfg.service.metrics_port + k
        if port in used:
            errs.append(f"service.metrics_port = {cfg.service.metrics_port}: the {role}'s metrics "
                        f"port {port} is {used[port]}'s port; move one of them")
            break
    return errs


def _directory_errors(cfg: Config) -> List[str]:
    """The run directory and the checkpoint directories must not overlap: Reverb deletes
    everything in its checkpoint directory but its newest checkpoint, and Orbax owns the
    learner's (replay.checkpoint_dir = run_dir once deleted a run's config, logs and learner
    checkpoints)."""
    import os
    if not cfg.run.run_dir.strip():
        return ["run.run_dir = '': must name a directory (e.g. runs/default)"]
    run_dir = os.path.abspath(cfg.run.run_dir)
    dirs = {"run.run_dir": run_dir,
            "replay.checkpoint_dir": os.path.abspath(cfg.replay.checkpoint_dir
                                                     or os.path.join(run_dir, "replay_checkpoints")),
            "learner.checkpoint_dir": os.path.abspath(cfg.learner.checkpoint_dir
                                                      or os.path.join(run_dir, "learner_checkpoints"))}
    errs = []
    for owner in ("replay.checkpoint_dir", "learner.checkpoint_dir"):
        for other, path in dirs.items():
            mine = dirs[owner]
            if other == owner:
                continue
            if path == mine or path.startswith(mine + os.sep):
                errs.append(f"{owner} = {mine!r} holds {other} = {path!r}: a checkpoint directory "
                            "is owned by its checkpointer (old checkpoints in it are deleted); "
                            "give it a directory of its own (\"\" = inside the run directory)")
    return errs


def _wandb_errors(run: RunConfig) -> List[str]:
    """run.wandb: W&B names (its project/entity rules) and the installed extra."""
    if run.wandb == "off":
        return []
    errs = []
    for name, value, may_be_empty in (("wandb_project", run.wandb_project, False),
                                      ("wandb_entity", run.wandb_entity, True)):
        if (not value and not may_be_empty) or len(value) > 128 \
                or any(c in value for c in "/\\#?%: "):
            errs.append(f"run.{name} = {value!r}: must be a W&B {name[6:]} name (1-128 "
                        "characters, none of / \\ # ? % : or space)"
                        + ("; \"\" = the default entity" if may_be_empty else ""))
    from crl.wandb_sink import INSTALL_HINT, installed
    if not installed():
        errs.append(f"run.wandb = {run.wandb!r}: the wandb package is not installed; "
                    f"{INSTALL_HINT}, or set run.wandb off")
    return errs


def _errors(cfg: Config) -> List[str]:
    from crl.envs import ENV_SPECS
    errs: List[str] = []

    def positive(name, value):
        if value <= 0:
            errs.append(f"{name} = {value}: must be > 0")

    def non_negative(name, value):
        if value < 0:
            errs.append(f"{name} = {value}: must be >= 0")

    if cfg.env.name not in ENV_SPECS:
        errs.append(f"env.name = {cfg.env.name!r}: unknown env; choose one of {sorted(ENV_SPECS)}")
    non_negative("env.episode_length", cfg.env.episode_length)
    positive("env.num_envs", cfg.env.num_envs)

    for role in ("actor", "critic"):
        net: NetworkConfig = getattr(cfg.network, role)
        pre = f"network.{role}"
        if net.depth < 4 or net.depth % 4:
            errs.append(f"{pre}.depth = {net.depth}: must be a positive multiple of 4 "
                        "(Dense layers inside residual blocks of 4), e.g. 4, 8, 16, 64, 1024")
        positive(f"{pre}.width", net.width)
    positive("network.repr_dim", cfg.network.repr_dim)

    a = cfg.algo
    positive("algo.batch_size", a.batch_size)
    if not 0.0 < a.discount < 1.0:
        errs.append(f"algo.discount = {a.discount}: must be in (0, 1)")
    for n in ("actor_lr", "critic_lr", "alpha_lr"):
        positive(f"algo.{n}", getattr(a, n))
    non_negative("algo.logsumexp_penalty", a.logsumexp_penalty)
    non_negative("algo.target_entropy_scale", a.target_entropy_scale)

    r = cfg.replay
    positive("replay.capacity_steps", r.capacity_steps)
    positive("replay.min_size_steps", r.min_size_steps)
    non_negative("replay.segment_length", r.segment_length)
    positive("replay.utd", r.utd)
    positive("replay.utd_tolerance", r.utd_tolerance)
    positive("replay.checkpoint_interval_s", r.checkpoint_interval_s)
    if r.min_size_steps > r.capacity_steps:
        errs.append(f"replay.min_size_steps = {r.min_size_steps}: must be <= "
                    f"replay.capacity_steps = {r.capacity_steps}")

    positive("actor.num_actors", cfg.actor.num_actors)
    positive("actor.param_refresh_s", cfg.actor.param_refresh_s)
    positive("actor.write_timeout_s", cfg.actor.write_timeout_s)
    non_negative("actor.unroll_length", cfg.actor.unroll_length)

    l = cfg.learner
    positive("learner.segments_per_call", l.segments_per_call)
    positive("learner.minibatches_per_call", l.minibatches_per_call)
    positive("learner.total_env_steps", l.total_env_steps)
    non_negative("learner.num_devices", l.num_devices)
    non_negative("learner.device_memory_gib", l.device_memory_gib)
    if l.num_devices > 0 and a.batch_size % l.num_devices:
        errs.append(f"algo.batch_size = {a.batch_size}: must be divisible by "
                    f"learner.num_devices = {l.num_devices} (the batch is split across devices)")
    positive("learner.prefetch", l.prefetch)
    positive("learner.checkpoint_every", l.checkpoint_every)
    positive("learner.publish_every", l.publish_every)
    if not 0.0 <= l.publish_interval_s < float("inf"):    # also catches NaN
        errs.append(f"learner.publish_interval_s = {l.publish_interval_s}: must be a finite "
                    "number >= 0")
    if not 0.0 <= l.finish_grace_s < float("inf"):        # also catches NaN
        errs.append(f"learner.finish_grace_s = {l.finish_grace_s}: must be a finite number of "
                    "seconds >= 0 (how long a finished learner serves its final params)")

    positive("eval.num_envs", cfg.eval.num_envs)
    positive("eval.interval_s", cfg.eval.interval_s)
    if cfg.eval.every_env_steps < 0 or cfg.eval.num_evals < 0:
        errs.append(f"eval.every_env_steps = {cfg.eval.every_env_steps}, eval.num_evals = "
                    f"{cfg.eval.num_evals}: must be >= 0 (0 = not used)")
    elif cfg.eval.every_env_steps and cfg.eval.num_evals:
        errs.append(f"eval.every_env_steps = {cfg.eval.every_env_steps} and eval.num_evals = "
                    f"{cfg.eval.num_evals}: set one of them (the other 0)")
    elif cfg.eval.num_evals > cfg.learner.total_env_steps:
        errs.append(f"eval.num_evals = {cfg.eval.num_evals}: more evaluations than "
                    f"learner.total_env_steps = {cfg.learner.total_env_steps}")
    spec = ENV_SPECS.get(cfg.env.name)   # eval.goal_set = "eval" needs an env with an eval layout
    if cfg.eval.goal_set == "eval" and spec is not None and spec.eval_kwargs is None:
        errs.append(f"eval.goal_set = 'eval': env {cfg.env.name!r} has no eval layout; use 'train'")
    positive("service.rpc_timeout_s", cfg.service.rpc_timeout_s)
    positive("service.max_message_mb", cfg.service.max_message_mb)
    if not 1 <= cfg.service.params_max_workers <= 4096:
        errs.append(f"service.params_max_workers = {cfg.service.params_max_workers}: must be in "
                    "1..4096 (threads; at least the actors + evaluators fetching at once)")
    if cfg.service.params_host_cache and not cfg.service.params_host_cache.startswith("/"):
        errs.append(f"service.params_host_cache = {cfg.service.params_host_cache!r}: must be an "
                    "absolute path (e.g. /dev/shm/crl-params) or empty (off)")
    for n in ("replay_address", "params_address"):
        addr = getattr(cfg.service, n)
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            errs.append(f"service.{n} = {addr!r}: must be host:port with port in 1..65535")
    if not 0 < cfg.service.metrics_port < 65536:
        errs.append(f"service.metrics_port = {cfg.service.metrics_port}: must be in 1..65535")
    if cfg.gpus.count < -1:
        errs.append(f"gpus.count = {cfg.gpus.count}: -1 (every usable GPU), 0 (CPU) or a count")
    if not 0 < cfg.gpus.learner_mem_fraction <= 1:
        errs.append(f"gpus.learner_mem_fraction = {cfg.gpus.learner_mem_fraction}: must be in (0, 1]")
    if not 0 <= cfg.gpus.rollout_mem_fraction <= 1:
        errs.append(f"gpus.rollout_mem_fraction = {cfg.gpus.rollout_mem_fraction}: must be in "
                    "[0, 1] (0 = an equal share)")
    errs.extend(_port_errors(cfg))
    errs.extend(_directory_errors(cfg))
    errs.extend(_wandb_errors(cfg.run))
    for name, value in _leaf_values(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            errs.append(f"{name} = {value}: must be a finite number")
        if name.endswith("seed") and isinstance(value, int) and not 0 <= value < 2 ** 31:
            errs.append(f"{name} = {value}: must be in 0..2147483647 (a PRNG seed)")
    s = cfg.service
    if bool(s.tls_cert) != bool(s.tls_key):
        errs.append(f"service.tls_cert = {s.tls_cert!r} / service.tls_key = {s.tls_key!r}: set "
                    "both (TLS on) or neither (TLS off)")
    if s.tls_ca and not s.tls_cert:
        errs.append(f"service.tls_ca = {s.tls_ca!r}: clients would use TLS but the learner would "
                    "not; set service.tls_cert and service.tls_key too")
    if s.tls_server_name and (any(c.isspace() for c in s.tls_server_name) or not s.tls_cert):
        errs.append(f"service.tls_server_name = {s.tls_server_name!r}: must be a DNS name without "
                    "spaces, and only with service.tls_cert set")
    if s.token_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s.token_env):
        errs.append(f"service.token_env = {s.token_env!r}: must be an environment variable name "
                    "(letters, digits, '_'; not starting with a digit) or empty")
    if s.require_token and not (s.token_file or s.token_env):
        errs.append("service.require_token = true: set service.token_file or service.token_env "
                    "(where the token comes from)")

    if errs:   # the derived checks below assume the fields above are sane
        return errs
    seg = cfg.segment_length
    supply = l.segments_per_call * seg
    if l.minibatches_per_call * a.batch_size > supply:
        errs.append(
            f"algo.batch_size = {a.batch_size} x learner.minibatches_per_call = "
            f"{l.minibatches_per_call} needs {l.minibatches_per_call * a.batch_size} transitions per "
            f"call, but one sample supplies learner.segments_per_call x segment length = "
            f"{l.segments_per_call} x {seg} = {supply}; lower batch_size or minibatches_per_call, "
            "or raise segments_per_call")
    if cfg.actor.unroll_length > seg:
        errs.append(f"actor.unroll_length = {cfg.actor.unroll_length}: must be <= the segment "
                    f"length {seg} (0 = the segment length)")
    if seg > r.capacity_steps:
        errs.append(f"replay.segment_length = {seg}: must be <= replay.capacity_steps = "
                    f"{r.capacity_steps}")
    # The prefill is counted in items of unroll_length new env steps (replay/server.py); one
    # learner sample takes segments_per_call items.
    unroll = cfg.unroll_length
    one_sample = l.segments_per_call * unroll
    if one_sample > r.min_size_steps:
        errs.append(f"replay.min_size_steps = {r.min_size_steps}: must hold at least one learner "
                    f"sample (learner.segments_per_call x unroll length = {l.segments_per_call} x "
                    f"{unroll} = {one_sample} steps); set replay.min_size_steps >= {one_sample} "
                    f"(or 0: derived from the env) or learner.segments_per_call <= "
                    f"{max(1, r.min_size_steps // unroll)}")
    return errs


def advice(cfg: Config) -> List[str]:
    """Valid but wasteful settings, as sentences that name the fields (printed by `crl config`,
    `crl local --dry-run` and logged by the learner at start); never an error."""
    out = []
    fetched = cfg.learner.segments_per_call * cfg.segment_length
    used = cfg.learner.minibatches_per_call * cfg.algo.batch_size
    if fetched > 2 * used:
        out.append(
            f"the learner samples learner.segments_per_call x segment length = "
            f"{cfg.learner.segments_per_call} x {cfg.segment_length} = {fetched:,} transitions per "
            f"call and trains on learner.minibatches_per_call x algo.batch_size = "
            f"{cfg.learner.minibatches_per_call} x {cfg.algo.batch_size} = {used:,} of them "
            f"({fetched / used:.1f}x over-fetch: replay-to-learner bandwidth, the bound at small "
            f"depth on a GPU); raise minibatches_per_call to {-(-fetched // cfg.algo.batch_size)} "
            f"or lower segments_per_call (docs/scaling.md)")
    return out


def validate(cfg: Config) -> Config:
    errs = _errors(cfg)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg
