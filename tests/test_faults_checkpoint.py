"""Checkpoints interrupted for real: a process saving learner checkpoints is SIGKILLed in the middle
of a save; the next restore returns the newest COMPLETE step, bit-exact, never the half-written one.

Already covered elsewhere (not repeated here): a leftover Orbax temporary directory is not a step,
a corrupt newest checkpoint falls back to the previous one, and "none readable" is a clear error
(tests/test_learner_checkpoint.py); replay checkpoints without DONE are skipped, corrupt ones are
quarantined with a fallback or a clear error, kill -9 + restart restores the last checkpoint
(tests/test_replay.py); a learner SIGKILLed at a random moment of a live run resumes
(tests/test_faults_local.py). Here: the same for a replay server killed while writing its
checkpoint, and the small pure helpers the fault handling relies on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from helpers import REPO, wait_for

SAVER = textwrap.dedent("""
    import sys, numpy as np
    from crl.learning import TrainState
    from learner.checkpoint import LearnerCheckpointer

    def state(step):   # ~64 MB, every value a function of the step: a save takes a while
        big = np.full((4096, 4096), step, np.float32)
        return TrainState({"w": big}, {"w": big + 1}, np.array(step, np.float32), {"m": big[:8]},
                          {"m": big[:8]}, {"m": np.zeros(2, np.float32)},
                          np.array([step, step], np.uint32), np.array(step, np.int32))

    ck = LearnerCheckpointer(sys.argv[1], max_to_keep=5)
    for step in range(1, 100):
        print(f"saving {step}", flush=True)
        ck.save(step, state(step), {"params_version": step, "update_calls": step})
        print(f"saved {step}", flush=True)
