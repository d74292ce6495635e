"""PROTOTYPE (benchmark only): the actor role's loop with the replay write overlapped with the
next unroll. Not used by the system; `benchmarks/actor.py` measures it beside the real
`actors.role.run` to size the change proposed for actors/role.py.

The only difference from `actors.role.run`: JAX dispatches the jitted unroll asynchronously, so
the loop dispatches unroll k+1 BEFORE converting and writing the segments of unroll k. The
write (numpy conversion, Reverb append + flush, bounded by write_timeout_s) then runs on the
Python thread while XLA's threads step the environments. Segments of unroll k+1 are written
one iteration later (and at stop, the last pending unroll is written before closing). Params
for unroll k+1 are read from the refresher before the write of unroll k, exactly as today.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional

import jax
import numpy as np

from actors import role as R
from crl import metrics as M
from crl.config import Config
from crl.envs import make_env
from crl.networks import CRLNetworks
from crl.params_service import ParameterClient
from crl.rollout import Unroller


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
    refresher = R.ParamsRefresher(client, cfg.actor.param_refresh_s, log)
    if not refresher.wait_first(stop, timeout_s=3600.0):
        return 0
    key = jax.random.PRNGKey(int.from_bytes(os.urandom(4), "little") % (2**31))
    state = unroller.reset(key, int.from_bytes(os.urandom(3), "little") << 6)
    writer = None
    backoff = M.Backoff()

    def write(segments, stats, t_dispatch) -> bool:
        nonlocal writer
        segments = jax.tree_util.tree_map(np.asarray, segments)   # waits for THAT unroll only
        R.UNROLL_SECONDS.observe(time.perf_counter() - t_dispatch)
        t0 = time.perf_counter()
        while not stop.is_set():
            try:
                if writer is None:
                    writer = SegmentWriter(cfg.service.replay_address, cfg,
                                           cfg.actor.write_timeout_s, state_dim=env.state_dim,
                                           action_dim=env.action_size)
                writer.write(segments)
                break
            except ReplayTimeout:
                R.RATE_LIMITED.inc()
            except (ReplayUnavailable, ConnectionError, OSError):
                R.RECONNECTS.labels(to="replay").inc()
                writer = None
                stop.wait(backoff.next())
        else:
            return False
        R.WRITE_SECONDS.observe(time.perf_counter() - t0)
        R.SEGMENTS.inc(cfg.env.num_envs)
        R.ENV_STEPS.inc(cfg.env.num_envs * T)
        R.EPISODES.inc(float(stats["episodes"]))
        return True

    pending = None
    while not stop.is_set():
        version, params = refresher.latest()
        R.VERSION.set(version)
        t_dispatch = time.perf_counter()
        state, segments, stats = unroller.unroll(state, params, version, length=T)   # async
        if pending is not None and not write(*pending):
            break
        pending = (segments, stats, t_dispatch)
    refresher.stop()
    client.close()
    if writer is not None:
        writer.close()
    return 0
