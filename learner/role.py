"""The learner role: sample segments from replay, update (pmap over local devices), publish params.

Thin shell around crl.learning.Updater (the update the in-process driver uses):
  - publishes the initial params at once, so actors can prefill replay with the untrained policy;
  - samples `learner.segments_per_call` segments per call through the prefetching SegmentSampler
    (the Reverb rate limiter decides when a sample may happen: that is what holds the UTD);
  - publishes every `publish_every` calls through the ParameterService;
  - checkpoints its whole state with Orbax every `checkpoint_every` calls, at the end and on
    SIGTERM; resumes from the newest checkpoint. Params versions never go backwards or repeat: after
    a restart it skips every version it may have published after its last checkpoint;
  - stops when replay has received `learner.total_env_steps` env steps.
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
from crl.config import Config
from crl.envs import make_env
from crl.learning import Updater, resolve_num_devices
from crl.params_service import ParameterServer
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
LOSS = prom.Gauge("crl_learner_metric", "Loss metrics of the last update", ["name"])

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
    env = make_env(cfg.env.name)
    num_devices = resolve_num_devices(cfg.learner.num_devices)
    if cfg.learner.segments_per_call % num_devices or cfg.algo.batch_size % num_devices:
        raise ValueError(f"learner.segments_per_call = {cfg.learner.segments_per_call} and "
                         f"algo.batch_size = {cfg.algo.batch_size} must be divisible by the "
                         f"{num_devices} local devices; set learner.num_devices")
    updater = Updater(cfg, env.state_dim, env.action_size, env.goal_indices,
                      jax.random.PRNGKey(cfg.learner.seed), num_devices)
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
    server = ParameterServer(bind, max_message_mb=cfg.service.max_message_mb).start()

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
    log.info("learner on %d device(s); params at %s; sampling %d segments x %d steps per call",
             num_devices, server.address, cfg.learner.segments_per_call, T)
    while not stop.is_set():
        now = time.monotonic()
        if now - last_poll > 1.0:
            inserts = _replay_inserts(cfg.service.replay_address, TABLE, cfg.service.rpc_timeout_s)
            if inserts is not None:
                counters["env_steps"] = inserts * T
                ENV_STEPS.set(counters["env_steps"])
                after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
                if after_prefill > 0:
                    UTD.set(updater.sgd_steps / after_prefill)
            last_poll = now
            if counters["env_steps"] >= cfg.learner.total_env_steps:
                log.info("budget reached: %d env steps", counters["env_steps"])
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
        t0 = time.perf_counter()
        metrics = updater.update(batch.data)
        COMPUTE_SECONDS.inc(time.perf_counter() - t0)
        if not all(np.isfinite(v) for v in metrics.values()):
            NONFINITE.inc()
            log.error("non-finite update (%s): not published; rolling back to checkpoint %s",
                      {k: v for k, v in metrics.items() if not np.isfinite(v)},
                      checkpointer.latest_step())
            updater.load_state(checkpointer.restore(updater.host_state())[0])
            continue
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
    if sampler is not None:
        sampler.close()
    checkpoint()
    log.info("final checkpoint at update call %d (sgd_steps=%d); stopping",
             counters["update_calls"], updater.sgd_steps)
    server.stop(grace=1.0)
    checkpointer.close()
    after_prefill = counters["env_steps"] - cfg.replay.min_size_steps
    with open(os.path.join(cfg.run.run_dir, "learner_final.json"), "w") as f:
        json.dump({**counters, "sgd_steps": updater.sgd_steps,
                   "utd": updater.sgd_steps / after_prefill if after_prefill > 0 else None,
                   "utd_target": cfg.replay.utd}, f)
    return 0


def main(cfg: Config, args) -> int:
    return M.run_role("learner", cfg, args, lambda stop, log: run(cfg, stop, log))
