"""The actor role: step `env.num_envs` envs with the newest policy and write segments to replay.

Cadence: one unroll = U = `actor.unroll_length` env steps of every env with ONE params version
(the newest at its dispatch), so the policy is refreshed every U steps (the paper: 62), while
the learner trains on windows of T = `replay.segment_length` steps (the paper: 1,000): with U < T
the writer streams each env's unrolls and creates, every unroll, one item per env = the window
of its last T steps (overlapping windows sharing Reverb chunks, replay/writer.py); the first
item of an env comes after ceil(T / U) unrolls. U = T (the default, 0): disjoint segments.

Thin shell around crl.rollout.Unroller (the same unroll the in-process driver uses):
  - waits for the first params, then refreshes them in a background thread (never stalls the
    environment loop on the learner);
  - overlaps the replay write with the envs: JAX dispatches the jitted unroll asynchronously, so
    each iteration dispatches unroll k+1 (with the newest params) and then, while XLA steps the
    envs, writes the segments of unroll k. One unroll is in flight while another is written; every
    unroll is written once, in order, stamped with the params version that generated it;
  - writes each unroll's segments (one per env) with bounded flushes; while the rate limiter holds
    inserts (the learner is behind) it waits, which is what keeps the update-to-data ratio (the
    unroll in flight finishes meanwhile; the next one is dispatched only after the write);
  - survives replay and learner restarts: reconnects with backoff, keeps its last params;
  - on SIGTERM dispatches nothing more, writes the unrolls already dispatched (the one being
    written and the one in flight: nothing stepped is lost), then exits 0. After a stop request
    those writes share FINAL_FLUSH_S; what replay has not confirmed by then is dropped (counted).
Every flush is bounded by min(actor.write_timeout_s, FLUSH_SLICE_S) so a stop is noticed soon; a
flush that timed out is retried as a flush (the items stay queued in the writer), never by
writing the segments again, which would duplicate them.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import prometheus_client as prom

from crl import metrics as M
from crl.config import Config
from crl.envs import make_env
from crl.networks import CRLNetworks
from params import ParameterClient, client_from_config, security_from_config
from crl.rollout import Unroller

ENV_STEPS = prom.Counter("crl_actor_env_steps_total", "Env steps taken by this actor")
EPISODES = prom.Counter("crl_actor_episodes_total", "Episodes finished by this actor")
SUCCESS_STEPS = prom.Counter("crl_actor_success_steps_total", "Steps spent at the goal")
SEGMENTS = prom.Counter("crl_actor_segments_written_total", "Segments confirmed by replay")
VERSION = prom.Gauge("crl_actor_params_version", "Version of the params this actor steps with")
LEARNER_VERSION = prom.Gauge("crl_actor_learner_params_version", "Newest version the learner has")
LAG = prom.Gauge("crl_actor_policy_lag", "Learner params version minus the version in use")
# Each iteration of the loop in run() dispatches unroll k+1, waits for unroll k (which stepped
# while unroll k-1 was written), then writes unroll k. One observation of each per unroll, so the
# loop period ~= unroll + write (+ a few ms of dispatch and numpy conversion):
#   unroll: seconds the loop waited for unroll k to finish, i.e. the part of the jitted unroll the
#           previous write did not hide. > 0: the envs never waited for replay (unroll k+1 was
#           queued behind unroll k; the actor runs at the unroll's pace); ~0: write-bound.
#   write : seconds from appending unroll k's segments until replay confirmed them, including
#           rate-limiter waits and reconnects (unroll k+1 steps meanwhile).
WRITE_SECONDS = prom.Histogram("crl_actor_write_seconds",
                               "Seconds to write one unroll's segments until replay confirmed them "
                               "(overlaps the next unroll; includes rate-limiter waits)",
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
UNROLL_SECONDS = prom.Histogram("crl_actor_unroll_seconds",
                                "Seconds the loop waited for an unroll to finish after writing the "
                                "previous one (the part of the unroll not hidden by the write)",
                                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
RECONNECTS = prom.Counter("crl_actor_reconnects_total", "Reconnects to replay or learner", ["to"])
RATE_LIMITED = prom.Counter("crl_actor_rate_limited_total", "Flushes held by the rate limiter")
TIME_AT_GOAL = prom.Gauge("crl_actor_time_at_goal", "Mean steps at goal per finished episode")
EPISODE_ID_BASE = prom.Gauge("crl_actor_episode_id_base",
                             "First episode id of this process (random at every start)")
NEXT_EPISODE_ID = prom.Gauge("crl_actor_next_episode_id", "Next episode id this actor hands out")
DROPPED = prom.Counter("crl_actor_segments_dropped_total",
                       "Segments not confirmed by replay when the actor stopped")

FLUSH_SLICE_S = 2.0      # longest single flush wait (stop responsiveness)
PROBE_AFTER_S = 4.0      # flushes held this long: ask replay (1 s bound) whether it is up at all
FINAL_FLUSH_S = 10.0     # after a stop request: how long the current write may still take


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
            code = getattr(e, "code", None)
            why = code().name if callable(code) else type(e).__name__
            self.log.warning("params refresh failed (%s); keeping version %d", why, self.version)
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


def _replay_answers(address: str) -> bool:
    """True if replay answers a server-info call within 1 s."""
    import reverb
    try:
        reverb.Client(address).server_info(1)
        return True
    except Exception:
        return False


class ReplayOutput:
    """The actor's link to replay: one SegmentWriter, reconnected when replay restarts (it keeps
    the last unrolls of every env, so a fresh stream's next item is whole again).

    write(segments) returns the number of items replay confirmed (>= 0: in stream mode the first
    unrolls of a stream make none), waiting (in bounded slices, logged) while replay is down or
    its rate limiter holds inserts. After a stop request all remaining writes share one deadline,
    FINAL_FLUSH_S; a write not confirmed by then returns None (the caller counts it as dropped).
    """

    def __init__(self, cfg: Config, state_dim: int, action_dim: int, stop: threading.Event, log):
        self.cfg, self.state_dim, self.action_dim = cfg, state_dim, action_dim
        self.stop, self.log = stop, log
        self.address = cfg.service.replay_address
        self.writer = None
        self.backoff = M.Backoff()
        self.last_held_log = 0.0
        self.stop_deadline: Optional[float] = None

    def _new_writer(self):
        from replay.writer import SegmentWriter
        return SegmentWriter(self.address, self.cfg,
                             min(self.cfg.actor.write_timeout_s, FLUSH_SLICE_S),
                             state_dim=self.state_dim, action_dim=self.action_dim)

    def _drop_writer(self):
        """Drops the writer's stream; its unconfirmed items are written again on a fresh one."""
        if self.writer is not None:
            try:
                self.writer.reconnect()
            except Exception:
                self.writer = None

    def write(self, segments) -> Optional[int]:
        from replay import ReplayTimeout, ReplayUnavailable
        queued = False   # appended to the writer, waiting for confirmation: retry as a flush
        held_since = None
        last_probe, replay_was_down = 0.0, False
        while True:
            if self.stop.is_set():
                self.stop_deadline = self.stop_deadline or time.monotonic() + FINAL_FLUSH_S
                if time.monotonic() > self.stop_deadline:
                    return None
            try:
                if self.writer is None:
                    self.writer = self._new_writer()
                if queued:
                    items = self.writer.unconfirmed
                    self.writer.flush()
                else:
                    items = self.writer.write(segments)
                self.backoff.reset()
                return items
            except ReplayTimeout:
                # Appended and not yet confirmed if the writer got past its server check.
                queued = self.writer.unconfirmed > 0
                RATE_LIMITED.inc()
                now = time.monotonic()
                held_since = held_since or now
                if now - held_since >= 10.0 and now - self.last_held_log > 30.0:
                    self.log.info("replay has held inserts for %.0fs (learner behind or "
                                  "restarting, or replay busy); still waiting", now - held_since)
                    self.last_held_log = now
                # Held by the rate limiter, or is replay gone? Reverb's writer would reconnect by
                # itself, but only after its own reconnect backoff (~10 s measured): once replay
                # was seen down and answers again, a fresh writer re-sends the queued segments.
                if now - held_since >= PROBE_AFTER_S and now - last_probe >= FLUSH_SLICE_S:
                    last_probe = now
                    up = _replay_answers(self.address)
                    if not up and not replay_was_down:
                        self.log.warning("replay at %s does not answer; waiting for it",
                                         self.address)
                    elif up and replay_was_down:
                        self.log.info("replay answers again; reconnecting the writer (queued "
                                      "segments are written again)")
                        RECONNECTS.labels(to="replay").inc()
                        self._drop_writer()
                        queued = False
                    replay_was_down = not up
            except (ReplayUnavailable, ConnectionError, OSError) as e:
                RECONNECTS.labels(to="replay").inc()
                delay = self.backoff.next()
                self.log.warning("replay unavailable (%s); reconnecting in %.1fs", e, delay)
                self._drop_writer()
                queued = False   # unconfirmed items are written again
                if self.stop.is_set():
                    time.sleep(min(delay, 0.5))   # stopping: keep trying until the deadline
                else:
                    self.stop.wait(delay)

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self.log.warning("closing the writer: %s", e)
        self.writer = None


