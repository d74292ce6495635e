import pytest

from crl import config as C


def test_defaults_validate_and_derive():
    cfg = C.load()
    assert cfg.segment_length == cfg.episode_length == 100   # point_maze_u default
    # gradient steps / env step = utd: spi * (steps per item sampled) / segment length
    spi = cfg.samples_per_insert
    per_item = cfg.learner.minibatches_per_call / cfg.learner.segments_per_call
    assert spi * per_item / cfg.segment_length == pytest.approx(cfg.replay.utd)


def test_yaml_and_overrides_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("network:\n  critic:\n    depth: 16\nalgo:\n  batch_size: 128\n")
    cfg = C.load(str(p), {"algo.batch_size": "64"})
    assert cfg.network.critic.depth == 16 and cfg.network.actor.depth == 4
    assert cfg.algo.batch_size == 64
    out = tmp_path / "dump.yaml"
    C.dump(cfg, str(out))
    assert C.load(str(out)) == cfg


def test_frozen():
    cfg = C.Config()
    with pytest.raises(Exception):
        cfg.algo.batch_size = 3


@pytest.mark.parametrize("overrides, message", [
    ({"network.critic.depth": 6}, "network.critic.depth = 6: must be a positive multiple of 4"),
    ({"network.actor.depth": 0}, "network.actor.depth = 0"),
    ({"env.name": "pointmaze"}, "env.name = 'pointmaze': unknown env"),
    ({"algo.batch_size": 0}, "algo.batch_size = 0: must be > 0"),
    ({"algo.batch_size": 4096}, "needs 32768 transitions per call"),
    ({"algo.discount": 1.0}, "algo.discount = 1.0: must be in (0, 1)"),
    ({"network.critic.activation": "tanh"}, "network.critic.activation: 'tanh' is not allowed"),
    ({"network.actor.dtype": "float16"}, "choose one of ['float32', 'bfloat16']"),
    ({"replay.min_size_steps": 10**9}, "replay.min_size_steps = 1000000000: must be <="),
    ({"learner.segments_per_call": -1}, "learner.segments_per_call = -1: must be > 0"),
    ({"service.params_address": "nohostport"}, "service.params_address = 'nohostport'"),
    ({"learner.num_devices": 3}, "must be divisible by learner.num_devices = 3"),
    ({"env.num_envs": "many"}, "env.num_envs: 'many' is not an integer"),
    ({"network.critic.residual": "maybe"}, "network.critic.residual: 'maybe' is not a boolean"),
    ({"network.critic.dept": 4}, "unknown config field 'network.critic.dept'"),
    ({"replay.utd": 0}, "replay.utd = 0.0: must be > 0"),
    ({"replay.capacity_steps": 50, "replay.min_size_steps": 40},
     "replay.segment_length = 100: must be <= replay.capacity_steps = 50"),
    ({"replay.min_size_steps": 100}, "replay.min_size_steps = 100: must hold at least one learner "
                                     "sample"),
    ({"actor.param_refresh_s": 0}, "actor.param_refresh_s = 0.0: must be > 0"),
    ({"learner.publish_every": 0}, "learner.publish_every = 0: must be > 0"),
    ({"eval.interval_s": -1}, "eval.interval_s = -1.0: must be > 0"),
    ({"service.metrics_port": 70000}, "service.metrics_port = 70000: must be in 1..65535"),
    ({"service.replay_address": "replay:99999"},
     "service.replay_address = 'replay:99999': must be host:port with port in 1..65535"),
    ({"algo.discount": "high"}, "algo.discount: 'high' is not a number"),
    ({"service.tls_cert": "/etc/crl/tls.crt"},
     "service.tls_cert = '/etc/crl/tls.crt' / service.tls_key = '': set both"),
    ({"service.tls_ca": "/etc/crl/ca.crt"},
     "service.tls_ca = '/etc/crl/ca.crt': clients would use TLS but the learner would not"),
    ({"service.token_env": "CRL-TOKEN"}, "service.token_env = 'CRL-TOKEN': must be an environment "
                                         "variable name"),
    ({"service.require_token": True, "service.token_env": ""},
     "service.require_token = true: set service.token_file or service.token_env"),
    ({"service.tls_server_name": "a b", "service.tls_cert": "c", "service.tls_key": "k"},
     "service.tls_server_name = 'a b': must be a DNS name without spaces"),
    ({"service.require_token": "sometimes"}, "service.require_token: 'sometimes' is not a boolean"),
    # Non-finite numbers, seeds, ports, directories (each once a traceback or a lost run).
    ({"algo.critic_lr": float("nan")}, "algo.critic_lr = nan: must be a finite number"),
    ({"replay.utd": float("inf")}, "replay.utd = inf: must be a finite number"),
    ({"service.rpc_timeout_s": float("inf")}, "service.rpc_timeout_s = inf: must be a finite"),
    ({"run.seed": 2 ** 40}, "run.seed = 1099511627776: must be in 0..2147483647"),
    ({"run.seed": 10 ** 400}, "run.seed = 10000000000000000000...00000000 (401 chars): too large"),
    ({"algo.critic_lr": 10 ** 400}, "algo.critic_lr = 10000000000000000000...00000000 (401 chars): "
                                    "too large for a number"),
    ({"service.metrics_port": 17999}, "the learner's metrics port 18000 is service.replay_address"),
    ({"service.metrics_port": 18000}, "the replay's metrics port 18000 is service.replay_address"),
    ({"service.metrics_port": 65534}, "past 65535; lower it"),
    ({"run.run_dir": ""}, "run.run_dir = '': must name a directory"),
    ({"run.run_dir": "/tmp/r", "replay.checkpoint_dir": "/tmp/r"},
     "replay.checkpoint_dir = '/tmp/r' holds run.run_dir = '/tmp/r'"),
    ({"run.run_dir": "/tmp/r/run", "learner.checkpoint_dir": "/tmp/r"},
     "learner.checkpoint_dir = '/tmp/r' holds run.run_dir = '/tmp/r/run'"),
    ({"replay.checkpoint_dir": "/tmp/c", "learner.checkpoint_dir": "/tmp/c/l"},
     "replay.checkpoint_dir = '/tmp/c' holds learner.checkpoint_dir = '/tmp/c/l'"),
])
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(overrides=overrides)
    assert message in str(e.value)


