"""The actor role: step `env.num_envs` envs with the newest policy and write segments to replay.

Thin shell around crl.rollout.Unroller (the same unroll the in-process driver uses):
  - waits for the first params, then refreshes them in a background thread (never stalls the
    environment loop on the learner);
  - writes each unroll's segments (one per env) with bounded flushes; while the rate limiter holds
    inserts (the learner is behind) it waits, which is what keeps the update-to-data ratio;
  - survives replay and learner restarts: reconnects with backoff, keeps its last params.
"""
from __future__ import annotations

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
from crl.networks import CRLNetworks
from crl.params_service import ParameterClient
from crl.rollout import Unroller

ENV_STEPS = prom.Counter("crl_actor_env_steps_total", "Env steps taken by this actor")
EPISODES = prom.Counter("crl_actor_episodes_total", "Episodes finished by this actor")
SUCCESS_STEPS = prom.Counter("crl_actor_success_steps_total", "Steps spent at the goal")
SEGMENTS = prom.Counter("crl_actor_segments_written_total", "Segments confirmed by replay")
VERSION = prom.Gauge("crl_actor_params_version", "Version of the params this actor steps with")
LEARNER_VERSION = prom.Gauge("crl_actor_learner_params_version", "Newest version the learner has")
LAG = prom.Gauge("crl_actor_policy_lag", "Learner params version minus the version in use")
WRITE_SECONDS = prom.Histogram("crl_actor_write_seconds", "Time to write and flush one unroll",
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
UNROLL_SECONDS = prom.Histogram("crl_actor_unroll_seconds", "Time of one jitted unroll",
                                buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30))
RECONNECTS = prom.Counter("crl_actor_reconnects_total", "Reconnects to replay or learner", ["to"])
RATE_LIMITED = prom.Counter("crl_actor_rate_limited_total", "Flushes held by the rate limiter")
TIME_AT_GOAL = prom.Gauge("crl_actor_time_at_goal", "Mean steps at goal per finished episode")


class ParamsRefresher:
    """Background thread that keeps the newest actor params (and their version)."""

    def __init__(self, client: ParameterClient, period_s: float, log):
        self.client, self.period_s, self.log = client, period_s, log
        self._lock = threading.Lock()
        self.version, self.params = -1, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="params-refresh", daemon=True)

    def wait_first(self, stop: threading.Event, timeout_s: float) -> bool:
        """Blocks until the learner has published once (bounded polls, logged)."""
        deadline = time.monotonic() + timeout_s
        backoff = M.Backoff()
        while not stop.is_set() and time.monotonic() < deadline:
            if self._fetch():
                self._thread.start()
                return True
            self.log.info("waiting for the first params from %s", self.client.address)
            stop.wait(backoff.next())
        return False

    def _fetch(self) -> bool:
        try:
            got = self.client.get(min_version=self.version, subset="actor")
        except Exception as e:   # learner down or restarting: keep the last params
            self.log.warning("params refresh failed (%s); keeping version %d", type(e).__name__,
                             self.version)
            RECONNECTS.labels(to="learner").inc()
            return False
        if got is None:
            return False
        version, tree = got
        params = jax.device_put(tree["actor"])
        with self._lock:
            self.version, self.params = version, params
        LEARNER_VERSION.set(version)
        return True

    def _run(self):
        while not self._stop.wait(self.period_s):
            self._fetch()

    def latest(self):
        with self._lock:
            return self.version, self.params

    def stop(self):
        self._stop.set()


def run(cfg: Config, actor_id: int = 0, stop: Optional[threading.Event] = None, log=None) -> int:
    from replay import ReplayTimeout, ReplayUnavailable
    from replay.writer import SegmentWriter

    log = log or M.setup_logging(f"actor{actor_id}")
    stop = stop or threading.Event()
    env = make_env(cfg.env.name)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    template = {"actor": jax.eval_shape(nets.init, jax.random.PRNGKey(0))[0]}
    unroller = Unroller(env, nets, cfg.env.num_envs, cfg.episode_length)
    T = cfg.segment_length

    client = ParameterClient(cfg.service.params_address, timeout_s=cfg.service.rpc_timeout_s,
                             template=template, max_message_mb=cfg.service.max_message_mb)
    refresher = ParamsRefresher(client, cfg.actor.param_refresh_s, log)
    if not refresher.wait_first(stop, timeout_s=3600.0):
        log.info("stopped before the first params arrived")
        return 0

    # Fresh episode ids on every start, so no goal is ever relabelled across a restart.
    seed = cfg.actor.seed * 1_000_003 + actor_id * 7919 + int.from_bytes(os.urandom(4), "little")
    key = jax.random.PRNGKey(seed % (2**31))
    id_base = int.from_bytes(os.urandom(3), "little") << 6
    state = unroller.reset(key, id_base)

    writer = None
    backoff = M.Backoff()
    episodes = success_steps = 0.0
    log.info("stepping %d envs of %s, segments of %d steps", cfg.env.num_envs, cfg.env.name, T)
    while not stop.is_set():
        version, params = refresher.latest()
        VERSION.set(version)
        t0 = time.perf_counter()
        state, segments, stats = unroller.unroll(state, params, version, length=T)
        segments = jax.tree_util.tree_map(np.asarray, segments)
        UNROLL_SECONDS.observe(time.perf_counter() - t0)
        # Write, waiting (bounded, logged) while replay is down or the rate limiter holds inserts.
        t0 = time.perf_counter()
        written = False
        while not written and not stop.is_set():
            try:
                if writer is None:
                    writer = SegmentWriter(cfg.service.replay_address, cfg,
                                           cfg.actor.write_timeout_s, state_dim=env.state_dim,
                                           action_dim=env.action_size)
                writer.write(segments)
                written = True
                backoff.reset()
            except ReplayTimeout:
                RATE_LIMITED.inc()
                log.info("replay holds inserts (learner behind or replay busy); retrying")
            except (ReplayUnavailable, ConnectionError, OSError) as e:
                RECONNECTS.labels(to="replay").inc()
                delay = backoff.next()
                log.warning("replay unavailable (%s); reconnecting in %.1fs", e, delay)
                if writer is not None:
                    try:
                        writer.close()
                    except Exception:
                        pass
                writer = None
                stop.wait(delay)
        if not written:
            break
        WRITE_SECONDS.observe(time.perf_counter() - t0)
        SEGMENTS.inc(cfg.env.num_envs)
        ENV_STEPS.inc(cfg.env.num_envs * T)
        n_ep, n_succ = float(stats["episodes"]), float(stats["success_steps"])
        EPISODES.inc(n_ep)
        SUCCESS_STEPS.inc(n_succ)
        episodes, success_steps = episodes + n_ep, success_steps + n_succ
        if episodes:
            TIME_AT_GOAL.set(success_steps / episodes)
        LEARNER_VERSION.set(max(version, refresher.version))
        LAG.set(max(version, refresher.version) - version)
    refresher.stop()
    client.close()
    if writer is not None:
        try:
            writer.close()
        except Exception as e:
            log.warning("closing the writer: %s", e)
    log.info("stopped")
    return 0


def main(cfg: Config, args) -> int:
    return M.run_role(f"actor{args.actor_id}", cfg, args, lambda stop, log: run(cfg, args.actor_id, stop, log))
