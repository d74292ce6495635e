"""Fault injection over real processes and sockets: ONE `crl local` run (point-mass maze, TLS and
a token on the ParameterService, as in the k8s overlays) goes through every fault in turn, so the
~100 s start-up of the roles is paid once:

  0. warm-up; a client without the token is refused by the live learner;
  A. an extra actor is started (elastic: added); SIGKILL actor0: the launcher restarts it, the
     learner keeps training, the UTD stays in its band, the restarted actor's episode ids are fresh;
  E. the extra actor gets SIGTERM (elastic: removed): it exits 0 at once, the UTD stays in band;
  N. NaN segments written into replay are dropped by the learner (and deleted from replay); then a
     NaN update (test-only hook CRL_FAULT_INJECTION_NAN_FILE) is detected, not published, rolled
     back, and training goes on; every params version a client fetches meanwhile is finite;
  R. SIGKILL replay: it restarts on its port from its newest checkpoint with at least that
     checkpoint's items; learner and actors reconnect by themselves; training resumes;
  L. SIGKILL learner: it resumes from its newest checkpoint; params versions never go backwards;
     the actors keep running (not restarted, last params kept, stepping until the rate limiter
     holds them);
  H. Hangs: replay, then the learner, is stopped (SIGSTOP) for HANG_S seconds, less than the
     launcher's hang timeout, then continued: every call to it has a deadline, so nobody crashes
     or is restarted, and training, writing and publishing resume by themselves;
  S. SIGTERM to the launcher stops every role in turn (actors, evaluator, learner, replay): each
     finishes its unit of work, flushes, checkpoints where it has state and exits 0 in bounded time.

The phases run in a module fixture; each test asserts on one phase. Measured recovery times go to
the test's temporary directory, or with scripts/record_reliability to results/faults.jsonl (and
docs/reliability.md). The token never appears in any log or file.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from crl import metrics as M
from helpers import REPO, free_port_block, record_result, port_open, stop_process, wait_for
from test_security import make_cert

NUM_ENVS = 16
T = 100
UTD = 0.05
UTD_BAND = 0.10                  # replay.utd_tolerance: a window must be long enough for the
MIN_UTD_WINDOW_STEPS = 60_000    # computed band (utd_band) to be inside it
NAN_SEGMENTS = 2                 # written into replay by phase N (a)
STARTUP_S = 420                  # generous: 2 shared, loaded cores
RESTART_S = 300
STOP_BOUND_S = 60.0              # the launcher SIGKILLs a role that takes longer (exit != 0)
HANG_S = 30.0                    # a hang shorter than the launcher's hang timeout (60 s)


class Monitor(threading.Thread):
    """Scrapes every role's /metrics and the learner's Health about once a second.

    Each metrics row and Health version is stamped with the time its request STARTED: one
    stamped after an event (a kill, a SIGCONT) was asked for after it, so it can only come from
    the process's new life. Stamped at the reply, an answer the old learner gave just before its
    SIGKILL was once stamped after the kill and taken for the restarted learner's first version.
    (UTD points are stamped at replay's reply; they only place a point inside a window.)"""

    def __init__(self, urls, health_client, replay_address):
        super().__init__(daemon=True, name="fault-monitor")
        self.urls, self.health_client = dict(urls), health_client
        self.replay_address, self._replay_client = replay_address, None
        self.utd_points = []    # (t, sgd_steps, replay inserts, replay samples)
        self.rows = []          # (t, name, metrics)
        self.versions = []      # (t, version) from the learner's Health RPC
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def add(self, name, url):
        with self.lock:
            self.urls[name] = url

    def run(self):
        while not self.stop_event.wait(1.0):
            with self.lock:
                urls = dict(self.urls)
            for name, url in urls.items():
                t = time.monotonic()
                m = M.scrape(url, timeout_s=1.0)
                if m:
                    with self.lock:
                        self.rows.append((t, name, m))
                if name == "learner" and m and "crl_learner_sgd_steps_total" in m:
                    self._utd_point(m["crl_learner_sgd_steps_total"])
            try:
                t = time.monotonic()
                v = self.health_client.health(timeout_s=1.0)["version"]
                with self.lock:
                    self.versions.append((t, v))
            except Exception:
                pass

    def _utd_point(self, sgd_steps):
        """(t, learner SGD steps, replay's exact insert and sample counts), read back to back:
        the UTD is measured on the counters the rate limiter itself keeps, not on the learner's
        env-step gauge (refreshed once a second, so up to a second of env steps stale)."""
        try:
            from replay import TABLE
            info = self.replay_client().server_info(2)[TABLE].rate_limiter_info
        except Exception:
            self._replay_client = None   # replay restarting: a new client next time
            return
        with self.lock:
            self.utd_points.append((time.monotonic(), sgd_steps, int(info.insert_stats.completed),
                                    int(info.sample_stats.completed)))

    def replay_client(self):
        if self._replay_client is None:
            import reverb
            self._replay_client = reverb.Client(self.replay_address)
        return self._replay_client

    def series(self, name, metric, since=0.0):
        with self.lock:
            return [(t, m[metric]) for t, n, m in self.rows if n == name and t >= since
                    and metric in m]

    def rows_of(self, name, since=0.0):
        with self.lock:
            return [(t, m) for t, n, m in self.rows if n == name and t >= since]

    def last(self, name, metric, default=None):
        s = self.series(name, metric)
        return s[-1][1] if s else default


class LocalRun:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.base = free_port_block(12)
        self.token = "tok-" + secrets.token_hex(16)
        self.cert, self.key = make_cert(tmp)
        self.overrides = {
            "run.run_dir": self.run_dir,
            "service.replay_address": f"127.0.0.1:{self.base}",
            "service.params_address": f"127.0.0.1:{self.base + 1}",
            "service.metrics_port": self.base + 2,
            "service.tls_cert": self.cert, "service.tls_key": self.key,
            "service.require_token": "true",          # the token comes from CRL_PARAMS_TOKEN
            "network.actor.width": 32, "network.critic.width": 32,
            "env.num_envs": NUM_ENVS, "replay.utd": UTD,
            "replay.min_size_steps": 3200, "replay.capacity_steps": 50_000,
            "replay.checkpoint_interval_s": 5, "learner.checkpoint_every": 20,
            "learner.num_devices": 1, "learner.total_env_steps": 10**9,
            "eval.interval_s": 20, "eval.num_envs": 16,
        }
        from crl import config as C
        self.cfg = C.load(overrides=self.overrides)
        self.nan_trigger = tmp / "nan.trigger"   # the learner's test-only fault hook
        self.env = dict(os.environ, CRL_PARAMS_TOKEN=self.token, TF_CPP_MIN_LOG_LEVEL="2",
                        CRL_FAULT_INJECTION_NAN_FILE=str(self.nan_trigger),
                        PYTHONUNBUFFERED="1")
        self.ports = {"replay": self.base + 2, "learner": self.base + 3,
                      "evaluator": self.base + 4, "actor0": self.base + 5,
                      "actor1": self.base + 6, "extra": self.base + 9}
        self.proc = None
        self.extra = None

    def url(self, name):
        return f"http://127.0.0.1:{self.ports[name]}/metrics"

    def start(self):
        args = [f"--{k}={v}" for k, v in self.overrides.items()]
        self.out = open(self.tmp / "local.out", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "local", "--actors", "2",
                                      *args], cwd=REPO, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start_extra_actor(self):
        """`crl actor` outside the launcher (a replica added by hand), with the same Secret."""
        self.extra_log = open(self.tmp / "extra_actor.log", "w")
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "actor", "--config", str(self.run_dir / "config.yaml"),
             "--actor-id", "7", "--metrics-port", str(self.ports["extra"])], cwd=REPO,
            env=self.env, stdout=self.extra_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def pids(self):
        try:
            return json.loads((self.run_dir / "pids.json").read_text())
        except (OSError, ValueError):
            return {}

    def client(self, token="same"):
        from params import ParameterClient
        return ParameterClient(f"127.0.0.1:{self.base + 1}", timeout_s=5.0,
                               token=self.token if token == "same" else token,
                               tls_ca=self.cert.read_bytes())

    def kill(self, name):
        pid = self.pids()[name]
        os.kill(pid, signal.SIGKILL)
        return pid

    def log(self, name):
        p = self.run_dir / "logs" / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def cleanup(self):
        """Stops what is still running, each by its own PID."""
        if self.extra is not None:
            stop_process(self.extra, timeout_s=30)
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout_s=150)
        for name, pid in self.pids().items():   # orphans if the launcher itself was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if hasattr(self, "out"):
            self.out.close()