def test_all_errors_reported_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.load(overrides={"network.critic.depth": 5, "algo.batch_size": -2})
    assert "network.critic.depth" in str(e.value) and "algo.batch_size" in str(e.value)


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  batchsize: 3\n")
    with pytest.raises(C.ConfigError, match="learner.batchsize"):
        C.load(str(p))


def test_crl_local_with_a_bad_config_starts_nothing(tmp_path):
    import subprocess
    import sys
    from helpers import REPO
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "app.cli", "local", "--run.run_dir", str(run_dir),
                          "--replay.utd", "-1", "--service.tls_cert", "x.crt"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "replay.utd = -1.0: must be > 0" in out.stderr
    assert "service.tls_cert = 'x.crt' / service.tls_key = ''" in out.stderr
    assert not run_dir.exists()                    # nothing started, nothing written


ALIAS_BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p.strip() else 'x'}]\n"
                     for p, c in zip(" abcdefg", "abcdefgh"))


@pytest.mark.parametrize("content, message", [
    (b"\x00\xff\xfe binary", "is not UTF-8 text (byte 1)"),
    ("DIR", "not a regular file (a directory, device or FIFO)"),
    ("FIFO", "not a regular file (a directory, device or FIFO)"),   # opening it would block
    (b"algo:\n  batch_size: 64\nalgo:\n  discount: 0.9\n", "duplicate key 'algo'"),
    (b"1: 2\n", "key 1 is not a string"),
    (ALIAS_BOMB.encode(), "alias *a: aliases are not allowed in a config file"),
    (b"# padding\n" * 200_000, "2,000,000 bytes, more than 1,048,576"),
    (b"- a\n- b\n", "expected a mapping"),
])
def test_bad_config_files_name_the_file_and_what_is_wrong(tmp_path, content, message):
    """Each once a traceback, a hang, gigabytes, or a silently dropped section (issue 16)."""
    import os
    path = tmp_path / "c.yaml"
    if content == "DIR":
        path.mkdir()
    elif content == "FIFO":
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    with pytest.raises(C.ConfigError) as e:
        C.load(str(path))
    assert message in str(e.value)
    if isinstance(content, bytes) and message.startswith(("duplicate", "key", "alias")):
        assert str(path) in str(e.value) and "line" in str(e.value)   # where, in which file


