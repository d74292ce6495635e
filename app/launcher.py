"""`crl local`: every role as its own process on this machine, from one config.

replay -> learner -> evaluator -> actors, each `python -m app.cli ROLE --config <run_dir>/config.yaml`
with its own /metrics port (service.metrics_port + k) and log file (<run_dir>/logs/ROLE.log).
Shows a progress line read from the roles' metrics, restarts a child that crashed, and stops
everything (SIGTERM, then SIGKILL after a bound) on Ctrl-C or when the run is over: the learner
exited 0 at its step budget, or it marked the run finished (<run_dir>/finished.json) and every
actor and the evaluator then finished by themselves (exit 0, not restarted). Writes <run_dir>/summary.json with the last metrics of every role, exit codes,
restarts (with times) and how long each role took to stop after SIGTERM, and keeps
<run_dir>/pids.json ({name: pid} of the running children) current for tools and fault tests.
The ParameterService's TLS files and token are checked before anything starts.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

from crl import metrics as M
from crl.config import Config, dump, local_roles
from crl.run_marker import marker_path, read_marker

MAX_RESTARTS = 5
STOP_TIMEOUT_S = 60.0
HANG_TIMEOUT_S = 60.0    # a running role whose /metrics stays silent this long is restarted
FINISH_MARKER_WAIT_S = 10.0   # a follower's exit 0 waits this long for the finished marker


class Child:
    def __init__(self, name: str, role: str, extra: List[str], metrics_port: int, cfg_path: str,
                 log_dir: str):
        self.name, self.role, self.metrics_port = name, role, metrics_port
        self.argv = [sys.executable, "-m", "app.cli", role, "--config", cfg_path,
                     "--metrics-port", str(metrics_port)] + extra
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.exit_codes: List[int] = []
        self.events: List[Dict] = []       # {"t": seconds since launch, "exit_code", "restart"}
        self.stop_s: Optional[float] = None
        self.env: Dict[str, str] = {}      # its GPU placement (crl/placement.py)
        self.last_answer: Optional[float] = None   # monotonic time of its last /metrics answer
        self.finished = False              # exited 0 after the run finished: not restarted

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        self.last_answer = None
        log = open(self.log_path, "a")
        log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n")
        log.flush()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                   PYTHONUNBUFFERED="1", **self.env)
        # Own session: the terminal's Ctrl-C reaches the launcher only, which stops the roles
        # in order. Parent-death signal: a launcher killed by SIGKILL takes its roles with it.
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        log.close()

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout_s: float) -> int:
        if self.proc is None:
            return 0
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        self.stop_s = time.monotonic() - t0
        return rc


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (Linux prctl; the role's handler
    stops it cleanly). Elsewhere a no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


class RunDirLocked(RuntimeError):
    """Another launcher owns this run directory."""


def lock_run_dir(run_dir: str):
    """An exclusive lock on <run_dir>/.crl-local.lock held by this process until it exits (the
    kernel drops it when the process dies, even by SIGKILL). Returns the open lock file."""
    import fcntl
    f = open(os.path.join(run_dir, ".crl-local.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise RunDirLocked(f"run directory {run_dir} is in use by another `crl local` (pid "
                           f"{owner}); stop it first, or pass --run.run_dir DIR for a new run")
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class StopRequested(Exception):
    """Ctrl-C / SIGTERM arrived while a role was starting."""


def ports_in_use(cfg: Config) -> List[str]:
    """The ports of this run another program already listens on, each as "field = port".
    (Reverb binds every interface, so a program on 127.0.0.1:P would silently take the run's
    clients while replay listens beside it.) Probed by binding the wildcard address with
    SO_REUSEADDR, as the servers do: free or TIME_WAIT ports pass, a live listener does not."""
    ports = {f"service.replay_address = {cfg.service.replay_address}":
             int(cfg.service.replay_address.rpartition(":")[2]),
             f"service.params_address = {cfg.service.params_address}":
             int(cfg.service.params_address.rpartition(":")[2])}
    for k, _ in enumerate(local_roles(cfg)):
        ports[f"service.metrics_port + {k} = {cfg.service.metrics_port + k}"] = \
            cfg.service.metrics_port + k
    busy = []
    for what, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError:
                busy.append(what)
    return busy


def _wait_port(address: str, timeout_s: float, child: Child,
               stopped=lambda: False) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stopped():
            raise StopRequested(f"stop requested while {child.name} was starting")
        if child.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.poll()} during start-up; "
                               f"see {child.log_path}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0) as conn:
                if conn.getsockname() != conn.getpeername():   # not connected to itself
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{child.name} did not open {address} within {timeout_s:.0f}s; "
                       f"see {child.log_path}")


def _write_pids(run_dir: str, children: List[Child]) -> None:
    """Keeps <run_dir>/pids.json current; a failed write (disk full) is reported, never fatal:
    the launcher holds the PIDs itself."""
    pids = {c.name: c.proc.pid for c in children if c.proc is not None and c.poll() is None}
    tmp = os.path.join(run_dir, "pids.json.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(pids, f)
        os.replace(tmp, os.path.join(run_dir, "pids.json"))
    except OSError as e:
        print(f"[local] could not write {run_dir}/pids.json ({e}); going on", file=sys.stderr,
              flush=True)


def _learner_finished(run_dir: str) -> bool:
    """True if the learner exited 0 because it reached its step budget (not a stray SIGTERM)."""
    try:
        with open(os.path.join(run_dir, "learner_final.json")) as f:
            return json.load(f).get("stopped_by", "budget") == "budget"
    except (OSError, ValueError):
        return True


def _wait_for_marker(run_dir: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while read_marker(marker_path(run_dir)) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _get(m: Dict[str, float], name: str, default=float("nan")) -> float:
    return m.get(name, default)


def progress_line(scraped: Dict[str, Dict[str, float]], actors: List[str], t: float) -> str:
    learner, ev = scraped.get("learner", {}), scraped.get("evaluator", {})
    env_steps = sum(_get(scraped.get(a, {}), "crl_actor_env_steps_total", 0.0) for a in actors)
    versions = [int(_get(scraped.get(a, {}), "crl_actor_params_version", -1)) for a in actors]
    return (f"[local {t:6.0f}s] env_steps={env_steps:,.0f} "
            f"sgd_steps={_get(learner, 'crl_learner_sgd_steps_total', 0):,.0f} "
            f"utd={_get(learner, 'crl_learner_utd'):.4f}/{_get(learner, 'crl_learner_utd_target'):.4f} "
            f"version={_get(learner, 'crl_learner_params_version', -1):.0f} "
            f"actor_versions={versions} lag={_get(learner, 'crl_learner_policy_lag'):.1f} "
            f"time_at_goal={_get(ev, 'crl_eval_time_at_goal'):.1f} "
            f"(v{_get(ev, 'crl_eval_params_version', -1):.0f})")


def run(cfg: Config, *, progress_every_s: float = 5.0, startup_timeout_s: float = 300.0,
        hang_timeout_s: float = HANG_TIMEOUT_S, out=sys.stdout) -> int:
    from crl.config import ConfigError
    from params import security_from_config
    try:   # the files a Secret mounts in a pod: checked here before any child starts
        security_from_config(cfg.service, server=True)
        security_from_config(cfg.service, server=False)
    except ConfigError as e:
        print(f"[local] invalid config: {e}", file=out, flush=True)
        return 2
    run_dir = cfg.run.run_dir
    log_dir = os.path.join(run_dir, "logs")
    try:   # under a file, under /proc, read-only: said here, before anything starts
        os.makedirs(log_dir, exist_ok=True)
    except OSError as e:
        print(f"[local] invalid config: run.run_dir = {run_dir!r}: cannot create {log_dir} "
              f"({e.strerror or e}); choose a directory you can write", file=out, flush=True)
        return 2
    try:
        lock = lock_run_dir(run_dir)   # before anything in the directory is touched
    except RunDirLocked as e:
        print(f"[local] {e}", file=out, flush=True)
        return 2
    cfg_path = os.path.join(run_dir, "config.yaml")
    dump(cfg, cfg_path)
    base = cfg.service.metrics_port
    replay = Child("replay", "replay", [], base, cfg_path, log_dir)
    learner = Child("learner", "learner", [], base + 1, cfg_path, log_dir)
    evaluator = Child("evaluator", "evaluate", [], base + 2, cfg_path, log_dir)
    actors = [Child(f"actor{i}", "actor", ["--actor-id", str(i)], base + 3 + i, cfg_path, log_dir)
              for i in range(cfg.actor.num_actors)]
    children = [replay, learner, evaluator] + actors
    followers = [evaluator] + actors      # they follow the learner's params
    from crl import placement
    try:
        plan = placement.plan(cfg, placement.detect_gpus())
    except placement.PlacementError as e:
        print(f"[local] invalid config: {e}", file=out, flush=True)
        lock.close()
        return 2
    for c in children:
        c.env = plan[c.name]

    busy = ports_in_use(cfg)
    if busy:
        print(f"[local] invalid config: another program listens on the port(s) of "
              f"{'; '.join(busy)}; stop it or choose other ports", file=out, flush=True)
        lock.close()
        return 2

    interrupted = []
    previous = {s: signal.signal(s, lambda *_: interrupted.append(1))
                for s in (signal.SIGINT, signal.SIGTERM)}
    scraped: Dict[str, Dict[str, float]] = {}
    versions_seen: Dict[str, List[int]] = {a.name: [] for a in actors}
    t0 = time.monotonic()
    status = 0
    try:
        print(f"[local] run dir {run_dir}; logs in {log_dir}; curves: tensorboard --logdir "
              f"{os.path.join(run_dir, 'tb')}", file=out, flush=True)
        if any(env.get("CUDA_VISIBLE_DEVICES") for env in plan.values()):
            for line in placement.describe(plan):
                print(f"[local] {line}", file=out, flush=True)
        replay.start()
        _write_pids(run_dir, children)
        _wait_port(cfg.service.replay_address, startup_timeout_s, replay, lambda: interrupted)
        learner.start()
        _write_pids(run_dir, children)
        _wait_port(cfg.service.params_address, startup_timeout_s, learner, lambda: interrupted)
        for c in [evaluator] + actors:
            c.start()
        _write_pids(run_dir, children)
        last_progress = 0.0
        while not interrupted:
            time.sleep(0.5)
            rc = learner.poll()
            if rc == 0 and _learner_finished(run_dir):
                print("[local] learner reached the step budget; stopping", file=out, flush=True)
                break
            # At the budget the learner publishes a final version marked finished: actors and
            # the evaluator finish on their own (exit 0) and are not restarted; once all have,
            # the run is over without waiting out the learner's grace period.
            finished = read_marker(marker_path(run_dir)) is not None
            if finished and all(c.finished for c in followers):
                print("[local] run finished: every actor and the evaluator exited 0; stopping",
                      file=out, flush=True)
                break
            for c in children:
                rc = c.poll()
                if rc is None or c.finished:
                    continue
                if rc == 0 and c in followers and not finished:
                    # The learner publishes the finished version just before it writes the
                    # marker: a follower quick to see it may exit a moment before the marker.
                    finished = _wait_for_marker(run_dir, FINISH_MARKER_WAIT_S)
                if rc == 0 and finished and c in followers:
                    c.finished = True
                    c.exit_codes.append(rc)
                    c.events.append({"t": round(time.monotonic() - t0, 3), "exit_code": rc,
                                     "finished": True})
                    print(f"[local] {c.name} finished (exit 0)", file=out, flush=True)
                    continue
                c.exit_codes.append(rc)
                c.events.append({"t": round(time.monotonic() - t0, 3), "exit_code": rc,
                                 "restart": c.restarts + 1})
                if c.restarts >= MAX_RESTARTS:
                    raise RuntimeError(f"{c.name} crashed {c.restarts + 1} times (last exit {rc}); "
                                       f"see {c.log_path}")
                c.restarts += 1
                print(f"[local] {c.name} exited with {rc}; restart {c.restarts}/{MAX_RESTARTS}",
                      file=out, flush=True)
                c.start()
                _write_pids(run_dir, children)
            now = time.monotonic()
            if now - last_progress >= progress_every_s:
                for c in children:
                    m = M.scrape(c.url, timeout_s=1.0)
                    if m:
                        scraped[c.name] = m
                        c.last_answer = now
                    elif (c.last_answer is not None and now - c.last_answer > hang_timeout_s
                          and c.poll() is None):
                        # Up, but silent (stopped, deadlocked): a hang is handled as a crash.
                        print(f"[local] {c.name} has not answered for {now - c.last_answer:.0f}s "
                              f"(hung); killing it to restart it", file=out, flush=True)
                        c.events.append({"t": round(now - t0, 3), "hung_s":
                                         round(now - c.last_answer, 1)})
                        c.proc.kill()
                for a in actors:
                    v = scraped.get(a.name, {}).get("crl_actor_params_version")
                    if v is not None and (not versions_seen[a.name] or versions_seen[a.name][-1] != v):
                        versions_seen[a.name].append(int(v))
                print(progress_line(scraped, [a.name for a in actors], now - t0), file=out,
                      flush=True)
                last_progress = now
        if interrupted:
            print("[local] interrupted; stopping every role", file=out, flush=True)
    except StopRequested as e:
        print(f"[local] {e}; stopping every role", file=out, flush=True)
    except Exception as e:
        print(f"[local] error: {e}", file=out, flush=True)
        status = 1
    finally:
        for c in actors + [evaluator]:   # final metrics of the roles that are still up
            m = M.scrape(c.url, timeout_s=1.0)
            if m:
                scraped[c.name] = m
        exits = {}
        # Producers first, replay last, so nothing is written to a stopped server.
        for group in (actors, [evaluator], [learner], [replay]):
            for c in group:
                c.terminate()
            for c in group:
                exits[c.name] = c.wait_or_kill(STOP_TIMEOUT_S)
        _write_pids(run_dir, children)   # {} once everything stopped
        # Each role's own figures at its end (an actor's last flush came after the scrape above);
        # the last scrape stays for a role that wrote none (killed at the stop timeout).
        final_metrics = []
        for c in children:
            own = M.read_final_metrics(run_dir, c.name, c.proc.pid) if c.proc else None
            if own is not None:
                scraped[c.name] = own
                final_metrics.append(c.name)
        for s, h in previous.items():
            signal.signal(s, h)
        # The learner's last scrape can predate its final calls (the owed ones at the budget):
        # its final figures come from learner_final.json, written at its exit.
        try:
            with open(os.path.join(run_dir, "learner_final.json")) as f:
                final = json.load(f)
        except (OSError, ValueError):
            final = None
        if final is not None:
            lm = scraped.setdefault("learner", {})
            for metric, key in (("crl_learner_utd", "utd"), ("crl_learner_sgd_steps_total", "sgd_steps"),
                                ("crl_learner_env_steps_total", "env_steps"),
                                ("crl_learner_params_version", "params_version")):
                if final.get(key) is not None:
                    lm[metric] = final[key]
        summary = {"metrics": scraped, "final_metrics": final_metrics,
                   "learner_final": final, "exit_codes": exits,
                   "finished": read_marker(marker_path(run_dir)),
                   "finished_by_themselves": [c.name for c in followers if c.finished],
                   "restarts": {c.name: c.restarts for c in children},
                   "restart_events": {c.name: c.events for c in children},
                   "stop_s": {c.name: c.stop_s for c in children},
                   "actor_versions_seen": versions_seen, "wall_s": time.monotonic() - t0}
        try:
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        except OSError as e:   # disk full: the summary goes to the terminal instead
            print(f"[local] could not write {run_dir}/summary.json ({e}); the summary:\n"
                  f"{json.dumps(summary, default=str)}", file=out, flush=True)
        print(f"[local] stopped; exit codes {exits}; summary in {run_dir}/summary.json", file=out,
              flush=True)
        lock.close()
    return status


def main(cfg: Config, args) -> int:
    return run(cfg, hang_timeout_s=args.hang_timeout_s)