def utd_window(mon, t0, t1):
    """(utd, env steps) between t0 and t1: the learner's SGD steps over the env steps replay
    confirmed (its exact insert count x T), both read at the same moment at each end."""
    with mon.lock:
        pts = [p for p in mon.utd_points if t0 <= p[0] <= t1]
    if len(pts) < 2:
        return None, 0
    (_, sgd0, ins0, _), (_, sgd1, ins1, _) = pts[0], pts[-1]
    d_env = (ins1 - ins0) * T
    if d_env <= 0:
        return None, d_env
    return float((sgd1 - sgd0) / d_env), d_env


def utd_band(cfg, d_env, nonfinite_segments=0):
    """The largest relative UTD error the configuration allows over a window of d_env env steps.

    Replay's rate limiter keeps samples - spi x inserts inside a window of width 2B (B its error
    buffer, replay/server.py), so the samples taken over any window are spi x inserts +- 2B. The
    learner trains on the samples it has received: those still on their way (the sampler's
    queue of `prefetch` batches, the TensorFlow prefetch batch, the batch being assembled, the
    call dispatched but not settled, and each Reverb worker's in-flight samples, 2 batches per
    worker, one worker per core at most) count as sampled but not trained. A NaN segment spoils
    every batch it is in until the learner deletes it (at most the batches in flight)."""
    from replay.server import rate_limiter_params
    rl = rate_limiter_params(cfg)
    spc, mb = cfg.learner.segments_per_call, cfg.learner.minibatches_per_call
    in_flight = (cfg.learner.prefetch + 3) * spc + 2 * spc * (os.cpu_count() or 1)
    spoiled = nonfinite_segments * (cfg.learner.prefetch + 3) * spc
    slack_sgd = (2 * rl.error_buffer + in_flight + spoiled) * mb / spc
    return slack_sgd / (cfg.replay.utd * d_env)


