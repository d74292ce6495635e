"""Load: >= 32 simulated actors (threads, each with its own Reverb writer and its own params client,
as an actor process has) write segments and poll params against ONE replay server and ONE
ParameterService (TLS + token, new version every 0.5 s), each in its own process on 127.0.0.1,
for a bounded time.

Asserts: every write confirmed (the server counts exactly the segments the actors saw confirmed:
nothing lost, nothing duplicated), every params request answered, versions monotonic per actor.
Reports p50/p99 latencies and the aggregate insert throughput (printed and appended to
results/load.jsonl via scripts/record_reliability).

The replay table is sized so its rate limiter never holds inserts here (min size = capacity): this
measures what the servers take, not the learner's pace (the UTD under load with real actors joining
and leaving is in tests/test_faults_local.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from crl import config as C
from crl.segments import segment_spec
from helpers import REPO, free_port, record_result, port_open, stop_process, wait_for
from test_security import make_cert

NUM_ACTORS = 32
DURATION_S = 12.0
SEGMENTS_PER_WRITE = 8
MAX_WRITES = 220         # per actor: 32 x 220 x 8 = 56,320 segments < the 60,000-item table
T, STATE_DIM, ACTION_DIM = 50, 4, 2
POLL_EVERY_S = 0.25
PUBLISH_EVERY_S = 0.5
TOKEN = "load-token-" + "0" * 16
OVERRIDES = {"replay.segment_length": T, "replay.capacity_steps": 3_000_000,
             "replay.min_size_steps": 3_000_000, "learner.minibatches_per_call": 4,
             "replay.checkpoint_interval_s": 10_000}

PUBLISHER = textwrap.dedent("""
    import sys, time, jax, numpy as np
    from crl import config as C
    from crl.networks import CRLNetworks
    from params import ParameterServer
    port, cert, key, token, period, limit = sys.argv[1:7]
    cfg = C.load()
    nets = CRLNetworks(cfg.network, 4, 2, 2)
    actor, critic = jax.device_get(nets.init(jax.random.PRNGKey(0))[:2])
    server = ParameterServer(f"127.0.0.1:{port}", token=token, tls_cert=open(cert, "rb").read(),
                             tls_key=open(key, "rb").read()).start()
    v, end = 0, time.monotonic() + float(limit)
    while time.monotonic() < end:
        server.publish({"actor": jax.tree_util.tree_map(lambda x: x + v, actor),
                        "critic": critic}, v)
        v += 1
        time.sleep(float(period))
    server.stop(1.0)
