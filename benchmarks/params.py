"""Benchmark: publish-to-actor latency and MB/s of the ParameterService for networks of about
1M, 10M and 70M parameters, to 1 and 16 concurrent actor processes on loopback.

    python -m benchmarks.params [--sizes 1 10 70] [--clients 1 16] [--repeats 3] [--quick]
                                [--wire-dtype float32|bfloat16] [--host-cache]

The network is the actor of width 256 (humanoid dims) at the depth that gives the size: about
1M = depth 16, 10M = depth 148, 70M = depth 1056 (what one 1024-layer critic encoder holds).
A ParameterServer process (the learner side) publishes on command; each client is its own
process running `ParameterClient.get(min_version=v, subset="actor")` with the actor's template
(signature check, sha256 check, unflatten), polling every --poll seconds as an actor's refresh
thread does (actors poll every actor.param_refresh_s = 1 s; here 0.05 s so the poll adds little).
Latency = from the start of `publish()` (serialise + sha256 of the new version) to the last
client holding the verified params; MB/s = clients x payload / latency. Target: the 70M network
reaches 16 clients in < 2 s.

Variants (service.params_wire_dtype and service.params_host_cache): --wire-dtype bfloat16 sends
float32 leaves as bfloat16 (half the bytes; MB/s counts the bytes on the wire); --host-cache makes
the clients share a private cache directory (under /dev/shm when it exists), so that one of them
fetches each version over gRPC and the others read it from there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from benchmarks import common

WIDTH = 256
PER_LAYER = WIDTH * WIDTH + WIDTH + 2 * WIDTH      # Dense kernel + bias + LayerNorm scale/bias


def depth_for(million: float) -> int:
    return max(4, int(round(million * 1e6 / PER_LAYER / 4)) * 4)


def client_child(argv) -> int:
    """One actor-like client process (benchmarks._children.params_client with the variants)."""
    from benchmarks._children import params_client
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--poll", type=float, default=0.05)
    p.add_argument("--max-message-mb", type=int, default=4)
    p.add_argument("--wire-dtype", default="float32")
    p.add_argument("--host-cache", default="")
    p.add_argument("--device-put", action="store_true")
    return params_client(p.parse_args(argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_client"]:
        return client_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=None, help="millions of params")
    p.add_argument("--clients", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--poll", type=float, default=0.05)
    p.add_argument("--max-message-mb", type=int, default=4)
    p.add_argument("--wire-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="service.params_wire_dtype of the clients")
    p.add_argument("--host-cache", action="store_true",
                   help="clients share a host cache directory (service.params_host_cache)")
    common.add_common_args(p)
    a = p.parse_args(argv)
    q = a.quick
    sizes = a.sizes or ([1] if q else [1, 10, 70])
    clients_list = a.clients or ([1, 2] if q else [1, 16])
    repeats = a.repeats or (2 if q else 3)
    variant = ("" if a.wire_dtype == "float32" else f" {a.wire_dtype}") + \
        (" host-cache" if a.host_cache else "")
    common.header("params: publish -> actor latency over gRPC loopback" + variant)
    work = common.workdir("params")
    wire_factor = 0.5 if a.wire_dtype == "bfloat16" else 1.0   # float32 leaves: all but a few
    print(f"{'params':>11} {'MB':>7} {'clients':>7} {'publish s':>9} {'latency s':>9} "
          f"{'max fetch s':>11} {'MB/s':>8}", flush=True)
    for size in sizes:
        depth = depth_for(size)
        server = common.spawn(["-m", "benchmarks._children", "params_server", "--depth", depth,
                               "--width", WIDTH, "--max-message-mb", a.max_message_mb],
                              f"{work}/server.log", pipes=True)
        try:
            info = common.read_json_line(server, 600, "params server")
            mb = info["bytes"] / common.MiB
            version = 0
            for k in clients_list:
                need_gib = k * (mb / 1024 * 1.2 + 0.35) + 1.0
                if common.mem_available_gib() < need_gib:
                    print(f"{info['params']:>11,} {mb:>7.1f} {k:>7}  skipped: needs ~{need_gib:.0f} "
                          f"GiB free, {common.mem_available_gib():.0f} available", flush=True)
                    continue
                cache_dir = ""
                if a.host_cache:
                    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
                    cache_dir = tempfile.mkdtemp(prefix="crl-bench-params-cache-", dir=shm)
                clients = [common.spawn(["-m", "benchmarks.params", "_client",
                                         "--address", f"127.0.0.1:{info['ready']}",
                                         "--depth", depth, "--width", WIDTH, "--poll", a.poll,
                                         "--max-message-mb", a.max_message_mb,
                                         "--wire-dtype", a.wire_dtype, "--host-cache", cache_dir]
                                        + (["--device-put"] if k == 1 else []),
                                        f"{work}/client{i}.log", pipes=True) for i in range(k)]
                try:
                    for c in clients:
                        common.read_json_line(c, 600, "params client start")
                        common.read_json_line(c, 600, "params client first version")
                    lat, pub, fetch, dput = [], [], [], []
                    for _ in range(repeats):
                        version += 1
                        common.send(server, publish=version)
                        got = [common.read_json_line(c, 600, "params client") for c in clients]
                        done = common.read_json_line(server, 600, "params server publish")
                        assert all(g["got"] == version for g in got), got
                        lat.append(max(g["t"] for g in got) - done["t0"])
                        pub.append(done["publish_s"])
                        fetch.append(max(g["fetch_s"] for g in got))
                        dput += [g["device_put_s"] for g in got if "device_put_s" in g]
                    med = statistics.median
                    wire_mb = mb * wire_factor
                    figures = {"latency_s": med(lat), "mb_per_s": k * wire_mb / med(lat),
                               "publish_s": med(pub), "max_fetch_s": med(fetch),
                               "fetch_mb_per_s_per_client": wire_mb / med(fetch)}
                    if dput:
                        figures["device_put_s"] = med(dput)
                    print(f"{info['params']:>11,} {mb:>7.1f} {k:>7} {med(pub):>9.3f} {med(lat):>9.3f} "
                          f"{med(fetch):>11.3f} {k * wire_mb / med(lat):>8.0f}", flush=True)
                    extra = {"latencies_s": lat, "params_million": round(info["params"] / 1e6, 2),
                             "load_avg_1m": round(os.getloadavg()[0], 2)}
                    if k >= 16 and size >= 70:
                        extra.update(target_latency_s=2.0, target_met=med(lat) < 2.0)
                        print(f"  70M to {k} clients: {med(lat):.2f} s (target < 2 s: "
                              f"{'met' if med(lat) < 2.0 else 'MISSED'})", flush=True)
                    common.record("params", f"{size:g}M x{k}{variant}",
                                  {"params": info["params"], "depth": depth, "width": WIDTH,
                                   "payload_mb": round(mb, 2), "clients": k, "poll_s": a.poll,
                                   "max_message_mb": a.max_message_mb, "repeats": repeats,
                                   "wire_dtype": a.wire_dtype, "host_cache": a.host_cache},
                                  figures, out=a.out, quick=q, extra=extra)
                finally:
                    for c in clients:
                        try:
                            common.send(c, stop=True)
                        except OSError:
                            pass
                    for c in clients:
                        common.stop_process(c, timeout_s=10)
                    if cache_dir:
                        shutil.rmtree(cache_dir, ignore_errors=True)
        finally:
            try:
                common.send(server, stop=True)
            except OSError:
                pass
            common.stop_process(server, timeout_s=10)
    common.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
