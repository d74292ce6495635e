"""The run lifecycle, learner side (docs/design.md): a real `crl learner` process against a real
`crl replay` process with a short budget finishes cleanly, and a restart of a finished run does not
train past the budget.

At the budget the learner does the owed SGD steps, checkpoints, publishes the final params with
progress finished=1, writes `<run_dir>/finished.json`, sets crl_learner_finished = 1, serves for
learner.finish_grace_s and exits 0. A learner started again on that run finds the marker and a
checkpoint at the budget: it publishes the final params again (a newer version, finished=1)
without training, and exits 0 after the grace.
"""
import json
import math

import numpy as np

from crl import config as C
from crl.learning import PROGRESS_KEY, progress_template
from crl.metrics import scrape
from helpers import (free_port_block, port_open, random_segments as segments,
                     small_learner_overrides, start_role, stop_process, wait_for,
                     wait_for_first_params, write_all)
from learner.checkpoint import LearnerCheckpointer
from params import ParameterClient
from replay.server import rate_limiter_params


def _final_progress(client, min_version=-1):
    version, got = client.get(min_version=min_version, subset=[PROGRESS_KEY])
    return version, {k: int(v) for k, v in got[PROGRESS_KEY].items()}


def test_learner_finishes_at_budget_and_a_restart_republishes_the_final_params(tmp_path):
    from replay.writer import SegmentWriter
    base = free_port_block(4)
    overrides = small_learner_overrides(tmp_path, base, **{
        "replay.utd": 0.2, "learner.checkpoint_every": 10, "learner.publish_interval_s": 0.0,
        "learner.total_env_steps": 1200, "learner.finish_grace_s": 10})
    cfg = C.load(overrides=overrides)
    args = [f"--{k}={v}" for k, v in overrides.items()]
    marker_path = tmp_path / "finished.json"
    metrics_url = f"http://127.0.0.1:{base + 3}/metrics"
    replay = start_role(["replay", *args, "--metrics-port", base + 2], tmp_path / "replay.log")
    procs = [replay]
    try:
        wait_for(lambda: port_open(base), 120, "replay to listen", proc=replay)
        learner = start_role(["learner", *args, "--metrics-port", base + 3],
                             tmp_path / "learner1.log")
        procs.append(learner)
        wait_for_first_params(cfg.service.params_address, 180, proc=learner)
        writer = SegmentWriter(cfg.service.replay_address, cfg, 5.0, state_dim=4, action_dim=2)
        client = ParameterClient(cfg.service.params_address, timeout_s=10,
                                 template=progress_template())
        assert _final_progress(client)[1]["finished"] == 0
        # 12 items x 100 env steps = the budget (4 of them the prefill).
        write_all(writer, segments(12, np.random.default_rng(0)), until=marker_path.exists)
        wait_for(marker_path.exists, 120, "the finished marker", proc=learner)
        marker = json.loads(marker_path.read_text())
        # During the grace: the final version is served with finished=1; the metrics say so.
        assert learner.poll() is None, "exited before serving the final params"
        version, progress = _final_progress(client)
        assert version == marker["params_version"]
        assert progress == {"env_steps": marker["env_steps"], "sgd_steps": marker["sgd_steps"],
                            "finished": 1}
        m = scrape(metrics_url)
        assert m["crl_learner_finished"] == 1 and m["crl_learner_budget_env_steps"] == 1200
        assert m["crl_learner_env_steps_total"] == marker["env_steps"] >= 1200
        assert m["crl_learner_sgd_steps_total"] == marker["sgd_steps"]
        assert m["crl_learner_critic_loss"] == m["crl_learner_critic_loss"]   # one Gauge, finite
        assert learner.wait(60) == 0
        # The owed SGD steps were done: at least utd x (env steps - 400 of prefill), exactly; at
        # most the rate limiter's slack more (the learner may train up to error_buffer samples
        # ahead of the insert count it read at the budget; replay/server.py).
        owed = round(0.2 * (marker["env_steps"] - 400))
        rl = rate_limiter_params(cfg)
        slack_sgd = math.ceil(rl.error_buffer / cfg.learner.segments_per_call) \
            * cfg.learner.minibatches_per_call
        assert owed <= marker["sgd_steps"] <= owed + slack_sgd, (marker, slack_sgd)
        assert marker["budget_env_steps"] == 1200 and marker["time"] > 0
        assert json.loads((tmp_path / "learner_final.json").read_text())["stopped_by"] == "budget"
        ckpt = LearnerCheckpointer(str(tmp_path / "learner_checkpoints"))
        step1 = ckpt.latest_step()
        ckpt.close()

        # A restart of the finished run: no training, the final params again, exit 0.
        learner = start_role(["learner", *args, "--metrics-port", base + 3],
                             tmp_path / "learner2.log")
        procs.append(learner)
        wait_for(lambda: json.loads(marker_path.read_text())["params_version"]
                 > marker["params_version"], 180, "the final params published again",
                 proc=learner)
        again = json.loads(marker_path.read_text())
        version2, progress2 = _final_progress(client, marker["params_version"])
        assert version2 == again["params_version"] > version
        assert progress2 == progress
        assert scrape(metrics_url).get("crl_learner_finished") == 1
        assert {k: again[k] for k in ("env_steps", "sgd_steps", "budget_env_steps")} == {
            k: marker[k] for k in ("env_steps", "sgd_steps", "budget_env_steps")}
        assert learner.wait(60) == 0
        ckpt = LearnerCheckpointer(str(tmp_path / "learner_checkpoints"))
        assert ckpt.latest_step() == step1     # it did not train or checkpoint again
        ckpt.close()
        assert "not training" in (tmp_path / "learner2.log").read_text()
        writer.close()
        client.close()
    finally:
        for p in reversed(procs):
            stop_process(p)