""")


def template():
    from crl.learning import TrainState
    z = np.zeros((4096, 4096), np.float32)
    return TrainState({"w": z}, {"w": z}, np.array(0, np.float32), {"m": z[:8]}, {"m": z[:8]},
                      {"m": np.zeros(2, np.float32)}, np.zeros(2, np.uint32), np.array(0, np.int32))


def test_sigkill_mid_save_restores_the_newest_complete_step(tmp_path):
    from learner.checkpoint import LearnerCheckpointer
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "saver.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(ckpt)], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT,
                                env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        wait_for(lambda: "saved 2" in out.read_text() or proc.poll() is not None, 120,
                 "two complete saves")
        # Kill the moment a later save's temporary directory exists: mid-write.
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any("tmp" in n for n in os.listdir(ckpt)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    text = out.read_text()
    completed = max(int(line.split()[1]) for line in text.splitlines() if line.startswith("saved"))
    leftovers = [n for n in os.listdir(ckpt) if "tmp" in n]
    ck = LearnerCheckpointer(str(ckpt))
    try:
        step = ck.latest_step()
        state, counters = ck.restore(template())
    finally:
        ck.close()
    assert leftovers, "the kill did not land inside a save"
    # The restored step is the newest whose save completed: exact data, never the partial one.
    assert step == completed, (step, completed, text[-500:])
    assert counters == {"params_version": step, "update_calls": step}
    assert np.all(state.actor_params["w"] == step) and np.all(state.critic_params["w"] == step + 1)
    assert int(state.steps) == step
    print(f"killed during save {completed + 1}; restored step {step}; leftover tmp dirs {leftovers}")


# ---------------------------------------------------------------------------------------------
# Helpers the fault handling relies on (cheap, no processes).

def test_nonfinite_batch_rows_and_param_check():
    import jax.numpy as jnp
    from crl.learning import all_finite
    from learner.loop import nonfinite_rows as _nonfinite_rows
    data = {"state": np.zeros((4, 3, 2), np.float32), "action": np.zeros((4, 3, 1), np.float32),
            "episode_id": np.zeros((4, 3), np.int32)}
    assert not _nonfinite_rows(data).any()
    data["state"][2, 1, 0] = np.nan
    data["action"][0, 0, 0] = np.inf
    assert _nonfinite_rows(data).tolist() == [True, False, True, False]
    data["state"][3, 0, 1] = 1e30            # finite, but poisons every update it is in
    assert _nonfinite_rows(data).tolist() == [True, False, True, True]
    data["state"][3, 0, 1] = -999_999.0       # large but plausible: kept
    assert _nonfinite_rows(data).tolist() == [True, False, True, False]
    assert bool(all_finite({"a": jnp.ones(3), "n": jnp.arange(3)}))
    assert not bool(all_finite({"a": jnp.array([1.0, jnp.nan]), "n": jnp.arange(3)}))


def test_fault_injection_hook_is_inert_unless_a_test_sets_it(tmp_path, monkeypatch):
    from learner.role import FAULT_NAN_FILE_ENV, _fault_injection_due
    monkeypatch.delenv(FAULT_NAN_FILE_ENV, raising=False)
    assert not _fault_injection_due()
    trigger = tmp_path / "trigger"
    monkeypatch.setenv(FAULT_NAN_FILE_ENV, str(trigger))
    assert not _fault_injection_due()                # armed, but no trigger file
    trigger.write_text("1")
    assert _fault_injection_due() and not trigger.exists()   # fires once, consumes the file
    assert not _fault_injection_due()


def test_launcher_tells_budget_exit_from_a_stray_sigterm(tmp_path):
    from app.launcher import _learner_finished
    final = tmp_path / "learner_final.json"
    final.write_text(json.dumps({"stopped_by": "signal"}))
    assert not _learner_finished(str(tmp_path))      # restart it: someone stopped it by hand
    final.write_text(json.dumps({"stopped_by": "budget"}))
    assert _learner_finished(str(tmp_path))


def test_replay_sigkill_mid_checkpoint_restores_the_previous_complete_one(tmp_path):
    """A replay server SIGKILLed while writing a checkpoint: on restart the half-written one (no
    DONE) is skipped and the previous complete one is restored with all its items."""
    import reverb
    from crl.segments import segment_spec
    from replay import TABLE
    from replay.server import complete_checkpoints, verify_checkpoint
    from replay.writer import SegmentWriter
    from helpers import free_port, port_open, stop_process
    S, A, T, N = 29, 8, 100, 1500
    overrides = {"env.name": "ant", "replay.segment_length": T, "replay.capacity_steps": 400_000,
                 "replay.min_size_steps": 400_000, "replay.checkpoint_interval_s": 10_000}
    port = free_port()
    ckpt = tmp_path / "ckpt"

    def start(log):
        cmd = [sys.executable, "-m", "replay.server", "--state-dim", str(S), "--action-dim", str(A),
               "--port", str(port), "--metrics-port", "0", "--checkpoint-dir", str(ckpt)]
        for k, v in overrides.items():
            cmd += ["--set", f"{k}={v}"]
        p = subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp_path / log, "w"),
                             stderr=subprocess.STDOUT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        wait_for(lambda: port_open(port) or p.poll() is not None, 180, "replay to listen")
        return p

    spec = segment_spec(S, A, T)
    segs = {k: np.zeros((50,) + s, d) for k, (s, d) in spec.items()}
    segs["state"] = np.random.default_rng(0).normal(size=segs["state"].shape).astype(np.float32)
    p = start("replay1.log")
    try:
        w = SegmentWriter(f"127.0.0.1:{port}", spec, 30.0)
        for _ in range(N // 50):
            w.write(segs)
        first = reverb.Client(f"127.0.0.1:{port}").checkpoint()
        for _ in range(10):
            w.write(segs)
        w.close()
        import threading
        threading.Thread(target=lambda: _ignore(reverb.Client(f"127.0.0.1:{port}").checkpoint),
                         daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:      # a new directory without DONE: mid-write
            partial = [d for d in os.listdir(ckpt) if os.path.join(ckpt, d) != first
                       and not os.path.exists(os.path.join(ckpt, d, "DONE"))]
            if partial:
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
        p.wait(30)
    finally:
        stop_process(p)
    assert partial, "the kill did not land inside a checkpoint"
    assert complete_checkpoints(str(ckpt)) == [first]
    p = start("replay2.log")
    try:
        info = reverb.Client(f"127.0.0.1:{port}").server_info(30)[TABLE]
        assert info.current_size == N == verify_checkpoint(first)
    finally:
        stop_process(p)


def _ignore(fn):
    try:
        fn()
    except Exception:
        pass