""")


def percentiles(xs):
    a = np.asarray(xs, dtype=float) * 1000.0
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


@pytest.fixture
def servers(tmp_path):
    replay_port, params_port = free_port(), free_port()
    cert, key = make_cert(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", XLA_FLAGS="")
    ready = tmp_path / "replay.ready"
    cmd = [sys.executable, "-m", "replay.server", "--state-dim", str(STATE_DIM), "--action-dim",
           str(ACTION_DIM), "--port", str(replay_port), "--metrics-port", "0",
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--ready-file", str(ready)]
    for k, v in OVERRIDES.items():
        cmd += ["--set", f"{k}={v}"]
    logs = [open(tmp_path / "replay.log", "w"), open(tmp_path / "params.log", "w")]
    procs = []
    try:
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[0],
                                      stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(params_port), str(cert), str(key), TOKEN,
             str(PUBLISH_EVERY_S), "600"], cwd=REPO, env=env, stdout=logs[1],
            stderr=subprocess.STDOUT))
        wait_for(lambda: ready.exists() or procs[0].poll() is not None, 180, "replay to start")
        assert procs[0].poll() is None, (tmp_path / "replay.log").read_text()[-3000:]
        wait_for(lambda: port_open(params_port) or procs[1].poll() is not None, 120,
                 "the params server")
        assert procs[1].poll() is None, (tmp_path / "params.log").read_text()[-3000:]
        yield f"127.0.0.1:{replay_port}", f"127.0.0.1:{params_port}", cert
    finally:
        for p in procs:
            stop_process(p, signal.SIGTERM, timeout_s=30)
        for f in logs:
            f.close()


def test_32_actors_write_and_poll_nothing_lost(servers, tmp_path):
    run_load(servers, NUM_ACTORS, DURATION_S, MAX_WRITES, tmp_path)


@pytest.mark.slow
def test_64_actors_longer(servers, tmp_path):
    run_load(servers, 64, 40.0, 110, tmp_path)   # 64 x 110 x 8 = 56,320 segments < 60,000 items


def run_load(servers, num_actors, duration_s, max_writes, tmp_path):
    import jax
    import reverb
    from crl.networks import CRLNetworks
    from params import ParameterClient
    from replay import TABLE
    from replay.writer import SegmentWriter
    replay_addr, params_addr, cert = servers
    cfg = C.load(overrides=OVERRIDES)
    template = {"actor": jax.eval_shape(CRLNetworks(cfg.network, 4, 2, 2).init,
                                        jax.random.PRNGKey(0))[0]}
    spec = segment_spec(STATE_DIM, ACTION_DIM, T)
    ca = cert.read_bytes()
    start = threading.Barrier(num_actors + 1)
    results = [None] * num_actors

    def actor(i):
        rng = np.random.default_rng(i)
        segs = {k: np.zeros((SEGMENTS_PER_WRITE,) + s, d) for k, (s, d) in spec.items()}
        segs["state"] = rng.normal(size=segs["state"].shape).astype(np.float32)
        segs["episode_id"][:] = i
        r = {"confirmed": 0, "write_s": [], "poll_s": [], "fetch_s": [], "errors": [],
             "versions": []}
        writer = SegmentWriter(replay_addr, spec, 30.0)
        client = ParameterClient(params_addr, 10.0, template=template, token=TOKEN, tls_ca=ca)
        version, last_poll = -1, 0.0
        try:
            start.wait(60)
            end = time.monotonic() + duration_s
            while time.monotonic() < end and len(r["write_s"]) + len(r["errors"]) < max_writes:
                t0 = time.perf_counter()
                try:
                    r["confirmed"] += writer.write(segs)      # returns after a confirmed flush
                    r["write_s"].append(time.perf_counter() - t0)
                except Exception as e:
                    r["errors"].append(f"write: {type(e).__name__}: {e}")
                if time.monotonic() - last_poll >= POLL_EVERY_S:
                    last_poll = time.monotonic()
                    t0 = time.perf_counter()
                    try:
                        got = client.get(min_version=version, subset="actor")
                        dt = time.perf_counter() - t0
                        if got is None:
                            r["poll_s"].append(dt)
                        else:
                            r["fetch_s"].append(dt)
                            version = got[0]
                            r["versions"].append(version)
                    except Exception as e:
                        r["errors"].append(f"params: {type(e).__name__}: {e}")
        finally:
            writer.close()
            client.close()
            results[i] = r

    threads = [threading.Thread(target=actor, args=(i,), daemon=True) for i in range(num_actors)]
    for t in threads:
        t.start()
    start.wait(120)
    t0 = time.perf_counter()
    for t in threads:
        t.join(duration_s + 120)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "an actor thread hung"

    info = reverb.Client(replay_addr).server_info(30)[TABLE]
    confirmed = sum(r["confirmed"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    writes = [x for r in results for x in r["write_s"]]
    polls = [x for r in results for x in r["poll_s"]]
    fetches = [x for r in results for x in r["fetch_s"]]
    row = {
        "test": "load", "unix_s": time.time(), "actors": num_actors, "duration_s": round(wall, 2),
        "writes_capped": sum(len(r["write_s"]) >= max_writes for r in results),
        "segment": {"T": T, "state_dim": STATE_DIM, "action_dim": ACTION_DIM,
                    "per_write": SEGMENTS_PER_WRITE},
        "segments_confirmed": confirmed, "server_inserts": int(info.rate_limiter_info.insert_stats.completed),
        "insert_segments_per_s": round(confirmed / wall, 1),
        "insert_env_steps_per_s": round(confirmed * T / wall, 1),
        "write_latency": percentiles(writes),
        "params_not_modified_latency": percentiles(polls) if polls else None,
        "params_fetch_latency": percentiles(fetches) if fetches else None,
        "params_bytes_per_fetch": int(sum(np.prod(x.shape) * 4 for x in
                                          jax.tree_util.tree_leaves(template))),
        "errors": len(errors), "cpu_cores": os.cpu_count(),
    }
    print(json.dumps(row, indent=1))
    record_result("load", row, tmp_path)

    assert not errors, errors[:5]
    assert info.rate_limiter_info.insert_stats.completed == confirmed   # none lost, none doubled
    assert info.current_size == confirmed
    assert all(r["confirmed"] > 0 and r["versions"] for r in results)   # every actor served
    for r in results:
        assert r["versions"] == sorted(set(r["versions"]))               # never backwards
    assert len(polls) + len(fetches) >= num_actors * 5