@pytest.mark.parametrize("run_dir", ["FILE/run", "/proc/crl-test-run"])
def test_crl_local_refuses_a_run_dir_it_cannot_create(tmp_path, run_dir):
    import subprocess
    import sys
    from helpers import REPO, free_port_block
    (tmp_path / "FILE").write_text("a file, not a directory")
    run_dir = run_dir.replace("FILE", str(tmp_path / "FILE"))
    base = free_port_block(8)
    out = subprocess.run([sys.executable, "-m", "app.cli", "local", "--run.run_dir", run_dir,
                          "--service.replay_address", f"127.0.0.1:{base}",
                          "--service.params_address", f"127.0.0.1:{base + 1}",
                          "--service.metrics_port", str(base + 2)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert f"run.run_dir = {run_dir!r}: cannot create" in text and "Traceback" not in text


def test_advice_names_an_over_fetching_learner_and_stays_quiet_otherwise():
    from app.cli import describe
    wasteful = C.load(overrides={"env.name": "humanoid", "replay.min_size_steps": 64_000})
    (line,) = C.advice(wasteful)         # 32 x 1000 sampled for 8 x 256 used
    assert "32 x 1000 = 32,000" in line and "8 x 256 = 2,048" in line and "15.6x" in line
    assert "raise minibatches_per_call to 125" in line
    assert "advice: the learner samples" in describe(wasteful)
    matched = C.load(overrides={"env.name": "humanoid", "replay.min_size_steps": 64_000,
                                "learner.minibatches_per_call": 125})
    assert C.advice(matched) == [] and "advice:" not in describe(matched)
    assert C.advice(C.load()) == []      # the default point maze


def test_crl_config_stdout_is_exactly_the_yaml_it_reads_back(tmp_path):
    """`crl config > run.yaml` must give a file `--config run.yaml` accepts unchanged: the
    summary (sizes, parameter counts, GPU placement) and import warnings go to stderr."""
    import subprocess
    import sys
    import yaml
    from helpers import REPO
    proc = subprocess.run([sys.executable, "-m", "app.cli", "config", "--network.critic.depth",
                           "8", "--env.num_envs", "32"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict) and data["network"]["critic"]["depth"] == 8
    assert "parameters" in proc.stderr and "placement: learner" in proc.stderr
    saved = tmp_path / "run.yaml"
    saved.write_text(proc.stdout)
    assert C.load(str(saved)) == C.load(overrides={"network.critic.depth": 8,
                                                   "env.num_envs": 32})


def test_cli_help_describes_fields_and_refuses_abbreviated_or_unknown_flags():
    import subprocess
    import sys
    from helpers import REPO
    from app.cli_help import field_descriptions
    names = [n for n, _, _ in C.field_items()]
    assert set(names) <= set(field_descriptions()), set(names) - set(field_descriptions())
    run = lambda *a: subprocess.run([sys.executable, "-m", "app.cli", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    help_text = run("local", "--help").stdout
    assert "one of crl.envs.env_names()" in help_text and "(default: 'point_maze_u')" in help_text
    for flags, hint in ((["--env.nam", "ant"], "did you mean --env.name?"),
                        (["--eval.num_eval", "3"], "did you mean --eval.num_evals?")):
        proc = run("config", *flags)
        assert proc.returncode == 2 and "usage: crl config" in proc.stderr, proc.stderr[-500:]
        assert "unrecognized arguments" in proc.stderr and hint in proc.stderr, proc.stderr[-500:]
        assert proc.stdout == ""


def test_every_env_validates_with_the_other_defaults():
    """`crl local --env.name E` needs no other flag: env-dependent defaults (the prefill) are
    derived from the env unless set, and the run's YAML holds the derived number."""
    from crl.envs import env_names
    for name in env_names():
        cfg = C.load(overrides={"env.name": name})
        one_sample = cfg.learner.segments_per_call * cfg.segment_length
        assert cfg.replay.min_size_steps == max(12_800, one_sample), name
    with pytest.raises(C.ConfigError, match=r"set replay.min_size_steps >= 32000 .* or "
                                            r"learner.segments_per_call <= 12"):
        C.load(overrides={"env.name": "ant", "replay.min_size_steps": 12_800})