class Unroll(NamedTuple):
    """A dispatched unroll: its outputs are JAX arrays, ready once XLA has stepped the envs."""
    version: int             # params version it steps with (stamped on every step)
    segments: Any            # {field: [num_envs, T, ...]}
    stats: Any               # {"episodes", "success_steps"}
    next_episode_id: Any     # the state's next episode id after it


def run(cfg: Config, actor_id: int = 0, stop: Optional[threading.Event] = None, log=None) -> int:
    log = log or M.setup_logging(f"actor{actor_id}")
    stop = stop or threading.Event()
    security = security_from_config(cfg.service)   # fail fast on a missing Secret
    env = make_env(cfg.env.name)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    template = {"actor": jax.eval_shape(nets.init, jax.random.PRNGKey(0))[0]}
    unroller = Unroller(env, nets, cfg.env.num_envs, cfg.episode_length)
    E, T, U = cfg.env.num_envs, cfg.segment_length, cfg.unroll_length

    client = client_from_config(cfg, template=template, security=security)
    refresher = ParamsRefresher(client, cfg.actor.param_refresh_s, log)
    if not refresher.wait_first(stop, timeout_s=3600.0):
        log.info("stopped before the first params arrived")
        return 0

    # Fresh episode ids on every start, so no goal is ever relabelled across a restart.
    seed = cfg.actor.seed * 1_000_003 + actor_id * 7919 + int.from_bytes(os.urandom(4), "little")
    key = jax.random.PRNGKey(seed % (2**31))
    id_base = int.from_bytes(os.urandom(3), "little") << 6
    state = unroller.reset(key, id_base)
    EPISODE_ID_BASE.set(id_base)
    NEXT_EPISODE_ID.set(id_base + E)

    replay = ReplayOutput(cfg, env.state_dim, env.action_size, stop, log)
    episodes = success_steps = 0.0
    log.info("stepping %d envs of %s, unrolls of %d steps (policy refreshed at each), windows of "
             "%d steps, episode ids from %d", E, cfg.env.name, U, T, id_base)
    pending: Optional[Unroll] = None   # dispatched in the previous iteration, not yet written
    while True:
        stopping = stop.is_set()
        if not stopping:
            # Dispatch the next unroll with the newest params. JAX returns at once: XLA steps the
            # envs on its own threads while this thread writes the previous unroll below.
            version, params = refresher.latest()
            VERSION.set(version)
            state, segments, stats = unroller.unroll(state, params, version, length=U)
            dispatched = Unroll(version, segments, stats, state.next_episode_id)
        if pending is not None:
            t0 = time.perf_counter()
            jax.block_until_ready(pending.segments)
            UNROLL_SECONDS.observe(time.perf_counter() - t0)
            segments_k = jax.tree_util.tree_map(np.asarray, pending.segments)
            t0 = time.perf_counter()
            items = replay.write(segments_k)
            if items is not None:
                WRITE_SECONDS.observe(time.perf_counter() - t0)
                SEGMENTS.inc(items)
                ENV_STEPS.inc(E * U)
                n_ep, n_succ = (float(pending.stats["episodes"]),
                                float(pending.stats["success_steps"]))
                EPISODES.inc(n_ep)
                SUCCESS_STEPS.inc(n_succ)
                episodes, success_steps = episodes + n_ep, success_steps + n_succ
                if episodes:
                    TIME_AT_GOAL.set(success_steps / episodes)
            else:
                DROPPED.inc(E)
                log.warning("stopping: the %d items of an unroll were not confirmed by replay "
                            "within %.0fs of the stop; dropped", E, FINAL_FLUSH_S)
            NEXT_EPISODE_ID.set(int(pending.next_episode_id))
            # Lag of the params in use (those of the unroll stepping now, the VERSION gauge).
            LEARNER_VERSION.set(max(version, refresher.version))
            LAG.set(max(version, refresher.version) - version)
        if stopping:
            break
        pending = dispatched
    refresher.stop()
    client.close()
    replay.close()
    log.info("stopped")
    return 0


def main(cfg: Config, args) -> int:
    return M.run_role(f"actor{args.actor_id}", cfg, args, lambda stop, log: run(cfg, args.actor_id, stop, log))
