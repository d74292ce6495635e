"""Child processes of the benchmarks (each one process, driven over stdin/stdout JSON lines).

    python -m benchmarks._children params_server --depth D [--width W] [--dims humanoid] [--period S]
    python -m benchmarks._children params_client --address A --depth D [--poll 0.05]
    python -m benchmarks._children replay_writer --address A --S 29 --A 8 --T 1000 [--num-envs 64]
    python -m benchmarks._children replay_sampler --address A --S 29 --A 8 --T 1000 [--batch 32]

Every child prints {"ready": ...} once set up. params_server publishes on {"publish": v} (or
every --period seconds); params_client prints {"got": version, "t": unix time, "fetch_s": s}
for each new version; replay_writer / replay_sampler work for {"run": seconds} and answer with
their counts. They stop on {"stop": true}, at EOF of stdin, or by SIGTERM from the parent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def emit(**msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def commands():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        if msg.get("stop"):
            return
        yield msg


def watch_stdin(stop: threading.Event) -> None:
    """Sets `stop` at {"stop": true} or EOF of stdin (a daemon thread)."""
    def run():
        for _ in commands():
            pass
        stop.set()
    threading.Thread(target=run, name="stdin", daemon=True).start()


def actor_template(depth: int, width: int, dims: str):
    """{"actor": ShapeDtypeStructs} of the actor network an actor role would expect."""
    import jax
    from benchmarks.update_step import ENV_DIMS
    from crl import config as C
    from crl.networks import CRLNetworks
    S, A, goal_idx = ENV_DIMS[dims]
    cfg = C.NetworksConfig(actor=C.NetworkConfig(depth=depth, width=width),
                           critic=C.NetworkConfig(depth=4, width=8))
    nets = CRLNetworks(cfg, S, A, len(goal_idx))
    return {"actor": jax.eval_shape(nets.init, jax.random.PRNGKey(0))[0]}


def random_tree(template, seed: int = 0):
    import jax
    import numpy as np
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape, dtype=np.float32), template)


def params_server(a) -> int:
    import jax
    import numpy as np
    from params import ParameterServer
    from crl.learning import PROGRESS_KEY, progress_of
    template = actor_template(a.depth, a.width, a.dims)
    # As the learner publishes: the actor params and their progress (what actors follow).
    tree = {**random_tree(template), PROGRESS_KEY: progress_of(0, 0)}
    server = ParameterServer("127.0.0.1:0", max_message_mb=a.max_message_mb).start()
    server.publish(tree, 0)
    nbytes = server._current().total_bytes
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree["actor"])))
    emit(ready=server.port, bytes=nbytes, params=n_params)
    version = 0
    if a.period > 0:
        stop = threading.Event()
        watch_stdin(stop)
        while not stop.wait(a.period):
            version += 1
            tree["actor"] = jax.tree_util.tree_map(lambda x: x + np.float32(1e-3), tree["actor"])
            server.publish(tree, version)
    else:
        for msg in commands():
            version = int(msg["publish"])
            tree["actor"]["mean"]["bias"] = tree["actor"]["mean"]["bias"] + 1.0   # new content
            t0 = time.time()
            p0 = time.perf_counter()
            server.publish(tree, version)
            emit(published=version, t0=t0, publish_s=time.perf_counter() - p0)
    server.stop(None)
    return 0


def params_client(a) -> int:
    from params import ParameterClient
    template = actor_template(a.depth, a.width, getattr(a, "dims", "humanoid"))
    client = ParameterClient(a.address, timeout_s=120.0, template=template,
                             max_message_mb=a.max_message_mb,
                             wire_dtype=getattr(a, "wire_dtype", "float32"),
                             host_cache=getattr(a, "host_cache", "") or None)
    stop = threading.Event()
    watch_stdin(stop)
    version = -1
    emit(ready=True)
    while not stop.is_set():
        t0 = time.perf_counter()
        got = client.get(min_version=version, subset="actor")
        if got is None:
            stop.wait(a.poll)
            continue
        fetch_s = time.perf_counter() - t0
        t_got = time.time()
        version = got[0]
        extra = {}
        if a.device_put:   # what PolicyFollower does next
            import jax
            t1 = time.perf_counter()
            jax.block_until_ready(jax.device_put(got[1]["actor"]))
            extra["device_put_s"] = time.perf_counter() - t1
        emit(got=version, t=t_got, fetch_s=fetch_s, **extra)
        del got
    client.close()
    return 0


def replay_writer(a) -> int:
    from benchmarks import common
    from crl.segments import segment_spec
    from replay.writer import SegmentWriter
    data = common.synthetic_segments(a.num_envs, a.T, a.S, a.A, episode_length=a.T, seed=os.getpid())
    writer = SegmentWriter(a.address, segment_spec(a.S, a.A, a.T), timeout_s=60.0)
    writer.write(data)   # connect + warm up
    emit(ready=True)
    for msg in commands():
        n, t0 = 0, time.perf_counter()
        end = t0 + float(msg["run"])
        while time.perf_counter() < end:
            n += writer.write(data)
        emit(segments=n, seconds=time.perf_counter() - t0)
    writer.close()
    return 0


def replay_sampler(a) -> int:
    from replay.sampler import SegmentSampler
    sampler = None
    emit(ready=True)
    for msg in commands():
        if sampler is None:
            sampler = SegmentSampler(a.address, a.batch, timeout_s=60.0, prefetch=2)
            sampler.sample()
        n, t0 = 0, time.perf_counter()
        end = t0 + float(msg["run"])
        while time.perf_counter() < end:
            sampler.sample()
            n += 1
        emit(batches=n, seconds=time.perf_counter() - t0)
    if sampler is not None:
        sampler.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["params_server", "params_client", "replay_writer",
                                    "replay_sampler"])
    p.add_argument("--address")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--dims", default="humanoid")
    p.add_argument("--period", type=float, default=0.0)
    p.add_argument("--poll", type=float, default=0.05)
    p.add_argument("--device-put", action="store_true")
    p.add_argument("--max-message-mb", type=int, default=4)
    p.add_argument("--S", type=int, default=29)
    p.add_argument("--A", type=int, default=8)
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args(argv)
    return {"params_server": params_server, "params_client": params_client,
            "replay_writer": replay_writer, "replay_sampler": replay_sampler}[a.role](a)


if __name__ == "__main__":
    sys.exit(main())