def wait_training_and_writing_again(mon, calls, segs, since, t0, r):
    """After replay was gone (killed or hung): the learner trains on new samples (more calls
    than its prefetched batches, prefetch 2 + one in the pipeline, allow) and both actors' writes
    are confirmed again, both seen after `since`; r gets their times from t0."""
    wait_for(lambda: any(m.get("crl_learner_update_calls_total", 0) > calls + 8
                         for _, m in mon.rows_of("learner", since)), RESTART_S,
             "the learner to train again", 0.5)
    r["learner_resumed_s"] = round(time.monotonic() - t0, 1)
    wait_for(lambda: all(any(m.get("crl_actor_segments_written_total", 0) > segs[a]
                             for _, m in mon.rows_of(a, since)) for a in segs),
             RESTART_S, "both actors to write again", 0.5)
    r["actors_resumed_s"] = round(time.monotonic() - t0, 1)


def actor_total(mon, metric):
    """Sum over the launcher's actors of the newest value of a counter (per current process)."""
    return sum(mon.last(a, metric, 0.0) for a in ("actor0", "actor1"))


def sample_episode_ids(address, batches):
    """Episode ids of sampled segments: [set of ids of one segment] (a few bounded samples)."""
    from replay.sampler import SegmentSampler
    out = []
    s = SegmentSampler(address, 32, timeout_s=20.0, prefetch=1)
    try:
        for _ in range(batches):
            b = s.sample()
            out += [set(map(int, row)) for row in b.data["episode_id"]]
    finally:
        s.close()
    return out


# ---------------------------------------------------------------------------------------------
# The scenario.

