"""Every preset loads and validates; the paper presets hold the paper's schedule."""
from pathlib import Path

import pytest
import yaml

from crl import config as C

PRESETS = Path(__file__).resolve().parents[1] / "presets"
PAPER_ROWS = {   # env -> budget in env steps (ALGORITHM.md, headline table)
    "arm_binpick_hard": 100_000_000, "arm_push_easy": 100_000_000, "arm_push_hard": 100_000_000,
    "ant_u4_maze": 100_000_000, "ant_u5_maze": 400_000_000, "ant_big_maze": 100_000_000,
    "ant_hardest_maze": 200_000_000, "humanoid": 100_000_000, "humanoid_u_maze": 400_000_000,
    "humanoid_big_maze": 400_000_000,
}
ALL = sorted(PRESETS.rglob("*.yaml"))


def test_there_is_one_paper_preset_per_table_row():
    assert sorted(p.stem for p in (PRESETS / "paper").glob("*.yaml")) == sorted(PAPER_ROWS)


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(PRESETS)) for p in ALL])
def test_preset_loads_and_validates(path):
    cfg = C.load(str(path))
    assert C.validate(cfg) is cfg
    # No typo'd key may hide in a preset: from_dict rejects unknown keys, and every key given
    # must survive the round trip.
    data = yaml.safe_load(path.read_text())
    flat = C.to_dict(cfg)
    for section, fields in data.items():
        for k, v in fields.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    assert flat[section][k][kk] == vv, (section, k, kk)
            else:
                assert flat[section][k] == v, (section, k)


@pytest.mark.parametrize("env", sorted(PAPER_ROWS))
def test_paper_schedule(env):
    cfg = C.load(str(PRESETS / "paper" / f"{env}.yaml"))
    assert cfg.env.name == env
    assert cfg.learner.total_env_steps == PAPER_ROWS[env]
    assert cfg.network.critic.depth == cfg.network.actor.depth == 64
    assert cfg.network.critic.width == 256 and cfg.network.repr_dim == 64
    assert cfg.algo.batch_size == 512
    envs = cfg.env.num_envs * cfg.actor.num_actors
    assert envs == 512
    assert cfg.episode_length == cfg.segment_length == 1000
    # 800 minibatches per 512 envs x 62 steps, the policy refreshed every 62 steps; replay
    # 10,000 steps per env; prefill: one window per env, so each env first steps the 1,000 of a
    # window rounded up to whole unrolls (items count unroll_length new steps: replay/server.py).
    import math
    assert cfg.actor.unroll_length == 62
    assert cfg.replay.utd * 512 * 62 == pytest.approx(800)
    assert cfg.replay.min_size_steps == envs * cfg.unroll_length
    assert 1000 <= math.ceil(1000 / 62) * 62 < 1000 + 62
    assert cfg.replay.capacity_steps == 10_000 * envs
    assert cfg.learner.minibatches_per_call == 800 and cfg.learner.segments_per_call == envs
    assert cfg.eval.num_envs == 128
    # Depth 4, the other column of the table, is the same file with the depth overridden.
    d4 = C.load(str(PRESETS / "paper" / f"{env}.yaml"),
                {"network.critic.depth": 4, "network.actor.depth": 4})
    assert d4.network.critic.depth == 4
