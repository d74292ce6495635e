"""The learner role: wires the learner's update loop (learner/loop.py) to its real parts.

Parts: crl.learning.Updater (pmap over the local devices), the prefetching replay SegmentSampler
(the Reverb rate limiter decides when a sample may happen: that is what holds the UTD), the
background ParamsPublisher (learner/publisher.py) over the ParameterServer, Orbax checkpoints
(learner/checkpoint.py), and a poller of replay's insert count. What the loop does (pipelined
calls, rollbacks of non-finite updates, publishing, checkpoints, the owed updates at the budget)
is described in learner/loop.py. Here, around it:

  - start: resume from the newest checkpoint. Params versions never go backwards or repeat:
    after a restart it skips every version it may have assigned after its last checkpoint
    (`version_skip`), and past those of a previous start that crashed before checkpointing (the
    version floor file beside the checkpoints). The initial params are published at once, so
    actors can prefill replay with the untrained policy;
  - the budget (run lifecycle, docs/design.md): when replay has received
    `learner.total_env_steps` env steps the loop does the update calls still owed, checkpoints
    and publishes the final params with progress finished=1 and writes `<run_dir>/finished.json`;
    crl_learner_finished is then 1. With `learner.exit_at_budget` the role keeps serving those
    params for `learner.finish_grace_s` (so followers see finished=1) and exits 0; without, it
    serves until SIGTERM. A start that finds the marker and a checkpoint at or past the budget
    does not train: it publishes the final params again (finished=1), then behaves the same;
  - SIGTERM: the publisher thread stops (a publication in flight completes), the final state is
    checkpointed and published (if newer than the last published), and the role exits 0;
    after MAX_CONSECUTIVE_NONFINITE non-finite updates in a row it exits 1.

Fault injection for tests only: if the env var CRL_FAULT_INJECTION_NAN_FILE names a path and that
file exists, the next update consumes (deletes) it and runs on a batch whose states are NaN, so the
real detection and rollback path runs. Nothing happens when the variable is unset.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING, Optional, Tuple

import jax

from crl import metrics as CM
from crl.config import Config, advice
from crl.envs import make_env
from crl.learning import Updater, resolve_num_devices
from crl.tensorboard import ScalarWriter
from learner import metrics as M
from learner.checkpoint import LearnerCheckpointer
from crl.run_marker import marker_path as run_marker_path, read_marker
from learner.loop import LearnerLoop, LoopSettings, LoopState
from learner.publisher import ParamsPublisher
from params import security_from_config, server_from_config

if TYPE_CHECKING:
    from replay.sampler import InsertCount

# Re-exported: tests read these counters through the role module.
CALLS, NONFINITE, NONFINITE_PUBLISH = M.CALLS, M.NONFINITE, M.NONFINITE_PUBLISH
CHECKPOINT_ERRORS = M.CHECKPOINT_ERRORS

FAULT_NAN_FILE_ENV = "CRL_FAULT_INJECTION_NAN_FILE"


class ReplayPoller(threading.Thread):
    """Reads replay's insert count every `period_s` in the background, so the update loop never
    waits on it (a poll of an unreachable replay blocks for up to `timeout_s`). Logs when replay
    becomes unreachable and when it is back; crl_learner_replay_up follows it."""

    def __init__(self, inserts: InsertCount, log, period_s: float = 1.0):
        super().__init__(name="replay-poll", daemon=True)
        self.inserts, self.log, self.period_s = inserts, log, period_s
        self.address, self.timeout_s = inserts.address, inserts.timeout_s
        self._lock = threading.Lock()
        self._inserts: Optional[int] = None
        self._halt = threading.Event()

    def run(self):
        lost_at = None
        while not self._halt.is_set():
            n = self.inserts.read()
            M.REPLAY_UP.set(n is not None)
            if n is not None:
                with self._lock:
                    self._inserts = n
                if lost_at is not None:
                    self.log.info("replay reachable again after %.1fs (%d items inserted so far, "
                                  "as restored)", time.monotonic() - lost_at, n)
                    lost_at = None
            elif lost_at is None and not self._halt.is_set():
                lost_at = time.monotonic()
                self.log.warning("replay at %s unreachable (no answer within %.0fs: down, "
                                 "restarting or busy checkpointing); the sampler and the actors "
                                 "reconnect by themselves", self.address, self.timeout_s)
            self._halt.wait(self.period_s)

    def latest(self) -> Optional[int]:
        with self._lock:
            return self._inserts

    def stop(self):
        self._halt.set()


def _fault_injection_due() -> bool:
    """Test-only hook (module docstring): True once per creation of the trigger file."""
    path = os.environ.get(FAULT_NAN_FILE_ENV)
    if not path:
        return False
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False

def version_skip(cfg: Config) -> int:
    """How far a restart moves the params version past its checkpoint's. Versions are assigned
    when the loop offers a state to the publisher, at most one per `publish_every` update calls
    (at most checkpoint_every // publish_every + 1 in any checkpoint_every calls). A checkpoint
    is started every `checkpoint_every` calls and written in the background, and the next one
    first waits for it, so the newest checkpoint on disk is at most 2 x checkpoint_every calls
    old when the learner dies. The final version is checkpointed (and waited for) before it is
    published."""
    return 2 * (cfg.learner.checkpoint_every // cfg.learner.publish_every + 1) + 1


def _restore(cfg: Config, updater: Updater, checkpointer: LearnerCheckpointer,
             log) -> Tuple[LoopState, bool]:
    """(the loop's state at start, restored?): the newest checkpoint's (restored into
    `updater`) or a fresh one. Params versions never go backwards or repeat: versions assigned
    after that checkpoint are lost with the crash, so a restart skips past all of them
    (version_skip), and past those of a previous start that crashed before its first
    checkpoint (the floor file)."""
    skip = version_skip(cfg)
    floor = checkpointer.version_floor()
    restored = checkpointer.restore(updater.host_state())
    state = LoopState()
    if restored is not None:
        train_state, saved = restored
        updater.load_state(train_state)
        state = LoopState(**{k: saved[k] for k in LoopState.COUNTERS if k in saved})
        state.params_version = max(state.params_version + skip, floor)
        log.info("resumed from %s step %d: sgd_steps=%d, next params version %d",
                 checkpointer.directory, state.update_calls, updater.sgd_steps,
                 state.params_version)
    else:
        state.params_version = max(0, floor)
    state.sgd_steps = updater.sgd_steps
    checkpointer.set_version_floor(state.params_version + skip)
    return state, restored is not None


def _already_finished(cfg: Config, marker_path: str, state: LoopState, restored: bool, log) -> bool:
    """True if a previous start of this run finished it: the marker is there and the checkpoint
    is at or past the budget. A marker with an older checkpoint (the budget was raised) is
    stale: removed, and training goes on."""
    marker = read_marker(marker_path)
    if marker is None:
        return False
    if restored and state.env_steps >= cfg.learner.total_env_steps:
        log.info("%s: the run finished at %s env steps (budget %d); not training: publishing "
                 "the final params again", marker_path, marker.get("env_steps"),
                 cfg.learner.total_env_steps)
        return True
    log.warning("%s says the run finished, but the checkpoint is at %d env steps < budget %d "
                "(learner.total_env_steps raised?); removing it and training on", marker_path,
                state.env_steps, cfg.learner.total_env_steps)
    os.remove(marker_path)
    return False


def run(cfg: Config, stop: Optional[threading.Event] = None, log=None) -> int:
    from replay import TABLE
    from replay.sampler import InsertCount, SegmentSampler, delete_items

    log = log or CM.setup_logging("learner")
    stop = stop or threading.Event()
    security = security_from_config(cfg.service, server=True)   # fail fast on a bad Secret
    env = make_env(cfg.env.name)
    num_devices = resolve_num_devices(cfg.learner.num_devices)
    if cfg.learner.segments_per_call % num_devices or cfg.algo.batch_size % num_devices:
        raise ValueError(f"learner.segments_per_call = {cfg.learner.segments_per_call} and "
                         f"algo.batch_size = {cfg.algo.batch_size} must be divisible by the "
                         f"{num_devices} local devices; set learner.num_devices")
    updater = Updater(cfg, env.state_dim, env.action_size, env.goal_indices,
                      jax.random.PRNGKey(cfg.learner.seed), num_devices)
    device = jax.local_devices()[0] if num_devices == 1 else None
    if device is not None:
        # Commit the state to its device now: restored checkpoints come back committed, and a
        # committed argument is a different jit signature, so a rollback would otherwise cost a
        # full recompile of the update (measured: 12 s stall on CPU).
        updater.load_state(jax.device_put(updater.host_state(), device))
    ckpt_dir = cfg.learner.checkpoint_dir or os.path.join(cfg.run.run_dir, "learner_checkpoints")
    checkpointer = LearnerCheckpointer(ckpt_dir)
    state, restored = _restore(cfg, updater, checkpointer, log)
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    marker_path = run_marker_path(cfg.run.run_dir)
    already_finished = _already_finished(cfg, marker_path, state, restored, log)
    M.FINISHED.set(0)
    M.BUDGET.set(cfg.learner.total_env_steps)
    M.UTD_TARGET.set(cfg.replay.utd)

    # Bind on service.host (127.0.0.1 locally, 0.0.0.0 in a pod) at the port of params_address.
    bind = f"{cfg.service.host}:{cfg.service.params_address.rpartition(':')[2]}"
    server = server_from_config(cfg, bind, security).start()

    def on_published(version: int, seconds: float) -> None:
        M.PUBLISH_SECONDS.observe(seconds)
        M.VERSION.set(version)

    publisher = ParamsPublisher(server, cfg.learner.publish_interval_s, log, on_published,
                                lambda version: M.NONFINITE_PUBLISH.inc())
    rpc_timeout = cfg.service.rpc_timeout_s
    # Replay's insert count as this learner has seen it: never backwards, even if a client
    # resets the table or replay restores an older checkpoint (replay.sampler.InsertCount).
    inserts = InsertCount(cfg.service.replay_address, TABLE, min(rpc_timeout, 3.0))
    poller = ReplayPoller(inserts, log)
    tb = ScalarWriter.for_run(cfg, "learner")
    loop = LearnerLoop(
        LoopSettings.from_config(cfg), updater,
        lambda: SegmentSampler(cfg.service.replay_address, cfg.learner.segments_per_call,
                               timeout_s=rpc_timeout, prefetch=cfg.learner.prefetch,
                               segment_length=cfg.segment_length),
        publisher, checkpointer, log=log, stop=stop, replay_inserts=poller.latest,
        replay_inserts_now=inserts.read,
        delete_items=lambda keys: delete_items(cfg.service.replay_address, TABLE, keys,
                                               rpc_timeout),
        device=device, tb=tb, inject_nan=_fault_injection_due, marker_path=marker_path,
        state=state)

    if already_finished:
        state.phase = "done"
        if loop.publish_current(finished=True):
            loop.mark_finished()
        publisher.stop(timeout_s=rpc_timeout)
    else:
        loop.publish_current()
        publisher.start()
        if not restored:
            loop.checkpoint()   # a good state to roll back to from the very start
        log.info("learner on %d device(s); params at %s (%s); sampling %d segments x %d steps "
                 "per call; publishing at most every %.2f s", num_devices, server.address,
                 security.describe(), cfg.learner.segments_per_call, cfg.segment_length,
                 cfg.learner.publish_interval_s)
        for line in advice(cfg):
            log.warning("config: %s", line)
        if os.environ.get(FAULT_NAN_FILE_ENV):
            log.warning("TEST FAULT INJECTION armed: a NaN batch is injected whenever %s exists",
                        os.environ[FAULT_NAN_FILE_ENV])
        poller.start()
        loop.run()
        poller.stop()
        loop.finish()

    with open(os.path.join(cfg.run.run_dir, "learner_final.json"), "w") as f:
        json.dump(loop.summary(), f)
    if state.reached_budget and not state.exit_code:
        if cfg.learner.exit_at_budget:
            log.info("serving the final params version %d for learner.finish_grace_s = %.0f s "
                     "(followers see finished=1), then exiting", publisher.published_version,
                     cfg.learner.finish_grace_s)
            stop.wait(cfg.learner.finish_grace_s)
        else:
            log.info("learner.exit_at_budget is false: serving params version %d until stopped",
                     publisher.published_version)
            stop.wait()
    server.stop(grace=1.0)
    checkpointer.close()
    tb.close()
    return state.exit_code


def main(cfg: Config, args) -> int:
    return CM.run_role("learner", cfg, args, lambda stop, log: run(cfg, stop, log))
