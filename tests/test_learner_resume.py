"""The learner role resumes from its Orbax checkpoint: counters, params and optimiser state go on
where they stopped, and the params version keeps rising across the restart.

Real processes: `crl replay` and `crl learner` on 127.0.0.1; the test writes segments through
the SegmentWriter and reads params through the ParameterClient, as actors do.
"""
import json

import jax
import numpy as np

from crl import config as C
from crl.learning import make_learner
from params import ParameterClient
from helpers import (free_port_block, port_open, random_segments as segments,
                     small_learner_overrides, start_role, stop_process, wait_for,
                     wait_for_first_params, write_all)
from learner.checkpoint import LearnerCheckpointer


def test_learner_resumes_from_checkpoint(tmp_path):
    from replay.writer import SegmentWriter
    base = free_port_block(4)
    overrides = small_learner_overrides(tmp_path, base, **{
        "replay.utd": 0.02, "learner.checkpoint_every": 3})
    cfg = C.load(overrides=overrides)
    args = [f"--{k}={v}" for k, v in overrides.items()]
    rng = np.random.default_rng(0)
    replay = start_role(["replay", *args, "--metrics-port", base + 2], tmp_path / "replay.log")
    procs = [replay]
    try:
        wait_for(lambda: port_open(base), 120, "replay to listen")
        writer = SegmentWriter(cfg.service.replay_address, cfg, 5.0, state_dim=4, action_dim=2)
        client = ParameterClient(cfg.service.params_address, timeout_s=10)

        def run_learner_until_idle(log_name, data=None):
            proc = start_role(["learner", *args, "--metrics-port", base + 3], tmp_path / log_name)
            procs.append(proc)
            wait_for_first_params(cfg.service.params_address, 180, proc=proc)
            if data is not None:
                write_all(writer, data)
                wait_for(lambda: client.health()["version"] > 0, 180, "the first update")
            # The rate limiter allows utd * 800 env steps / 2 per call = 8 calls for 8 items.
            last = [-1, 0]

            def settled():
                h = client.health()
                same = h["version"] == last[0]
                last[:] = [h["version"], last[1] + 1 if same else 0]
                return last[1] >= 15   # version unchanged for ~3 s
            wait_for(settled, 240, "the learner to use up what the rate limiter allows", 0.2)
            return proc, last[0]

        # prefill 4 items + 8 items of training data
        proc, v1 = run_learner_until_idle("learner1.log", segments(12, rng))
        assert v1 >= 1                    # it trained and published (at most every 0.5 s)
        assert stop_process(proc) == 0    # SIGTERM: final checkpoint, exit 0
        ckpt = LearnerCheckpointer(str(tmp_path / "learner_checkpoints"))
        learner = make_learner(cfg, 4, 2, (0, 1))
        state1, counters1 = ckpt.restore(learner.init(jax.random.PRNGKey(9)))
        ckpt.close()
        steps1 = int(state1.steps)
        assert steps1 == 2 * counters1["update_calls"] > 0
        assert counters1["params_version"] == v1

        # Restart with no new data: it publishes the restored params under a NEWER version.
        proc, v2 = run_learner_until_idle("learner2.log")
        assert v2 > v1
        version, params = client.get(min_version=v1, subset="all")
        assert version == v2
        for a, b in zip(jax.tree_util.tree_leaves({"actor": state1.actor_params,
                                                   "critic": state1.critic_params}),
                        jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), b)

        # New data: training continues from the restored step counter and optimiser state.
        write_all(writer, segments(8, rng))
        wait_for(lambda: client.health()["version"] > v2, 120, "training to resume")
        assert stop_process(proc) == 0
        final = json.loads((tmp_path / "learner_final.json").read_text())
        assert final["sgd_steps"] > steps1 and final["update_calls"] > counters1["update_calls"]
        ckpt = LearnerCheckpointer(str(tmp_path / "learner_checkpoints"))
        state3, counters3 = ckpt.restore(learner.init(jax.random.PRNGKey(9)))
        ckpt.close()
        assert int(state3.steps) == final["sgd_steps"]
        adam_count = int(jax.tree_util.tree_leaves(state3.critic_opt_state)[0])
        assert adam_count == int(state3.steps)      # Adam's step count was not reset
        writer.close()
        client.close()
    finally:
        for p in reversed(procs):
            stop_process(p)
