"""GPU placement of `crl local`'s roles (crl/placement.py), planned without a GPU: the plan is
pure, and the launcher applies it per child (tests/test_launcher.py reads a child's environment).
"""
from __future__ import annotations

import pytest

from crl import config as C
from crl.placement import PlacementError, detect_gpus, plan

GPUS8 = [str(i) for i in range(8)]


def cfg(**o):
    return C.load(overrides=o)


def gpu_of(env):
    return env["CUDA_VISIBLE_DEVICES"], float(env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0))


def test_learner_takes_the_first_gpus_rollouts_the_rest():
    p = plan(cfg(**{"gpus.learner": 4, "actor.num_actors": 5}), GPUS8)
    assert p["replay"]["CUDA_VISIBLE_DEVICES"] == ""                   # never a GPU
    assert gpu_of(p["learner"]) == ("0,1,2,3", 0.9)
    assert p["learner"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    placed = {n: gpu_of(p[n]) for n in ["evaluator"] + [f"actor{i}" for i in range(5)]}
    assert [g for g, _ in placed.values()] == ["4", "5", "6", "7", "4", "5"]   # round robin
    assert placed["evaluator"][1] == pytest.approx(0.45) and placed["actor2"][1] == 0.9


def test_one_gpu_shared_or_rollouts_on_cpu():
    one = ["0"]
    p = plan(cfg(), one)
    assert gpu_of(p["learner"]) == ("0", 0.9)
    assert all(p[n]["CUDA_VISIBLE_DEVICES"] == "" for n in ("evaluator", "actor0", "actor1"))
    p = plan(cfg(**{"gpus.share_learner_gpus": True, "gpus.learner_mem_fraction": 0.6}), one)
    assert gpu_of(p["learner"]) == ("0", 0.6)
    shares = [gpu_of(p[n]) for n in ("evaluator", "actor0", "actor1")]
    assert all(g == "0" for g, _ in shares)
    assert sum(f for _, f in shares) + 0.6 <= 0.95 + 1e-6               # fits beside it


def test_cpu_only_machine_and_count_zero():
    for c, gpus in ((cfg(), []), (cfg(**{"gpus.count": 0}), GPUS8)):
        p = plan(c, gpus)
        assert all(env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu"
                   for env in p.values())


@pytest.mark.parametrize("overrides, gpus, message", [
    ({"gpus.count": 4}, ["0", "1"], "gpus.count = 4: this machine has 2 usable GPU(s)"),
    ({"gpus.learner": 3, "gpus.count": 2}, GPUS8, "gpus.learner = 3: must be in 1..2"),
    ({"gpus.learner": 2, "learner.num_devices": 1, "algo.batch_size": 256}, GPUS8,
     "learner.num_devices = 1 but gpus.learner = 2"),
    ({"gpus.share_learner_gpus": True}, ["0"], "nothing is left for the actors"),
])
def test_impossible_placements_name_the_fields(overrides, gpus, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(cfg(**overrides), gpus)


def test_detect_respects_cuda_visible_devices():
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    p = plan(cfg(**{"gpus.learner": 1}), detect_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}))
    assert gpu_of(p["learner"])[0] == "2" and gpu_of(p["actor0"])[0] == "5"


def test_bad_gpu_fields_are_config_errors():
    for o, m in (({"gpus.count": -2}, "gpus.count = -2"),
                 ({"gpus.learner_mem_fraction": 1.5}, "gpus.learner_mem_fraction = 1.5"),
                 ({"gpus.rollout_mem_fraction": -0.1}, "gpus.rollout_mem_fraction = -0.1")):
        with pytest.raises(C.ConfigError, match=m):
            cfg(**o)
