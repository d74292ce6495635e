"""`crl local` as a process: one launcher per run directory, and roles that die with it.

Real processes on 127.0.0.1: a launcher killed with SIGKILL must not leave its roles running
(they hold ports and would write into the run directory of the next launcher), and a second
launcher on a run directory in use is refused before it touches anything.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from crl import metrics as M
from helpers import REPO, free_port_block, stop_process, wait_for

HANG_S = 15


def _stat_fields(pid) -> list:
    """/proc/<pid>/stat after the command name: [state, ppid, ...] (OSError if it is gone)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (exited, not yet reaped) counts as gone
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def _local(run_dir, base, log_path, *more):
    args = [*more, "--run.run_dir", run_dir, "--service.replay_address", f"127.0.0.1:{base}",
            "--service.params_address", f"127.0.0.1:{base + 1}",
            "--service.metrics_port", base + 2, "--actor.num_actors", 1,
            "--network.actor.width", 32, "--network.critic.width", 32, "--env.num_envs", 8,
            "--replay.min_size_steps", 3200, "--learner.total_env_steps", 10**9]
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "local", *map(str, args)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1"))


def test_second_launcher_refused_and_roles_die_with_a_killed_launcher(tmp_path):
    run_dir = tmp_path / "run"
    base = free_port_block(16)
    first = _local(run_dir, base, tmp_path / "first.out", "--hang-timeout-s", HANG_S)
    pids = {}
    try:
        def roles_started():
            nonlocal pids
            try:
                pids = json.loads((run_dir / "pids.json").read_text())
            except (OSError, ValueError):
                return False
            return {"replay", "learner"} <= set(pids)
        wait_for(lambda: roles_started() or first.poll() is not None, 300,
                 "replay and the learner to start")
        assert first.poll() is None, (tmp_path / "first.out").read_text()[-3000:]

        for name in ("replay", "learner"):   # the placement reached the children (no GPU here)
            environ = dict(kv.split("=", 1) for kv in
                           open(f"/proc/{pids[name]}/environ").read().split("\0") if "=" in kv)
            assert environ.get("CUDA_VISIBLE_DEVICES") == "", (name, environ.get("CUDA_VISIBLE_DEVICES"))

        # A hung role (SIGSTOP: alive, silent) is noticed by the launcher and restarted.
        evaluator_metrics = f"http://127.0.0.1:{base + 2 + 2}/metrics"
        wait_for(lambda: M.scrape(evaluator_metrics, 1.0) or first.poll() is not None, 300,
                 "the evaluator to answer")
        assert first.poll() is None
        time.sleep(6)                         # the launcher's next scrape has seen it answer
        hung = json.loads((run_dir / "pids.json").read_text())["evaluator"]
        os.kill(hung, signal.SIGSTOP)
        t_stop = time.monotonic()
        wait_for(lambda: json.loads((run_dir / "pids.json").read_text()).get("evaluator")
                 not in (None, hung), HANG_S + 60, "the launcher to restart the hung evaluator")
        restart_s = time.monotonic() - t_stop
        assert not _alive(hung)
        assert "evaluator has not answered" in (tmp_path / "first.out").read_text()
        # Silent for HANG_S since its last answer (up to one 5 s scrape interval before the stop).
        assert HANG_S - 6 <= restart_s <= HANG_S + 30, restart_s
        pids = json.loads((run_dir / "pids.json").read_text())

        second = _local(run_dir, base + 8, tmp_path / "second.out")
        rc = second.wait(timeout=120)
        out = (tmp_path / "second.out").read_text()
        assert rc == 2 and "in use by another `crl local`" in out, out[-2000:]
        assert str(first.pid) in out                        # names the owner
        assert first.poll() is None                         # the first run is untouched

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        t0 = time.monotonic()
        wait_for(lambda: not any(_alive(p) for p in pids.values()), 90,
                 f"the roles {pids} to exit after the launcher was killed")
        gone_s = time.monotonic() - t0
    finally:
        stop_process(first, timeout_s=30)
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert gone_s < 90
    third = _local(run_dir, base, tmp_path / "third.out")   # the lock died with its owner
    try:
        wait_for(lambda: "run dir" in (tmp_path / "third.out").read_text()
                 or third.poll() is not None, 120, "a new launcher to take the run directory")
        assert third.poll() is None, (tmp_path / "third.out").read_text()[-2000:]
    finally:
        stop_process(third, timeout_s=120)


def test_a_port_taken_by_another_program_is_refused_before_anything_starts(tmp_path):
    """Reverb binds every interface, so a program on 127.0.0.1:<replay port> used to take the
    run's clients while replay listened beside it; now the launcher names the port and exits 2."""
    import socket
    base = free_port_block(8)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", base))
    squatter.listen()
    try:
        proc = _local(tmp_path / "run", base, tmp_path / "out")
        rc = proc.wait(timeout=120)
    finally:
        squatter.close()
    out = (tmp_path / "out").read_text()
    assert rc == 2 and f"service.replay_address = 127.0.0.1:{base}" in out, out[-2000:]
    assert not (tmp_path / "run" / "pids.json").exists()       # nothing was started


def _children(pid: int) -> dict:
    """{pid: command line} of the processes whose parent is `pid` (read from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(entry)[1]) == pid:
                with open(f"/proc/{entry}/cmdline") as f:
                    found[int(entry)] = f.read().replace("\0", " ")
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_start_up_stop_is_prompt_and_unwritable_files_lose_nothing(tmp_path):
    """Start-up and disk full (docs/reliability.md). A stop request while the learner is starting
    is acted on at once: the learner is held stopped (SIGSTOP), so a launcher that waited for
    its port first would wait out the 300 s start-up timeout. pids.json and summary.json cannot
    be written (a directory stands in each path: the write fails with an OSError, as on a full
    disk): the launcher says so, goes on, stops every role and prints the summary instead."""
    run_dir = tmp_path / "run"
    (run_dir / "pids.json.tmp").mkdir(parents=True)
    (run_dir / "summary.json").mkdir()
    base = free_port_block(16)
    out_path = tmp_path / "local.out"
    launcher = _local(run_dir, base, out_path)
    roles, stopped = {}, None
    try:
        def learner_started():
            roles.update(_children(launcher.pid))
            return any(" learner" in cmd for cmd in roles.values())
        wait_for(lambda: learner_started() or launcher.poll() is not None, 300,
                 "the launcher to start the learner")
        assert launcher.poll() is None, out_path.read_text()[-3000:]
        stopped = next(p for p, cmd in roles.items() if " learner" in cmd)
        os.kill(stopped, signal.SIGSTOP)      # it cannot open its port now
        launcher.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        wait_for(lambda: "stop requested while learner was starting" in out_path.read_text(),
                 15, "the launcher to act on the stop during the learner's start-up")
        acted_s = time.monotonic() - t0
        os.kill(stopped, signal.SIGCONT)      # so it can take its SIGTERM
        rc = launcher.wait(timeout=120)
    finally:
        stop_process(launcher, timeout_s=30)
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
    out = out_path.read_text()
    assert rc == 0, out[-3000:]
    assert acted_s < 15
    assert not any(_alive(p) for p in roles), (roles, out[-2000:])
    assert f"could not write {run_dir}/pids.json" in out
    assert f"could not write {run_dir}/summary.json" in out
    summary = json.loads(out.split("the summary:\n", 1)[1].splitlines()[0])
    assert set(summary["exit_codes"]) >= {"replay", "learner"}, summary["exit_codes"]
    assert summary["exit_codes"]["replay"] == 0
