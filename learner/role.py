"""The learner role: sample segments from replay, update (pmap over local devices), publish params.

Thin shell around crl.learning.Updater (the update the in-process driver uses):
  - publishes the initial params at once, so actors can prefill replay with the untrained policy;
  - samples `learner.segments_per_call` segments per call through the prefetching SegmentSampler
    (the Reverb rate limiter decides when a sample may happen: that is what holds the UTD);
  - publishes every `publish_every` calls through the ParameterService;
  - checkpoints its whole state with Orbax every `checkpoint_every` calls, at the end and on
    SIGTERM; resumes from the newest checkpoint. Params versions never go backwards or repeat: after
    a restart it skips every version it may have published after its last checkpoint;
  - stops when replay has received `learner.total_env_steps` env steps;
  - non-finite data or updates (docs/reliability.md): a sampled batch holding NaN/Inf is not
    used and its items are deleted from replay (crl_learner_nonfinite_segments_total); an update
    whose losses or new params are NaN/Inf is not published or checkpointed, the state rolls back
    to the newest checkpoint (crl_learner_nonfinite_updates_total) and training goes on; after
    MAX_CONSECUTIVE_NONFINITE in a row the learner exits 1 (training diverges: fix the config).

Fault injection for tests only: if the env var CRL_FAULT_INJECTION_NAN_FILE names a path and that
file exists, the next update consumes (deletes) it and runs on a batch whose states are NaN, so the
real detection and rollback path runs. Nothing happens when the variable is unset.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import prometheus_client as prom

from crl import metrics as M
from crl.config import Config
from crl.envs import make_env
from crl.learning import Updater, resolve_num_devices
from crl.params_service import security_from_config, server_from_config
from learner.checkpoint import LearnerCheckpointer

SGD_STEPS = prom.Gauge("crl_learner_sgd_steps", "SGD steps taken (minibatches)")
CALLS = prom.Counter("crl_learner_update_calls_total", "Compiled update calls")
SAMPLES = prom.Counter("crl_learner_segments_sampled_total", "Segments sampled from replay")
WAIT_SECONDS = prom.Counter("crl_learner_wait_seconds_total", "Time waiting for replay samples")
COMPUTE_SECONDS = prom.Counter("crl_learner_compute_seconds_total", "Time in the update")
ENV_STEPS = prom.Gauge("crl_learner_env_steps", "Env steps replay has received")
UTD = prom.Gauge("crl_learner_utd", "Measured gradient steps per env step after the prefill")
UTD_TARGET = prom.Gauge("crl_learner_utd_target", "Configured gradient steps per env step")
VERSION = prom.Gauge("crl_learner_params_version", "Newest published params version")
LAG = prom.Gauge("crl_learner_policy_lag", "Params version minus the mean version of the sampled data")
PUBLISH_SECONDS = prom.Histogram("crl_learner_publish_seconds", "Time to publish params",
                                 buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5))
CHECKPOINT_SECONDS = prom.Gauge("crl_learner_checkpoint_seconds", "Duration of the last checkpoint")
NONFINITE = prom.Counter("crl_learner_nonfinite_updates_total",
                         "Updates whose loss or params were NaN/Inf (dropped, state rolled back)")
REPLAY_UP = prom.Gauge("crl_learner_replay_up", "1 if replay answered the last poll (every 1 s)")
NONFINITE_SEGMENTS = prom.Counter("crl_learner_nonfinite_segments_total",
                                  "Sampled segments holding NaN/Inf (batch dropped, items deleted)")
LOSS = prom.Gauge("crl_learner_metric", "Loss metrics of the last update", ["name"])

MAX_CONSECUTIVE_NONFINITE = 10
FAULT_NAN_FILE_ENV = "CRL_FAULT_INJECTION_NAN_FILE"


@jax.jit
def _all_finite(tree) -> jax.Array:
    """True iff every float leaf of `tree` is finite (one fused reduction on device)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _nonfinite_rows(data) -> np.ndarray:
    """[N] bool: segments whose float fields hold NaN/Inf."""
    bad = None
    for v in data.values():
        if np.issubdtype(v.dtype, np.floating):
            b = ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1)
            bad = b if bad is None else bad | b
    return bad if bad is not None else np.zeros(0, bool)


def _delete_items(address: str, table: str, keys, timeout_s: float, log) -> None:
    """Deletes items from replay (bounded: the Reverb call has no deadline of its own)."""
    import reverb

    def go():
        try:
            reverb.Client(address).mutate_priorities(table, deletes=[int(k) for k in keys])
        except Exception as e:
            log.warning("could not delete %d non-finite items from replay: %s", len(keys), e)
    t = threading.Thread(target=go, name="delete-nonfinite", daemon=True)
    t.start()
    t.join(timeout_s)


