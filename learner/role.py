"""The learner role: sample segments from replay, update (pmap over local devices), publish params.

Thin shell around crl.learning.Updater (the update the in-process driver uses):
  - publishes the initial params at once, so actors can prefill replay with the untrained policy;
  - samples `learner.segments_per_call` segments per call through the prefetching SegmentSampler
    (the Reverb rate limiter decides when a sample may happen: that is what holds the UTD);
  - pipelines the calls: call k+1 is dispatched (its batch already copied to the device) before
    the results of call k are read, so the host's work overlaps the compute; a call counts once
    its results are read and found finite;
  - publishes off the update loop (learner/publisher.py): when the publisher thread is ready (at
    most every `publish_interval_s`, and at least `publish_every` calls apart) the loop hands it
    an on-device copy of the newest finite params under the next version; the thread copies,
    serialises and publishes it while the loop goes on. While the loop idles (rate limiter) the
    newest state is handed over too, so it reaches the actors without further updates;
  - checkpoints its whole state with Orbax every `checkpoint_every` calls (written in the
    background: the loop waits only for the copy to the host), at the end and on SIGTERM;
    resumes from the newest checkpoint. Params versions never go backwards or repeat: after a
    restart it skips every version it may have assigned after its last checkpoint
    (`version_skip`), and past those of a previous start that crashed before checkpointing
    (the version floor file beside the checkpoints);
  - stops when replay has received `learner.total_env_steps` env steps, after doing the update
    calls still owed for the last data (utd x env steps after the prefill, as the driver counts
    them; the rate limiter permitting); publishes and checkpoints the final state; then exits 0,
    or with `learner.exit_at_budget: false` serves the final params until SIGTERM;
  - SIGTERM: the publisher thread stops (a publication in flight completes), the final state is
    checkpointed and published (if newer than the last published), and the role exits 0;
  - non-finite data or updates (docs/reliability.md): a sampled batch holding NaN/Inf is not
    used and its items are deleted from replay (crl_learner_nonfinite_segments_total); an update
    whose losses or new params are NaN/Inf is not published or checkpointed, the state rolls back
    to the newest checkpoint (crl_learner_nonfinite_updates_total) and training goes on (the call
    dispatched on top of it is dropped too); after MAX_CONSECUTIVE_NONFINITE in a row the
    learner exits 1 (training diverges: fix the config). The publisher checks every snapshot
    again on the host and refuses a non-finite one (crl_learner_nonfinite_publish_refused_total).

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
import numpy as np
import prometheus_client as prom

from crl import metrics as M
from crl.config import Config, advice
from crl.envs import make_env
from crl.learning import (PROGRESS_KEY, Updater, all_finite, params_of, progress_of,
                          resolve_num_devices)
from params import security_from_config, server_from_config
from crl.tensorboard import ScalarWriter
from learner.checkpoint import LearnerCheckpointer
from learner.publisher import ParamsPublisher

SGD_STEPS = prom.Gauge("crl_learner_sgd_steps", "SGD steps taken (minibatches)")
CALLS = prom.Counter("crl_learner_update_calls_total", "Compiled update calls")
SAMPLES = prom.Counter("crl_learner_segments_sampled_total", "Segments sampled from replay")
WAIT_SECONDS = prom.Counter("crl_learner_wait_seconds_total", "Time waiting for replay samples")
COMPUTE_SECONDS = prom.Counter("crl_learner_compute_seconds_total",
                              "Time the update loop spends dispatching updates and waiting for them")
ENV_STEPS = prom.Gauge("crl_learner_env_steps", "Env steps replay has received")
UTD = prom.Gauge("crl_learner_utd", "Measured gradient steps per env step after the prefill")
UTD_TARGET = prom.Gauge("crl_learner_utd_target", "Configured gradient steps per env step")
VERSION = prom.Gauge("crl_learner_params_version", "Newest published params version")
LAG = prom.Gauge("crl_learner_policy_lag", "Params version minus the mean version of the sampled data")
PUBLISH_SECONDS = prom.Histogram("crl_learner_publish_seconds",
                                 "Time to publish params (on the publisher thread)",
                                 buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5))
CHECKPOINT_SECONDS = prom.Gauge("crl_learner_checkpoint_seconds",
                                "Time the loop spent on the last checkpoint (periodic ones are "
                                "written in the background after that)")
CHECKPOINT_ERRORS = prom.Counter("crl_learner_checkpoint_errors_total",
                                 "Checkpoint saves that failed (disk full, volume gone)")
NONFINITE = prom.Counter("crl_learner_nonfinite_updates_total",
                         "Updates whose loss or params were NaN/Inf (dropped, state rolled back)")
REPLAY_UP = prom.Gauge("crl_learner_replay_up", "1 if replay answered the last poll (every 1 s)")
NONFINITE_SEGMENTS = prom.Counter("crl_learner_nonfinite_segments_total",
                                  "Sampled segments holding NaN/Inf (batch dropped, items deleted)")
LOSS = prom.Gauge("crl_learner_metric", "Loss metrics of the last update", ["name"])
NONFINITE_PUBLISH = prom.Counter("crl_learner_nonfinite_publish_refused_total",
                                 "Params snapshots the publisher refused because they held NaN/Inf")

MAX_CONSECUTIVE_NONFINITE = 10
FAULT_NAN_FILE_ENV = "CRL_FAULT_INJECTION_NAN_FILE"


# No env of this project produces a state or action component near this (positions and
# velocities are O(10-1000), actions in [-1, 1]); finite values past it (1e30 written by a
# hostile client) made every update non-finite, so they are quarantined like NaN.
MAX_ABS_VALUE = 1e6


def _nonfinite_rows(data) -> np.ndarray:
    """[N] bool: segments whose float fields hold NaN/Inf or a value beyond +-MAX_ABS_VALUE."""
    bad = None
    for v in data.values():
        if np.issubdtype(v.dtype, np.floating):
            flat = v.reshape(v.shape[0], -1)
            b = ~(np.abs(flat) <= MAX_ABS_VALUE).all(axis=1)   # NaN compares False
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


def version_skip(cfg: Config) -> int:
    """How far a restart moves the params version past its checkpoint's. Versions are assigned
    when the loop offers a state to the publisher, at most one per `publish_every` update calls
    (at most checkpoint_every // publish_every + 1 in any checkpoint_every calls). A checkpoint
    is started every `checkpoint_every` calls and written in the background, and the next one
    first waits for it, so the newest checkpoint on disk is at most 2 x checkpoint_every calls
    old when the learner dies. The final version is checkpointed (and waited for) before it is
    published."""
    return 2 * (cfg.learner.checkpoint_every // cfg.learner.publish_every + 1) + 1


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
    device = jax.local_devices()[0]
    if num_devices == 1:
        # Commit the state to its device now: restored checkpoints come back committed, and a
        # committed argument is a different jit signature, so a rollback would otherwise cost a
        # full recompile of the update (measured: 12 s stall on CPU).
        updater.load_state(jax.device_put(updater.host_state(), device))
    ckpt_dir = cfg.learner.checkpoint_dir or os.path.join(cfg.run.run_dir, "learner_checkpoints")
    checkpointer = LearnerCheckpointer(ckpt_dir)
    counters = {"params_version": 0, "update_calls": 0, "env_steps": 0}
    skip = version_skip(cfg)
    floor = checkpointer.version_floor()
    restored = checkpointer.restore(updater.host_state())
    if restored is not None:
        state, saved = restored
        updater.load_state(state)
        counters.update(saved)
        # Versions assigned after that checkpoint are lost with the crash: skip past all of them,
        # and past those of a previous start that crashed before its first checkpoint (floor).
        counters["params_version"] = max(counters["params_version"] + skip, floor)
        log.info("resumed from %s step %d: sgd_steps=%d, next params version %d", ckpt_dir,
                 saved["update_calls"], updater.sgd_steps, counters["params_version"])
    else:
        counters["params_version"] = max(0, floor)
    checkpointer.set_version_floor(counters["params_version"] + skip)

    # Bind on service.host (127.0.0.1 locally, 0.0.0.0 in a pod) at the port of params_address.
    bind = f"{cfg.service.host}:{cfg.service.params_address.rpartition(':')[2]}"
    server = server_from_config(cfg, bind, security).start()

    def on_published(version: int, seconds: float) -> None:
        PUBLISH_SECONDS.observe(seconds)
        VERSION.set(version)

    publisher = ParamsPublisher(server, cfg.learner.publish_interval_s, log, on_published,
                                lambda version: NONFINITE_PUBLISH.inc())

    def state_finite() -> bool:
        st = updater.host_state()
        return bool(all_finite((st.actor_params, st.critic_params, st.log_alpha)))

    def checkpoint(wait: bool = True) -> bool:
        """wait=False (the periodic ones): the loop waits only for the copy to the host; the
        files are written in the background. A failed save (disk full, volume gone; a background
        one surfaces at the next save) is logged and counted and training goes on: the older
        checkpoints stay, and the next interval tries again."""
        t0 = time.perf_counter()
        try:
            checkpointer.save(counters["update_calls"], updater.host_state(), counters, wait=wait)
        except Exception as e:   # noqa: BLE001 - orbax raises many types for I/O errors
            CHECKPOINT_ERRORS.inc()
            log.error("checkpoint at update call %d failed (%s: %s); the newest on disk is "
                      "step %s; retrying at the next one", counters["update_calls"],
                      type(e).__name__, str(e)[:300], checkpointer.latest_step())
            return False
        CHECKPOINT_SECONDS.set(time.perf_counter() - t0)
        return True

    def tagged(params, sgd_steps: int):
        """params with this version's place on the paper's axes (crl.learning.progress_of)."""
        return {**params, PROGRESS_KEY: progress_of(counters["env_steps"], sgd_steps)}

    publisher.publish_now(counters["params_version"],
                          tagged(params_of(updater.host_state()), updater.sgd_steps))
    publisher.start()
    if restored is None:
        checkpoint()   # a good state to roll back to from the very start
    UTD_TARGET.set(cfg.replay.utd)
    T = cfg.segment_length
    U = cfg.unroll_length   # new env steps per inserted item (its window holds T)
    every = cfg.learner.publish_every
    sampler = None
    backoff = M.Backoff()
    last_poll = 0.0
    log.info("learner on %d device(s); params at %s (%s); sampling %d segments x %d steps per "
             "call; publishing at most every %.2f s", num_devices, server.address,
             security.describe(), cfg.learner.segments_per_call, T,
             cfg.learner.publish_interval_s)
    for line in advice(cfg):
        log.warning("config: %s", line)
    if os.environ.get(FAULT_NAN_FILE_ENV):
        log.warning("TEST FAULT INJECTION armed: a NaN batch is injected whenever %s exists",
                    os.environ[FAULT_NAN_FILE_ENV])
    poller = ReplayPoller(cfg.service.replay_address, TABLE, min(cfg.service.rpc_timeout_s, 3.0),
                          log)
    poller.start()

    # The pipeline: call k+1 is dispatched before the results of call k are read, so sampling,
    # the host-side checks and the host-to-device copy of the next batch overlap the compute.
    # A call counts (update_calls, published, checkpointed) only once its results are read and
    # found finite ("settled"); a non-finite one rolls back to the checkpoint, dropping the call
    # dispatched on top of it.
    loop = {"pending": [], "bad": 0, "exit": 0, "sgd_steps": updater.sgd_steps,
            "offered_calls": counters["update_calls"], "dirty": False, "mode": "train",
            "owed": 0, "ckpt_due": False}
    pending = loop["pending"]   # [(UpdateResult, mean params version of its batch)]
    tb = ScalarWriter.for_run(cfg, "learner")
    curves = {"t": time.monotonic(), "sgd": loop["sgd_steps"]}   # last TensorBoard write

    def offer(params) -> None:
        counters["params_version"] += 1
        publisher.offer(counters["params_version"], tagged(params, loop["sgd_steps"]))
        loop["offered_calls"] = counters["update_calls"]
        loop["dirty"] = False

    def rollback(metrics) -> None:
        NONFINITE.inc()
        loop["bad"] += 1
        pending.clear()   # calls dispatched on top of the bad state
        log.error("non-finite update (losses %s): not published; rolling back to checkpoint "
                  "%s (%d in a row)", {k: v for k, v in metrics.items() if not np.isfinite(v)}
                  or "finite, params not", checkpointer.latest_step(), loop["bad"])
        state = checkpointer.restore(updater.host_state())[0]
        updater.load_state(state)
        loop["sgd_steps"] = int(state.steps)
        loop["dirty"] = True
        if loop["bad"] >= MAX_CONSECUTIVE_NONFINITE:
            log.error("%d non-finite updates in a row: training diverges (lower the learning "
                      "rates?); exiting", loop["bad"])
            loop["exit"] = 1

    def settle() -> bool:
        """Reads the oldest pending call (waiting for it); False if it was non-finite."""
        r, data_version = pending.pop(0)
        t0 = time.perf_counter()
        finite = bool(r.finite)
        metrics = {k: float(v) for k, v in r.metrics.items()}
        COMPUTE_SECONDS.inc(time.perf_counter() - t0)
        if not finite:
            rollback(metrics)
            return False
        loop["bad"] = 0
        counters["update_calls"] += 1
        loop["sgd_steps"] = int(r.steps)
        loop["dirty"] = True
        CALLS.inc()
        SAMPLES.inc(cfg.learner.segments_per_call)
        SGD_STEPS.set(loop["sgd_steps"])
        for k, v in metrics.items():
            LOSS.labels(name=k).set(v)
        now = time.monotonic()
        if now - curves["t"] >= 1.0:   # TensorBoard: every scalar once a second, on env steps
            after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
            tb.write(counters["env_steps"], {
                **metrics, "sgd_steps": loop["sgd_steps"],
                "sgd_steps_per_s": (loop["sgd_steps"] - curves["sgd"]) / (now - curves["t"]),
                "utd": loop["sgd_steps"] / after_prefill if after_prefill > 0 else 0.0,
                "policy_lag_versions": counters["params_version"] - data_version,
                "params_version": counters["params_version"]}, "learner/")
            curves.update(t=now, sgd=loop["sgd_steps"])
        LAG.set(counters["params_version"] - data_version)
        if r.params is not None and counters["update_calls"] - loop["offered_calls"] >= every:
            offer(r.params)
        if counters["update_calls"] % cfg.learner.checkpoint_every == 0:
            loop["ckpt_due"] = True
        if loop["mode"] == "owed":
            loop["owed"] -= 1
        if counters["update_calls"] % 50 == 0:
            log.info("calls=%d sgd_steps=%d env_steps=%d version=%d critic_loss=%.3f acc=%.3f",
                     counters["update_calls"], loop["sgd_steps"], counters["env_steps"],
                     counters["params_version"], metrics["critic_loss"],
                     metrics["categorical_accuracy"])
        return True

    def drain() -> bool:
        ok = True
        while pending:
            ok = settle() and ok
        return ok

    def after_settling() -> None:
        if loop["ckpt_due"]:
            if drain():   # checkpoint a settled state only
                checkpoint(wait=False)
            loop["ckpt_due"] = False

    def offer_current() -> None:
        """While idle: offer the newest settled state if it was not offered yet (so it reaches
        the actors without waiting for more updates)."""
        if (not pending and loop["dirty"]
                and counters["update_calls"] - loop["offered_calls"] >= every):
            offer(updater.params_snapshot())

    def start_owed() -> None:
        """At the budget: the SGD steps still owed for the data inserted so far (as the driver
        counts them: utd x env steps after the prefill), done before the final publish."""
        inserts = _replay_inserts(cfg.service.replay_address, TABLE,
                                  min(cfg.service.rpc_timeout_s, 3.0))
        if inserts is not None:
            counters["env_steps"] = max(counters["env_steps"], inserts * U)
            ENV_STEPS.set(counters["env_steps"])
        owed_steps = (cfg.replay.utd * (counters["env_steps"] - cfg.replay.min_size_steps)
                      - loop["sgd_steps"])
        loop["owed"] = max(0, int(math.floor(owed_steps / cfg.learner.minibatches_per_call
                                             + 1e-9)))
        loop["mode"] = "owed"
        log.info("budget reached: %d env steps; %d update call(s) owed for the last data",
                 counters["env_steps"], loop["owed"])

    stopped_by = "signal"
    while not stop.is_set() and not loop["exit"]:
        now = time.monotonic()
        if loop["mode"] == "train" and now - last_poll > 1.0:
            inserts = poller.latest()
            if inserts is not None:
                counters["env_steps"] = inserts * U   # one item brings U new env steps
                ENV_STEPS.set(counters["env_steps"])
                after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
                if after_prefill > 0:
                    UTD.set(loop["sgd_steps"] / after_prefill)
            last_poll = now
            if counters["env_steps"] >= cfg.learner.total_env_steps:
                if not drain():
                    continue   # rolled back (or diverged): the owed count starts from there
                stopped_by = "budget"
                start_owed()
        if loop["mode"] == "owed" and loop["owed"] - len(pending) <= 0:
            if drain() and loop["owed"] <= 0:
                break
            continue
        while pending and pending[0][0].finite.is_ready():
            settle()   # already done: read it now (its params reach the publisher sooner)
        if loop["exit"]:
            break
        t0 = time.perf_counter()
        try:
            if sampler is None:
                sampler = SegmentSampler(cfg.service.replay_address, cfg.learner.segments_per_call,
                                         timeout_s=cfg.service.rpc_timeout_s,
                                         prefetch=cfg.learner.prefetch, segment_length=T)
            batch = sampler.sample(timeout_s=1.0)
            backoff.reset()
        except ReplayTimeout:
            WAIT_SECONDS.inc(time.perf_counter() - t0)
            drain()
            after_settling()
            offer_current()
            if loop["mode"] == "owed" and not loop["exit"]:
                log.warning("the rate limiter holds the %d update call(s) still owed; stopping "
                            "without them", loop["owed"])
                break
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
            log.error("sampled batch holds %d segment(s) with NaN/Inf or |x| > 1e6 (replay keys %s): batch not "
                      "used, items deleted from replay", int(bad_rows.sum()),
                      [int(k) for k in keys[:8]])
            _delete_items(cfg.service.replay_address, TABLE, keys, cfg.service.rpc_timeout_s, log)
            continue
        data = {k: batch.data[k] for k in ("state", "action", "episode_id")}
        if _fault_injection_due():
            log.warning("TEST FAULT INJECTION: running this update on NaN states")
            data = dict(data, state=np.full_like(data["state"], np.nan))
        data_version = float(np.mean(batch.data["params_version"]))
        t0 = time.perf_counter()
        if num_devices == 1:
            data = jax.device_put(data, device)
        # Snapshot the new params only when the publisher would take them at once; none is
        # pending already; and the spacing of versions allows one.
        snapshot = (publisher.wants() and not any(r.params is not None for r, _ in pending)
                    and counters["update_calls"] + len(pending) + 1 - loop["offered_calls"]
                    >= every)
        pending.append((updater.update_async(data, snapshot=snapshot), data_version))
        COMPUTE_SECONDS.inc(time.perf_counter() - t0)
        while len(pending) > 1 and not loop["exit"]:
            settle()
        if pending and (counters["update_calls"] + 1) % cfg.learner.checkpoint_every == 0:
            drain()   # the call in flight is due for a checkpoint
        after_settling()

    poller.stop()
    if loop["exit"]:
        pending.clear()
    else:
        drain()   # a non-finite last call rolls back as in the loop
    if sampler is not None:
        sampler.close(timeout_s=1.0)   # its thread may sit in a rate-limited sample; a daemon
    leftover = publisher.stop(timeout_s=cfg.service.rpc_timeout_s)
    if leftover is not None:
        log.info("final: version %d was offered but not published yet", leftover[0])
    if state_finite():   # never publish or checkpoint a bad state
        if loop["dirty"]:
            counters["params_version"] += 1   # the final state was never offered
        checkpoint()     # first, so a version published is always covered by a checkpoint
        if publisher.published_version < counters["params_version"]:
            publisher.publish_now(counters["params_version"],
                                  tagged(params_of(updater.host_state()), loop["sgd_steps"]))
    log.info("final checkpoint at update call %d (sgd_steps=%d), params version %d published",
             counters["update_calls"], loop["sgd_steps"], publisher.published_version)

    after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
    with open(os.path.join(cfg.run.run_dir, "learner_final.json"), "w") as f:
        json.dump({**counters, "sgd_steps": loop["sgd_steps"],
                   "utd": loop["sgd_steps"] / after_prefill if after_prefill > 0 else None,
                   "utd_target": cfg.replay.utd, "stopped_by": stopped_by,
                   "exit_code": loop["exit"]}, f)
    if stopped_by == "budget" and not loop["exit"] and not cfg.learner.exit_at_budget:
        log.info("learner.exit_at_budget is false: serving params version %d until stopped",
                 publisher.published_version)
        stop.wait()
    server.stop(grace=1.0)
    checkpointer.close()
    tb.close()
    return loop["exit"]


def main(cfg: Config, args) -> int:
    return M.run_role("learner", cfg, args, lambda stop, log: run(cfg, stop, log))
