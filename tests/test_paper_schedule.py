"""The paper's schedule, shrunk for CI: `crl local` with actors refreshing their policy every
`actor.unroll_length` = 25 steps while the learner trains on 200-step windows (items overlapping by
175 steps, issue 11), and the update-to-data ratio held all run long.

Measured from replay's own counters (Reverb server_info: rate_limiter_info insert/sample stats,
polled every second while the run goes): one item brings U new env steps, one learner call
samples segments_per_call items for minibatches_per_call SGD steps, so over any window
    UTD = d(samples) x minibatches_per_call / segments_per_call / (d(inserts) x U).
Asserted: every window of WINDOW_S seconds after the prefill within +-10% of the target, the whole
run after the prefill within +-5%, and at the budget the learner's SGD steps equal
utd x (env steps - prefill) within one learner call (learner_final.json; summary.json holds the
same figures).
"""
import json
import subprocess
import sys
import threading
import time

import pytest

from helpers import free_port_block

U, T, E, ACTORS = 25, 200, 16, 2
SPC, MPC, UTD = 8, 4, 0.02            # samples_per_insert = 0.02 x 25 x 8 / 4 = 1
PREFILL = ACTORS * E * T              # the paper: one window per env
BUDGET = 400_000
WINDOW_S = 10.0


def replay_counters(address):
    import reverb
    from replay import TABLE
    try:
        rl = reverb.Client(address).server_info(2)[TABLE].rate_limiter_info
    except Exception:
        return None
    return int(rl.insert_stats.completed), int(rl.sample_stats.completed)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paper_schedule")
    base = free_port_block(8)
    address = f"127.0.0.1:{base}"
    cmd = [sys.executable, "-m", "app.cli", "local", "--actors", str(ACTORS),
           "--run.run_dir", str(run_dir), "--service.replay_address", address,
           "--service.params_address", f"127.0.0.1:{base + 1}",
           "--service.metrics_port", str(base + 2),
           "--env.name", "point_maze_u", "--env.num_envs", str(E),
           "--replay.segment_length", str(T), "--actor.unroll_length", str(U),
           "--replay.utd", str(UTD), "--replay.min_size_steps", str(PREFILL),
           "--replay.capacity_steps", "60000",
           "--learner.segments_per_call", str(SPC), "--learner.minibatches_per_call", str(MPC),
           "--algo.batch_size", "128", "--learner.num_devices", "1",
           "--network.actor.width", "32", "--network.critic.width", "32",
           "--learner.total_env_steps", str(BUDGET),
           "--eval.interval_s", "60", "--eval.num_envs", "8"]
    polls = []          # (t, inserts, samples)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        c = replay_counters(address)
        if c is not None:
            polls.append((time.monotonic(),) + c)
        time.sleep(1.0)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(5)
    print("".join(out)[-4000:])
    return proc.returncode, run_dir, polls


def utd_of(d_inserts, d_samples):
    return d_samples * MPC / SPC / (d_inserts * U)


def test_paper_schedule_runs_to_its_budget(paper_run):
    rc, run_dir, polls = paper_run
    assert rc == 0
    final = json.loads((run_dir / "learner_final.json").read_text())
    assert final["stopped_by"] == "budget" and final["env_steps"] >= BUDGET
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_final"] == final
    assert summary["metrics"]["learner"]["crl_learner_utd"] == final["utd"]
    for a in range(ACTORS):
        m = summary["metrics"][f"actor{a}"]
        # Every unroll of U steps is written once; the first ceil(T / U) - 1 make no item.
        assert m["crl_actor_env_steps_total"] % (E * U) == 0
        assert m["crl_actor_segments_written_total"] > 0


def test_utd_held_every_window_and_over_the_run(paper_run):
    rc, run_dir, polls = paper_run
    final = json.loads((run_dir / "learner_final.json").read_text())
    # At the budget: SGD steps = utd x (env steps - prefill) within one learner call.
    owed = UTD * (final["env_steps"] - PREFILL)
    assert abs(final["sgd_steps"] - owed) <= MPC, final
    assert abs(final["utd"] - UTD) <= 0.05 * UTD, final
    # Replay's counters, from the first insert after the learner's first samples (after the
    # prefill and the compile of its update, while the limiter holds inserts at the prefill +
    # B / spi and the sampler's pipeline holds its first batches) to the budget.
    first = next(p for p in polls if p[2] > 0)     # the sampler's pipeline filled at once
    live = [p for p in polls if p[1] > first[1] and p[1] * U < BUDGET]
    assert len(live) >= 10, polls
    ins0 = PREFILL / U
    run_utd = utd_of(live[-1][1] - ins0, live[-1][2])
    assert abs(run_utd - UTD) <= 0.05 * UTD, run_utd
    bad, windows, figures = [], 0, []
    for i, (t, ins, smp) in enumerate(live):
        later = [q for q in live[i:] if q[0] - t >= WINDOW_S]
        if not later:
            break
        t2, ins2, smp2 = later[0]
        windows += 1
        assert ins2 > ins, ("no inserts for a window while the learner trained", live)
        w = utd_of(ins2 - ins, smp2 - smp)
        figures.append(round(w / UTD, 3))
        if abs(w - UTD) > 0.10 * UTD:
            bad.append((round(t - live[0][0]), ins2 - ins, smp2 - smp, round(w, 5)))
    print(f"run UTD / target {run_utd / UTD:.4f}; {WINDOW_S:.0f}-s windows / target: {figures}")
    assert windows >= 1
    assert not bad, bad