class ReplayPoller(threading.Thread):
    """Reads replay's insert count every `period_s` in the background, so the update loop never
    waits on it (a poll of an unreachable replay blocks for up to `timeout_s`). Logs when replay
    becomes unreachable and when it is back; crl_learner_replay_up follows it."""

    def __init__(self, address: str, table: str, timeout_s: float, log, period_s: float = 1.0):
        super().__init__(name="replay-poll", daemon=True)
        self.address, self.table, self.timeout_s, self.log = address, table, timeout_s, log
        self.period_s = period_s
        self._lock = threading.Lock()
        self._inserts: Optional[int] = None
        self._halt = threading.Event()

    def run(self):
        lost_at = None
        while not self._halt.is_set():
            n = _replay_inserts(self.address, self.table, self.timeout_s)
            REPLAY_UP.set(n is not None)
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

COUNTERS = ("params_version", "update_calls", "env_steps")


def _replay_inserts(address: str, table: str, timeout_s: float) -> Optional[int]:
    import reverb
    try:
        info = reverb.Client(address).server_info(max(1, int(math.ceil(timeout_s))))[table]
    except Exception:
        return None
    return int(info.rate_limiter_info.insert_stats.completed)


def run(cfg: Config, stop: Optional[threading.Event] = None, log=None) -> int:
    from replay import TABLE, ReplayTimeout, ReplayUnavailable
    from replay.sampler import SegmentSampler

    log = log or M.setup_logging("learner")
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
    if num_devices == 1:
        # Commit the state to its device now: restored checkpoints come back committed, and a
        # committed argument is a different jit signature, so a rollback would otherwise cost a
        # full recompile of the update (measured: 12 s stall on CPU).
        updater.load_state(jax.device_put(updater.host_state(), jax.local_devices()[0]))
    ckpt_dir = cfg.learner.checkpoint_dir or os.path.join(cfg.run.run_dir, "learner_checkpoints")
    checkpointer = LearnerCheckpointer(ckpt_dir)
    counters = {"params_version": 0, "update_calls": 0, "env_steps": 0}
    restored = checkpointer.restore(updater.host_state())
    if restored is not None:
        state, saved = restored
        updater.load_state(state)
        counters.update(saved)
        # Versions published after that checkpoint are lost with the crash: skip past all of them.
        counters["params_version"] += cfg.learner.checkpoint_every // cfg.learner.publish_every + 1
        log.info("resumed from %s step %d: sgd_steps=%d, next params version %d", ckpt_dir,
                 checkpointer.latest_step(), updater.sgd_steps, counters["params_version"])

    # Bind on service.host (127.0.0.1 locally, 0.0.0.0 in a pod) at the port of params_address.
    bind = f"{cfg.service.host}:{cfg.service.params_address.rpartition(':')[2]}"
    server = server_from_config(cfg, bind, security).start()

    def state_finite() -> bool:
        st = updater.state
        return bool(_all_finite((st.actor_params, st.critic_params, st.log_alpha)))

    def publish():
        t0 = time.perf_counter()
        st = updater.host_state()
        server.publish({"actor": st.actor_params, "critic": st.critic_params},
                       counters["params_version"])
        PUBLISH_SECONDS.observe(time.perf_counter() - t0)
        VERSION.set(counters["params_version"])

    def checkpoint():
        t0 = time.perf_counter()
        checkpointer.save(counters["update_calls"], updater.host_state(), counters)
        CHECKPOINT_SECONDS.set(time.perf_counter() - t0)

    publish()
    if restored is None:
        checkpoint()   # a good state to roll back to from the very start
    UTD_TARGET.set(cfg.replay.utd)
    T = cfg.segment_length
    sampler = None
    backoff = M.Backoff()
    last_poll = 0.0
    log.info("learner on %d device(s); params at %s (%s); sampling %d segments x %d steps per call",
             num_devices, server.address, security.describe(), cfg.learner.segments_per_call, T)
    if os.environ.get(FAULT_NAN_FILE_ENV):
        log.warning("TEST FAULT INJECTION armed: a NaN batch is injected whenever %s exists",
                    os.environ[FAULT_NAN_FILE_ENV])
    consecutive_bad = 0
    poller = ReplayPoller(cfg.service.replay_address, TABLE, min(cfg.service.rpc_timeout_s, 3.0),
                          log)
    poller.start()
    stopped_by = "signal"
    exit_code = 0
    while not stop.is_set():
        now = time.monotonic()
        if now - last_poll > 1.0:
            inserts = poller.latest()
            if inserts is not None:
                counters["env_steps"] = inserts * T
                ENV_STEPS.set(counters["env_steps"])
                after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
                if after_prefill > 0:
                    UTD.set(updater.sgd_steps / after_prefill)
            last_poll = now
            if counters["env_steps"] >= cfg.learner.total_env_steps:
                log.info("budget reached: %d env steps", counters["env_steps"])
                stopped_by = "budget"
                break
        t0 = time.perf_counter()
        try:
            if sampler is None:
                sampler = SegmentSampler(cfg.service.replay_address, cfg.learner.segments_per_call,
                                         timeout_s=cfg.service.rpc_timeout_s,
                                         prefetch=cfg.learner.prefetch)
            batch = sampler.sample(timeout_s=1.0)
            backoff.reset()
        except ReplayTimeout:
            WAIT_SECONDS.inc(time.perf_counter() - t0)
            continue   # rate limiter: actors have not inserted enough yet
        except (ReplayUnavailable, ConnectionError, OSError) as e:
            delay = backoff.next()
            log.warning("replay unavailable (%s); retrying in %.1fs", e, delay)
            if sampler is not None:
                sampler.close()
            sampler = None
            stop.wait(delay)
            continue
        WAIT_SECONDS.inc(time.perf_counter() - t0)
        bad_rows = _nonfinite_rows(batch.data)
        if bad_rows.any():
            keys = batch.info["key"][bad_rows]
            NONFINITE_SEGMENTS.inc(int(bad_rows.sum()))
            log.error("sampled batch holds %d segment(s) with NaN/Inf (replay keys %s): batch not "
                      "used, items deleted from replay", int(bad_rows.sum()),
                      [int(k) for k in keys[:8]])
            _delete_items(cfg.service.replay_address, TABLE, keys, cfg.service.rpc_timeout_s, log)
            continue
        data = batch.data
        if _fault_injection_due():
            log.warning("TEST FAULT INJECTION: running this update on NaN states")
            data = dict(data, state=np.full_like(data["state"], np.nan))
        t0 = time.perf_counter()
        metrics = updater.update(data)
        finite = all(np.isfinite(v) for v in metrics.values()) and state_finite()
        COMPUTE_SECONDS.inc(time.perf_counter() - t0)
        if not finite:
            NONFINITE.inc()
            consecutive_bad += 1
            log.error("non-finite update (losses %s; params finite: %s): not published; rolling "
                      "back to checkpoint %s (%d in a row)",
                      {k: v for k, v in metrics.items() if not np.isfinite(v)} or "finite",
                      state_finite(), checkpointer.latest_step(), consecutive_bad)
            updater.load_state(checkpointer.restore(updater.host_state())[0])
            if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                log.error("%d non-finite updates in a row: training diverges (lower the learning "
                          "rates?); exiting", consecutive_bad)
                exit_code = 1
                break
            continue
        consecutive_bad = 0
        counters["update_calls"] += 1
        CALLS.inc()
        SAMPLES.inc(cfg.learner.segments_per_call)
        SGD_STEPS.set(updater.sgd_steps)
        for k, v in metrics.items():
            LOSS.labels(name=k).set(v)
        LAG.set(counters["params_version"] - float(np.mean(batch.data["params_version"])))
        if counters["update_calls"] % cfg.learner.publish_every == 0:
            counters["params_version"] += 1
            publish()
        if counters["update_calls"] % cfg.learner.checkpoint_every == 0:
            checkpoint()
        if counters["update_calls"] % 50 == 0:
            log.info("calls=%d sgd_steps=%d env_steps=%d version=%d critic_loss=%.3f acc=%.3f",
                     counters["update_calls"], updater.sgd_steps, counters["env_steps"],
                     counters["params_version"], metrics["critic_loss"],
                     metrics["categorical_accuracy"])
    poller.stop()
    if sampler is not None:
        sampler.close(timeout_s=1.0)   # its thread may sit in a rate-limited sample; a daemon
    if state_finite():   # never checkpoint a bad state (the loop rolls back before getting here)
        checkpoint()
    log.info("final checkpoint at update call %d (sgd_steps=%d); stopping",
             counters["update_calls"], updater.sgd_steps)
    server.stop(grace=1.0)
    checkpointer.close()
    after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
    with open(os.path.join(cfg.run.run_dir, "learner_final.json"), "w") as f:
        json.dump({**counters, "sgd_steps": updater.sgd_steps,
                   "utd": updater.sgd_steps / after_prefill if after_prefill > 0 else None,
                   "utd_target": cfg.replay.utd, "stopped_by": stopped_by,
                   "exit_code": exit_code}, f)
    return exit_code


def main(cfg: Config, args) -> int:
    return M.run_role("learner", cfg, args, lambda stop, log: run(cfg, stop, log))
