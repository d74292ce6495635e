"""The actor role: step `env.num_envs` envs with the newest policy and write segments to replay.

Cadence: one unroll = U = `actor.unroll_length` env steps of every env with ONE params version
(the newest at its dispatch), so the policy is refreshed every U steps (the paper: 62), while
the learner trains on windows of T = `replay.segment_length` steps (the paper: 1,000): with U < T
the writer streams each env's unrolls and creates, every unroll, one item per env = the window
of its last T steps (overlapping windows sharing Reverb chunks, replay/writer.py); the first
item of an env comes after ceil(T / U) unrolls. U = T (the default, 0): disjoint segments.

Thin shell around crl.rollout.Unroller (the same unroll the in-process driver uses):
  - follows the learner's params with params.follower.PolicyFollower: waits for the first params,
    then a background thread refreshes them (never stalls the environment loop on the learner);
  - overlaps the replay write with the envs: JAX dispatches the jitted unroll asynchronously, so
    each iteration dispatches unroll k+1 (with the newest params) and then, while XLA steps the
    envs, writes the segments of unroll k. One unroll is in flight while another is written; every
    unroll is written once, in order, stamped with the params version that generated it;
  - writes each unroll's segments (one per env) through replay.writer.ReconnectingWriter: bounded
    flushes; while the rate limiter holds inserts (the learner is behind) it waits, which is what
    keeps the update-to-data ratio (the unroll in flight finishes meanwhile; the next one is
    dispatched only after the write); it reconnects by itself when replay restarts;
  - survives replay and learner restarts: reconnects with backoff, keeps its last params;
  - on SIGTERM dispatches nothing more, writes the unrolls already dispatched (the one being
    written and the one in flight: nothing stepped is lost), then exits 0. After a stop request
    those writes share replay.writer.FINAL_FLUSH_S; what replay has not confirmed by then is
    dropped (counted);
  - on the run's final params (progress finished = 1: the learner reached its budget) does the
    same as on SIGTERM, logs "run finished at N env steps" (N: the learner's env steps) and exits
    0. The final params also end a write the rate limiter holds (the learner samples no more).
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
from crl.rollout import Unroller
from params import client_from_config, security_from_config
from params.follower import Policy, PolicyFollower, policy_template
from replay.writer import ReconnectingWriter

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
WRITE_DURATION = prom.Histogram("crl_actor_write_duration_seconds",
                                "Seconds to write one unroll's segments until replay confirmed them "
                                "(overlaps the next unroll; includes rate-limiter waits)",
                                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
UNROLL_DURATION = prom.Histogram("crl_actor_unroll_duration_seconds",
                                 "Seconds the loop waited for an unroll to finish after writing "
                                 "the previous one (the part of the unroll not hidden by the "
                                 "write)",
                                 buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
RECONNECTS = prom.Counter("crl_actor_reconnects_total", "Reconnects to replay or learner", ["to"])
RATE_LIMITED = prom.Counter("crl_actor_rate_limited_total", "Flushes held by the rate limiter")
TIME_AT_GOAL = prom.Gauge("crl_actor_time_at_goal", "Mean steps at goal per finished episode")
EPISODE_ID_BASE = prom.Gauge("crl_actor_episode_id_base",
                             "First episode id of this process (random at every start)")
NEXT_EPISODE_ID = prom.Gauge("crl_actor_next_episode_id", "Next episode id this actor hands out")
DROPPED = prom.Counter("crl_actor_segments_dropped_total",
                       "Segments not confirmed by replay when the actor stopped")


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
    unroller = Unroller(env, nets, cfg.env.num_envs, cfg.episode_length)
    E, T, U = cfg.env.num_envs, cfg.segment_length, cfg.unroll_length

    # Replay is contacted at the first write; the follower is told about it so that the run's
    # final params end a write the rate limiter holds (the learner stopped sampling at its budget).
    replay = ReconnectingWriter(cfg.service.replay_address, cfg, stop,
                                write_timeout_s=cfg.actor.write_timeout_s, log=log,
                                state_dim=env.state_dim, action_dim=env.action_size,
                                on_reconnect=RECONNECTS.labels(to="replay").inc,
                                on_held=RATE_LIMITED.inc)

    def on_update(policy: Policy) -> None:
        LEARNER_VERSION.set(policy.version)
        if policy.finished:
            replay.final_flush()

    follower = PolicyFollower(
        client_from_config(cfg, template=policy_template(nets), security=security),
        cfg.actor.param_refresh_s, log=log, on_update=on_update,
        on_error=lambda e: RECONNECTS.labels(to="learner").inc())
    if not follower.wait_first(stop, timeout_s=3600.0):
        log.info("stopped before the first params arrived")
        follower.close()
        return 0

    # Fresh episode ids on every start, so no goal is ever relabelled across a restart.
    seed = cfg.actor.seed * 1_000_003 + actor_id * 7919 + int.from_bytes(os.urandom(4), "little")
    key = jax.random.PRNGKey(seed % (2**31))
    id_base = int.from_bytes(os.urandom(3), "little") << 6
    state = unroller.reset(key, id_base)
    EPISODE_ID_BASE.set(id_base)
    NEXT_EPISODE_ID.set(id_base + E)

    episodes = success_steps = 0.0
    log.info("stepping %d envs of %s, unrolls of %d steps (policy refreshed at each), windows of "
             "%d steps, episode ids from %d", E, cfg.env.name, U, T, id_base)
    pending: Optional[Unroll] = None   # dispatched in the previous iteration, not yet written
    finished: Optional[Policy] = None  # the run's final params, once received
    while True:
        policy = follower.latest()
        if policy.finished and finished is None:
            # The learner reached its budget: dispatch nothing more, write what is in flight
            # (sharing the final flush deadline, as after a stop request), exit 0.
            finished = policy
            replay.final_flush()
        stopping = stop.is_set() or finished is not None
        if not stopping:
            # Dispatch the next unroll with the newest params. JAX returns at once: XLA steps the
            # envs on its own threads while this thread writes the previous unroll below.
            version = policy.version
            VERSION.set(version)
            state, segments, stats = unroller.unroll(state, policy.params, version, length=U)
            dispatched = Unroll(version, segments, stats, state.next_episode_id)
        if pending is not None:
            t0 = time.perf_counter()
            jax.block_until_ready(pending.segments)
            UNROLL_DURATION.observe(time.perf_counter() - t0)
            segments_k = jax.tree_util.tree_map(np.asarray, pending.segments)
            t0 = time.perf_counter()
            items = replay.write(segments_k)
            if items is not None:
                WRITE_DURATION.observe(time.perf_counter() - t0)
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
                            "within %.0fs of the stop; dropped", E, replay.final_s)
            NEXT_EPISODE_ID.set(int(pending.next_episode_id))
            # Lag of the params in use (those of the unroll stepping now, the VERSION gauge).
            LEARNER_VERSION.set(max(version, follower.version))
            LAG.set(max(version, follower.version) - version)
        if stopping:
            break
        pending = dispatched
    follower.close()
    replay.close()
    if finished is not None:
        log.info("run finished at %d env steps (params version %d); exiting 0",
                 finished.progress["env_steps"], finished.version)
    else:
        log.info("stopped")
    return 0


def main(cfg: Config, args) -> int:
    return M.run_role(f"actor{args.actor_id}", cfg, args, lambda stop, log: run(cfg, args.actor_id, stop, log))