def _phase(R, name, fn):
    t0 = time.monotonic()
    try:
        fn()
        R[name]["ok"] = True
    except BaseException as e:   # recorded; the tests of this and later phases report it
        R[name]["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        raise
    finally:
        R[name]["phase_s"] = round(time.monotonic() - t0, 1)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    run = LocalRun(tmp)
    R = {k: {} for k in ("warmup", "actor_kill", "elastic", "nan", "replay_kill",
                         "learner_kill", "replay_hang", "learner_hang", "sigterm", "secrets")}
    R["run"] = run
    mon = None
    try:
        run.start()
        health = run.client()
        mon = Monitor({n: run.url(n) for n in ("replay", "learner", "evaluator", "actor0",
                                               "actor1")}, health,
                      run.overrides["service.replay_address"])
        mon.start()
        R["monitor"] = mon
        t_start = time.monotonic()
        fetcher = FiniteFetcher(run)

        def warmup():
            wait_for(lambda: mon.last("learner", "crl_learner_sgd_steps_total", 0) >= 300, STARTUP_S,
                     "the learner to train (300 SGD steps)", 1.0)
            R["warmup"]["startup_s"] = round(time.monotonic() - t_start, 1)
            import grpc
            for bad in (None, "wrong-token"):
                c = run.client(token=bad)
                try:
                    with pytest.raises(grpc.RpcError) as e:
                        c.get()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                finally:
                    c.close()
            R["warmup"]["refused_without_token"] = True
            from params import ParameterClient
            with ParameterClient(f"127.0.0.1:{run.base + 1}", timeout_s=3.0,
                                 token=run.token) as plain:   # no TLS: no connection at all
                with pytest.raises(grpc.RpcError) as e:
                    plain.get()
                R["warmup"]["plaintext_client"] = e.value.code().name
        _phase(R, "warmup", warmup)

        def actor_kill():
            r = R["actor_kill"]
            fetcher.start()
            # Elastic: one more actor joins (its start-up overlaps this phase).
            run.extra = run.start_extra_actor()
            mon.add("extra", run.url("extra"))
            r["ids_before"] = sample_episode_ids(run.overrides["service.replay_address"], 2)
            base1 = mon.last("actor0", "crl_actor_episode_id_base")
            next1 = mon.last("actor0", "crl_actor_next_episode_id")
            old_pid = run.kill("actor0")
            t_kill = time.monotonic()
            r["t_kill"] = t_kill
            sgd_at_kill = mon.last("learner", "crl_learner_sgd_steps_total")
            inserts_at_kill = mon.last("replay", "crl_replay_inserts_total")
            wait_for(lambda: run.pids().get("actor0") not in (None, old_pid), 30,
                     "the launcher to restart actor0")
            r["restart_s"] = round(time.monotonic() - t_kill, 1)
            # While actor0 starts again (~1 min): NaN data into replay (phase N, part a).
            try:
                write_nan_segments_and_wait(run, mon, R["nan"])
            except Exception as e:
                R["nan"]["data_error"] = f"{type(e).__name__}: {e}"

            def new_life_writes():
                return any(m.get("crl_actor_episode_id_base") != base1
                           and m.get("crl_actor_segments_written_total", 0) > 0
                           for _, m in mon.rows_of("actor0", t_kill))
            wait_for(new_life_writes, RESTART_S, "the restarted actor0 to write segments", 0.5)
            r["recover_s"] = round(time.monotonic() - t_kill, 1)
            t_rec = time.monotonic()
            r["learner_sgd_during_downtime"] = mon.last("learner", "crl_learner_sgd_steps_total") - sgd_at_kill
            # Extra actor writing too, then a window for the UTD with 3 actors.
            wait_for(lambda: mon.last("extra", "crl_actor_segments_written_total", 0) > 0,
                     RESTART_S, "the extra actor to write", 0.5)
            r["extra_join_s"] = round(time.monotonic() - t_kill, 1)
            wait_for(lambda: utd_window(mon, t_kill, time.monotonic())[1] >= MIN_UTD_WINDOW_STEPS
                     and utd_window(mon, t_rec, time.monotonic())[1] >= MIN_UTD_WINDOW_STEPS,
                     240, "enough env steps for UTD windows", 1.0)
            r["utd_kill_window"] = utd_window(mon, t_kill, time.monotonic())
            r["utd_after_window"] = utd_window(mon, t_rec, time.monotonic())
            inserts = [v for _, v in mon.series("replay", "crl_replay_inserts_total", t_kill - 5)]
            r["inserts_monotonic"] = all(b >= a for a, b in zip(inserts, inserts[1:]))
            r["inserts_at_kill"] = inserts_at_kill
            r["ids_after"] = []
            ranges = {}
            for name in ("actor1", "extra"):
                b = mon.last(name, "crl_actor_episode_id_base")
                n = mon.last(name, "crl_actor_next_episode_id")
                ranges[name] = (b, n + 50 * NUM_ENVS)
            base2 = mon.last("actor0", "crl_actor_episode_id_base")
            r["life1"] = (base1, next1 + 50 * NUM_ENVS)
            # Sample until the restarted actor's segments show up (bounded).
            for _ in range(10):
                r["ids_after"] += sample_episode_ids(run.overrides["service.replay_address"], 2)
                ranges["life2"] = (base2, mon.last("actor0", "crl_actor_next_episode_id")
                                   + 50 * NUM_ENVS)
                if any(min(s) >= ranges["life2"][0] and max(s) < ranges["life2"][1]
                       for s in r["ids_after"]):
                    break
            ranges["nan_test_segments"] = (-7, -6)   # written by phase N (a), not an actor
            r["ranges"] = ranges
        _phase(R, "actor_kill", actor_kill)

        def elastic():
            r = R["elastic"]
            t0 = time.monotonic()
            rc = stop_process(run.extra, timeout_s=STOP_BOUND_S)
            r["extra_stop_s"] = round(time.monotonic() - t0, 2)
            r["extra_rc"] = rc
            run.extra = None
            t_removed = time.monotonic()
            wait_for(lambda: utd_window(mon, t_removed, time.monotonic())[1] >= MIN_UTD_WINDOW_STEPS,
                     240, "a UTD window after the removal", 1.0)
            r["utd_after_removal"] = utd_window(mon, t_removed, time.monotonic())
            r["extra_log"] = (tmp / "extra_actor.log").read_text(errors="replace")[-3000:]
        _phase(R, "elastic", elastic)

        def nan():
            r = R["nan"]
            if "data_error" in r:
                raise AssertionError(r["data_error"])
            # (b) a NaN update through the test-only hook.
            calls_before = mon.last("learner", "crl_learner_update_calls_total")
            r["version_before"] = mon.last("learner", "crl_learner_params_version")
            run.nan_trigger.write_text("1")
            t0 = time.monotonic()
            wait_for(lambda: mon.last("learner", "crl_learner_nonfinite_updates_total", 0) >= 1,
                     120, "the NaN update to be detected", 0.5)
            r["update_detect_s"] = round(time.monotonic() - t0, 1)
            t_detect = time.monotonic()
            # Good updates after the rollback (the counter only counts finite, published ones).
            wait_for(lambda: any(m.get("crl_learner_update_calls_total", 0) > calls_before + 20
                                 for _, m in mon.rows_of("learner", t_detect)), 120,
                     "training to go on after the rollback", 0.5)
            r["resume_s"] = round(time.monotonic() - t0, 1)
            time.sleep(1.0)
            fetcher.stop()
            r["fetched"] = fetcher.fetched
            r["trigger_consumed"] = not run.nan_trigger.exists()
        _phase(R, "nan", nan)

        def replay_kill():
            r = R["replay_kill"]
            from replay.server import complete_checkpoints, verify_checkpoint
            ckpt_dir = str(run.run_dir / "replay_checkpoints")
            # The newest complete checkpoint and what it holds (Reverb may replace it meanwhile).
            n_ckpt = None
            for _ in range(20):
                paths = complete_checkpoints(ckpt_dir)
                try:
                    n_ckpt = verify_checkpoint(paths[-1])
                    break
                except Exception:
                    time.sleep(0.5)
            assert n_ckpt is not None, "no readable replay checkpoint"
            r["checkpoint_items"] = n_ckpt
            r["items_at_kill"] = mon.last("replay", "crl_replay_table_size_items")
            calls = mon.last("learner", "crl_learner_update_calls_total")
            others = ("learner", "evaluator", "actor0", "actor1")
            r["pids_before"] = {n: run.pids().get(n) for n in others}
            import reverb
            from replay import TABLE
            info = reverb.Client(run.overrides["service.replay_address"]).server_info(5)[TABLE]
            r["inserts_at_kill"] = int(info.rate_limiter_info.insert_stats.completed)  # exact
            old_pid = run.kill("replay")
            t_kill = time.monotonic()
            wait_for(lambda: run.pids().get("replay") not in (None, old_pid), 30,
                     "the launcher to restart replay")
            wait_for(lambda: port_open(run.base), RESTART_S, "replay to listen again", 0.2)
            t_up = time.monotonic()
            r["port_open_s"] = round(t_up - t_kill, 1)
            segs = {a: mon.last(a, "crl_actor_segments_written_total") for a in ("actor0", "actor1")}
            wait_for(lambda: [v for _, v in mon.series("replay", "crl_replay_restored_items",
                                                        t_kill)], 60, "replay metrics", 0.5)
            r["restored_items"] = mon.series("replay", "crl_replay_restored_items", t_kill)[-1][1]
            r["restored_inserts"] = mon.series("replay", "crl_replay_inserts_total", t_kill)[0][1]
            # Items confirmed after the last checkpoint and before the kill are gone with it
            # (up to one write may land between the count above and the kill).
            r["inserts_lost"] = r["inserts_at_kill"] - r["restored_inserts"]
            wait_training_and_writing_again(mon, calls, segs, since=t_up, t0=t_kill, r=r)
            r["pids_after"] = {n: run.pids().get(n) for n in others}
            # Reverb's writer usually reconnects by itself (the pending flush just succeeds
            # later); the actor rebuilds its writer only when the flush reports UNAVAILABLE.
            r["actor_writer_rebuilds"] = sum(
                mon.last(a, 'crl_actor_reconnects_total{to="replay"}', 0) for a in ("actor0", "actor1"))
            log = run.log("learner")
            r["learner_reconnect_logged"] = ("replay at" in log and "unreachable" in log
                                             and "replay reachable again" in log)
        _phase(R, "replay_kill", replay_kill)

        def learner_kill():
            r = R["learner_kill"]
            pids_before = run.pids()
            v_before = max(v for _, v in mon.versions)
            sgd_before = mon.last("learner", "crl_learner_sgd_steps_total")
            steps_before = {a: mon.last(a, "crl_actor_env_steps_total", 0) for a in ("actor0", "actor1")}
            unrolls_before = {a: mon.last(a, "crl_actor_unroll_duration_seconds_count", 0)
                              for a in ("actor0", "actor1")}
            limited_before = {a: mon.last(a, "crl_actor_rate_limited_total", 0)
                              for a in ("actor0", "actor1")}
            calls_before = mon.last("learner", "crl_learner_update_calls_total")
            run.kill("learner")
            t_kill = time.monotonic()
            # The learner's own record at the kill: the complete Orbax steps on disk (Orbax
            # renames a step's directory to its number only once it is written; step = calls).
            r["steps_at_kill"] = sorted(int(p.name) for p in
                                        (run.run_dir / "learner_checkpoints").iterdir()
                                        if p.name.isdigit())
            r["v_before"], r["sgd_before"], r["calls_before"] = v_before, sgd_before, calls_before
            wait_for(lambda: any(t > t_kill and v > v_before for t, v in mon.versions), RESTART_S,
                     "the restarted learner to publish", 0.5)
            r["publish_s"] = round(time.monotonic() - t_kill, 1)
            r["first_version_after"] = min(v for t, v in mon.versions if t > t_kill)
            r["steps_during_downtime"] = {a: mon.last(a, "crl_actor_env_steps_total", 0) - steps_before[a]
                                          for a in steps_before}
            r["unrolls_during_downtime"] = {a: mon.last(a, "crl_actor_unroll_duration_seconds_count", 0)
                                            - unrolls_before[a] for a in unrolls_before}
            r["rate_limited_during_downtime"] = {
                a: mon.last(a, "crl_actor_rate_limited_total", 0) - limited_before[a]
                for a in limited_before}
            r["actor_versions_during"] = {a: [v for _, v in mon.series(a, "crl_actor_params_version",
                                                                       t_kill)]
                                          for a in ("actor0", "actor1")}
            wait_for(lambda: any(m.get("crl_learner_update_calls_total", 0) > 0
                                 for _, m in mon.rows_of("learner", t_kill)), RESTART_S,
                     "the restarted learner to train", 0.5)
            r["training_s"] = round(time.monotonic() - t_kill, 1)
            wait_for(lambda: mon.last("learner", "crl_learner_sgd_steps_total", 0) > sgd_before, RESTART_S,
                     "the learner to train past its pre-kill SGD steps", 0.5)
            r["caught_up_s"] = round(time.monotonic() - t_kill, 1)
            wait_for(lambda: all(mon.last(a, "crl_actor_params_version", -1) > v_before
                                 for a in ("actor0", "actor1")), 120,
                     "actors to pick up the new versions", 0.5)
            r["actors_new_version_s"] = round(time.monotonic() - t_kill, 1)
            log = run.log("learner")
            resumed = [l for l in log.splitlines() if "resumed from" in l]
            r["resumed_line"] = resumed[-1] if resumed else None
            if resumed:   # "resumed from DIR step S: sgd_steps=N, next params version V"
                r["step_resumed"] = int(resumed[-1].split(" step ")[1].split(":")[0])
                r["sgd_resumed"] = int(resumed[-1].split("sgd_steps=")[1].split(",")[0])
                r["sgd_lost"] = sgd_before - r["sgd_resumed"]   # < 0: saved after that scrape
            r["pids_before"], r["pids_after"] = pids_before, run.pids()
        _phase(R, "learner_kill", learner_kill)

        def hang(name):
            """SIGSTOP `name` for HANG_S, SIGCONT; returns (pids before, t of the SIGCONT)."""
            pids_before = run.pids()
            os.kill(pids_before[name], signal.SIGSTOP)
            try:
                time.sleep(HANG_S)
            finally:
                os.kill(pids_before[name], signal.SIGCONT)
            return pids_before, time.monotonic()

        def replay_hang():
            r = R["replay_hang"]
            calls = mon.last("learner", "crl_learner_update_calls_total")
            segs = {a: mon.last(a, "crl_actor_segments_written_total") for a in ("actor0", "actor1")}
            inserts = mon.last("replay", "crl_replay_inserts_total")
            r["pids_before"], t_cont = hang("replay")
            # Replay's own counters: it takes inserts again; the learner trains on new samples
            # (more calls than its prefetched batches allow); both actors' writes are confirmed.
            wait_for(lambda: any(m.get("crl_replay_inserts_total", 0) > inserts
                                 for _, m in mon.rows_of("replay", t_cont)), RESTART_S,
                     "replay to take inserts again", 0.5)
            r["inserts_resumed_s"] = round(time.monotonic() - t_cont, 1)
            wait_training_and_writing_again(mon, calls, segs, since=t_cont, t0=t_cont, r=r)
            r["pids_after"] = run.pids()
        _phase(R, "replay_hang", replay_hang)

        def learner_hang():
            r = R["learner_hang"]
            v_before = max(v for _, v in mon.versions)
            r["pids_before"], t_cont = hang("learner")
            wait_for(lambda: any(t > t_cont and v > v_before for t, v in mon.versions), RESTART_S,
                     "the learner to publish again", 0.5)
            r["publish_s"] = round(time.monotonic() - t_cont, 1)
            wait_for(lambda: all(mon.last(a, "crl_actor_params_version", -1) > v_before
                                 for a in ("actor0", "actor1")), RESTART_S,
                     "actors to pick up a new version", 0.5)
            r["actors_new_version_s"] = round(time.monotonic() - t_cont, 1)
            r["pids_after"] = run.pids()
        _phase(R, "learner_hang", learner_hang)

        def sigterm():
            r = R["sigterm"]
            r["replay_items_before_stop"] = mon.last("replay", "crl_replay_table_size_items")
            t0 = time.monotonic()
            stop_process(run.proc, timeout_s=300)
            r["launcher_stop_s"] = round(time.monotonic() - t0, 1)
            r["launcher_rc"] = run.proc.returncode
            r["summary"] = json.loads((run.run_dir / "summary.json").read_text())
            r["learner_final"] = json.loads((run.run_dir / "learner_final.json").read_text())
        mon.stop_event.set()
        _phase(R, "sigterm", sigterm)
    except BaseException:
        pass   # recorded per phase; the tests report it
    finally:
        if mon is not None:
            mon.stop_event.set()
            with open(tmp / "monitor.jsonl", "w") as f:   # for post-mortems of a failed run
                for t, n, m in list(mon.rows):
                    f.write(json.dumps({"t": t, "role": n, "m": m}) + "\n")
        run.cleanup()
        R["logs"] = {n: run.log(n) for n in ("replay", "learner", "evaluator", "actor0", "actor1")}
        _write_results(R)
    return R


class FiniteFetcher(threading.Thread):
    """Fetches every new params version (TLS + token, as an actor) and records if it is finite."""

    def __init__(self, run):
        super().__init__(daemon=True, name="finite-fetcher")
        self.run_, self.fetched, self._halt = run, [], threading.Event()

    def run(self):
        c, v = self.run_.client(), -1
        try:
            while not self._halt.wait(0.3):
                try:
                    got = c.get(min_version=v, subset="all")
                except Exception:
                    continue
                if got is not None:
                    v = got[0]
                    self.fetched.append((v, all(np.isfinite(x).all() for x in _leaves(got[1]))))
        finally:
            c.close()

    def stop(self):
        self._halt.set()
        self.join(10)


def write_nan_segments_and_wait(run, mon, r):
    """NaN states in two segments written straight into replay; the learner must drop them."""
    from crl.segments import segment_spec
    from replay import ReplayTimeout
    from replay.writer import SegmentWriter
    spec = segment_spec(4, 2, T)
    segs = {k: np.zeros((NAN_SEGMENTS,) + s, d) for k, (s, d) in spec.items()}
    segs["state"][:] = np.nan
    segs["episode_id"][:] = -7
    assert segs["state"].shape[0] == NAN_SEGMENTS
    rollbacks = mon.last("learner", "crl_learner_nonfinite_updates_total", 0)
    w = SegmentWriter(run.overrides["service.replay_address"], spec, 2.0)
    try:
        if not _try(lambda: w.write(segs), ReplayTimeout):   # rate limited: they stay queued
            wait_for(lambda: _try(w.flush, ReplayTimeout), 60, "NaN segments in")
    finally:
        w.close()
    t0 = time.monotonic()
    wait_for(lambda: mon.last("learner", "crl_learner_nonfinite_segments_total", 0) >= 1,
             120, "the learner to meet the NaN segments", 0.5)
    r["data_detect_s"] = round(time.monotonic() - t0, 1)
    r["rollbacks_from_data"] = mon.last("learner", "crl_learner_nonfinite_updates_total", 0) - rollbacks


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _try(fn, exc):
    try:
        fn()
        return True
    except exc:
        return False


def _write_results(R):
    row = {"test": "faults_local", "unix_s": time.time()}
    keep = {
        "warmup": ["startup_s"],
        "actor_kill": ["restart_s", "recover_s", "extra_join_s", "utd_kill_window",
                       "utd_after_window", "learner_sgd_during_downtime"],
        "elastic": ["extra_stop_s", "utd_after_removal"],
        "nan": ["data_detect_s", "rollbacks_from_data", "update_detect_s", "resume_s"],
        "replay_kill": ["port_open_s", "learner_resumed_s", "actors_resumed_s", "checkpoint_items",
                        "restored_items", "items_at_kill", "inserts_at_kill", "restored_inserts",
                        "inserts_lost", "actor_writer_rebuilds"],
        "learner_kill": ["publish_s", "training_s", "actors_new_version_s", "v_before",
                         "first_version_after", "sgd_before", "sgd_lost", "caught_up_s",
                         "steps_at_kill", "step_resumed", "calls_before",
                         "steps_during_downtime", "unrolls_during_downtime",
                         "rate_limited_during_downtime", "resumed_line"],
        "replay_hang": ["inserts_resumed_s", "learner_resumed_s", "actors_resumed_s"],
        "learner_hang": ["publish_s", "actors_new_version_s"],
        "sigterm": ["launcher_stop_s"],
    }
    for phase, keys in keep.items():
        row[phase] = {k: R[phase].get(k) for k in keys}
        row[phase]["ok"] = R[phase].get("ok", False)
    if "summary" in R["sigterm"]:
        row["sigterm"]["stop_s"] = R["sigterm"]["summary"].get("stop_s")
    print(json.dumps(row, indent=1, default=str))
    record_result("faults", row, R["run"].tmp)


def _need(R, phase):
    if not R[phase].get("ok"):
        pytest.fail(f"phase {phase} did not complete: {R[phase].get('error', 'not reached')}")
    return R[phase]


# ---------------------------------------------------------------------------------------------
# Assertions, one test per fault.

def test_refuses_clients_without_the_token_or_tls(scenario):
    r = _need(scenario, "warmup")
    assert r["refused_without_token"]
    assert r["plaintext_client"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_actor_sigkill_restarted_training_goes_on_and_episode_ids_are_fresh(scenario):
    r = _need(scenario, "actor_kill")
    assert r["learner_sgd_during_downtime"] > 0          # the learner kept training
    assert r["inserts_monotonic"]                        # nothing stored was lost
    cfg = scenario["run"].cfg
    for key in ("utd_kill_window", "utd_after_window"):
        utd, steps = r[key]
        band = utd_band(cfg, steps, NAN_SEGMENTS)
        assert steps >= MIN_UTD_WINDOW_STEPS and band <= UTD_BAND, (key, steps, band)
        assert abs(utd / UTD - 1) <= band, (key, utd, steps, band)
    ranges = dict(r["ranges"], life1=r["life1"])
    names = list(ranges)
    for i, a in enumerate(names):                        # id ranges of all lives are disjoint
        for b in names[i + 1:]:
            (a0, a1), (b0, b1) = ranges[a], ranges[b]
            assert a1 <= b0 or b1 <= a0, (a, ranges[a], b, ranges[b])
    seen_before = set().union(*r["ids_before"])
    life2 = ranges["life2"]
    new_segments = [s for s in r["ids_after"] if min(s) >= life2[0] and max(s) < life2[1]]
    assert new_segments, "no segment of the restarted actor was sampled"
    for s in r["ids_after"]:                             # every segment belongs to one life
        owners = [n for n, (lo, hi) in ranges.items() if min(s) >= lo and max(s) < hi]
        assert len(owners) == 1, (s, ranges)
    new_ids = set().union(*new_segments)
    assert not new_ids & seen_before
    assert not any(r["life1"][0] <= i < r["life1"][1] for i in new_ids)


def test_elastic_actors_join_and_leave_with_utd_in_band(scenario):
    a = _need(scenario, "actor_kill")
    r = _need(scenario, "elastic")
    assert a["extra_join_s"] < RESTART_S
    assert r["extra_rc"] == 0 and r["extra_stop_s"] < STOP_BOUND_S
    assert "stopped" in r["extra_log"] and "dropped" not in r["extra_log"]
    utd, steps = r["utd_after_removal"]
    band = utd_band(scenario["run"].cfg, steps)
    assert steps >= MIN_UTD_WINDOW_STEPS and band <= UTD_BAND, (steps, band)
    assert abs(utd / UTD - 1) <= band, (utd, steps, band)


def test_nan_data_and_nan_update_are_detected_not_published_and_training_goes_on(scenario):
    r = _need(scenario, "nan")
    assert r["rollbacks_from_data"] == 0                 # bad data: batch dropped, no rollback
    assert r["trigger_consumed"]
    assert r["fetched"] and all(ok for _, ok in r["fetched"]), r["fetched"]
    versions = [v for v, _ in r["fetched"]]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    log = scenario["logs"]["learner"]
    assert "sampled batch holds" in log and "items deleted from replay" in log
    assert "non-finite update" in log and "rolling back to checkpoint" in log
    assert r["resume_s"] < 60        # no recompile after the rollback (it used to cost 12 s)


def test_replay_sigkill_restores_checkpoint_and_everyone_reconnects(scenario):
    r = _need(scenario, "replay_kill")
    assert r["restored_items"] >= r["checkpoint_items"] > 0
    # The restore is a checkpoint from before the kill (up to 2 writes may land after the count).
    assert r["restored_inserts"] <= r["inserts_at_kill"] + 2 * NUM_ENVS
    assert r["learner_resumed_s"] < RESTART_S and r["actors_resumed_s"] < RESTART_S
    assert r["pids_after"] == r["pids_before"]           # nobody else was restarted for it
    assert r["learner_reconnect_logged"]                 # the learner saw it go and come back


def test_learner_sigkill_resumes_versions_monotonic_actors_keep_running(scenario):
    r = _need(scenario, "learner_kill")
    mon = scenario["monitor"]
    versions = [v for _, v in mon.versions]
    assert versions == sorted(versions), "a params version went backwards"
    assert r["first_version_after"] > r["v_before"]
    assert r["resumed_line"] is not None
    # It resumed from the newest checkpoint complete at the kill, and that one is at most two
    # checkpoint intervals older than the last figure seen before the kill (the newest periodic
    # save may still have been in the background): the SGD steps lost are bounded by those.
    cfg = scenario["run"].cfg
    every, mb = cfg.learner.checkpoint_every, cfg.learner.minibatches_per_call
    assert r["steps_at_kill"] and r["step_resumed"] == r["steps_at_kill"][-1], r
    assert r["step_resumed"] >= r["calls_before"] - 2 * every, r
    assert r["sgd_lost"] <= 2 * every * mb, r
    for a in ("actor0", "actor1"):
        assert r["pids_before"][a] == r["pids_after"][a]          # actors were not restarted
        seq = r["actor_versions_during"][a]
        assert seq == sorted(seq) and seq and seq[0] >= 0         # last params kept, never back
        # Still stepping: more unrolls/env steps, or held by the rate limiter (retrying).
        assert (r["steps_during_downtime"][a] > 0 or r["unrolls_during_downtime"][a] > 0
                or r["rate_limited_during_downtime"][a] > 0), r
    for a in ("actor0", "actor1"):   # over the whole run, per process life (id base)
        lives = {}
        for _, m in mon.rows_of(a):
            if m.get("crl_actor_episode_id_base", 0) > 0:
                lives.setdefault(m["crl_actor_episode_id_base"], []).append(
                    m["crl_actor_params_version"])
        assert lives and all(v == sorted(v) for v in lives.values()), (a, lives)
    assert r["training_s"] < RESTART_S


@pytest.mark.parametrize("role", ["replay", "learner"])
def test_a_hung_role_is_survived_nobody_crashes_and_work_resumes(scenario, role):
    r = _need(scenario, f"{role}_hang")
    assert r["pids_after"] == r["pids_before"]     # nobody crashed, nobody was restarted
    resumed = [v for k, v in r.items() if k.endswith("_s")]
    assert resumed and all(t < RESTART_S for t in resumed), r
    restarts = scenario["sigterm"].get("summary", {}).get("restart_events", {})
    assert not any(e.get("hung_s") for events in restarts.values() for e in events), restarts


def test_sigterm_every_role_exits_0_in_bounded_time_with_state_saved(scenario):
    r = _need(scenario, "sigterm")
    s = r["summary"]
    assert r["launcher_rc"] == 0
    assert set(s["exit_codes"]) == {"replay", "learner", "evaluator", "actor0", "actor1"}
    assert all(code == 0 for code in s["exit_codes"].values()), s["exit_codes"]
    assert all(t is not None and t < STOP_BOUND_S for t in s["stop_s"].values()), s["stop_s"]
    # The summary holds each role's own figures at its exit (the actors' last flushes included).
    assert set(s["final_metrics"]) == set(s["exit_codes"]), s["final_metrics"]
    assert all(s["metrics"][a]["crl_actor_segments_dropped_total"] == 0
               for a in ("actor0", "actor1")), s["metrics"]
    run = scenario["run"]
    final = r["learner_final"]
    assert final["stopped_by"] == "signal"
    from learner.checkpoint import LearnerCheckpointer
    ck = LearnerCheckpointer(str(run.run_dir / "learner_checkpoints"))
    assert ck.latest_step() == final["update_calls"]              # the final state is saved
    ck.close()
    from replay.server import complete_checkpoints, verify_checkpoint
    items = verify_checkpoint(complete_checkpoints(str(run.run_dir / "replay_checkpoints"))[-1])
    assert items >= r["replay_items_before_stop"] > 0             # nothing stored was lost
    logs = scenario["logs"]
    for a in ("actor0", "actor1"):
        assert "stopped" in logs[a] and "were not confirmed" not in logs[a], a


def test_token_never_appears_in_logs_or_files(scenario):
    run = scenario["run"]
    token = run.token.encode()
    leaked = []
    for root, _, files in os.walk(run.tmp):
        for f in files:
            p = Path(root) / f
            try:
                if token in p.read_bytes():
                    leaked.append(str(p))
            except OSError:
                pass
    assert not leaked, leaked
