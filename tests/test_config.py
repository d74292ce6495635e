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
