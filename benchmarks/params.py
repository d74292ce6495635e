"""Benchmark: publish-to-actor latency and MB/s of the ParameterService for networks of about
1M, 10M and 70M parameters, to 1 and 16 concurrent actor processes on loopback.

    python -m benchmarks.params [--sizes 1 10 70] [--clients 1 16] [--repeats 3] [--quick]

The network is the actor of width 256 (humanoid dims) at the depth that gives the size: about
1M = depth 16, 10M = depth 148, 70M = depth 1056 (what one 1024-layer critic encoder holds).
A ParameterServer process (the learner side) publishes on command; each client is its own
process running `ParameterClient.get(min_version=v, subset="actor")` with the actor's template
(signature check, sha256 check, unflatten), polling every --poll seconds as an actor's refresh
thread does (actors poll every actor.param_refresh_s = 1 s; here 0.05 s so the poll adds little).
Latency = from the start of `publish()` (serialise + sha256 of the new version) to the last
client holding the verified params; MB/s = clients x payload / latency. Target: the 70M network
reaches 16 clients in < 2 s.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks import common

WIDTH = 256
PER_LAYER = WIDTH * WIDTH + WIDTH + 2 * WIDTH      # Dense kernel + bias + LayerNorm scale/bias


def depth_for(million: float) -> int:
    return max(4, int(round(million * 1e6 / PER_LAYER / 4)) * 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=None, help="millions of params")
    p.add_argument("--clients", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--poll", type=float, default=0.05)
    p.add_argument("--max-message-mb", type=int, default=4)
    common.add_common_args(p)
    a = p.parse_args(argv)
    q = a.quick
    sizes = a.sizes or ([1] if q else [1, 10, 70])
    clients_list = a.clients or ([1, 2] if q else [1, 16])
    repeats = a.repeats or (2 if q else 3)
    common.header("params: publish -> actor latency over gRPC loopback")
    work = common.workdir("params")
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
                clients = [common.spawn(["-m", "benchmarks._children", "params_client",
                                         "--address", f"127.0.0.1:{info['ready']}",
                                         "--depth", depth, "--width", WIDTH, "--poll", a.poll,
                                         "--max-message-mb", a.max_message_mb]
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
                    figures = {"latency_s": med(lat), "mb_per_s": k * mb / med(lat),
                               "publish_s": med(pub), "max_fetch_s": med(fetch),
                               "fetch_mb_per_s_per_client": mb / med(fetch)}
                    if dput:
                        figures["device_put_s"] = med(dput)
                    print(f"{info['params']:>11,} {mb:>7.1f} {k:>7} {med(pub):>9.3f} {med(lat):>9.3f} "
                          f"{med(fetch):>11.3f} {k * mb / med(lat):>8.0f}", flush=True)
                    extra = {"latencies_s": lat, "params_million": round(info["params"] / 1e6, 2)}
                    if k >= 16 and size >= 70:
                        extra.update(target_latency_s=2.0, target_met=med(lat) < 2.0)
                        print(f"  70M to {k} clients: {med(lat):.2f} s (target < 2 s: "
                              f"{'met' if med(lat) < 2.0 else 'MISSED'})", flush=True)
                    common.record("params", f"{size:g}M x{k}",
                                  {"params": info["params"], "depth": depth, "width": WIDTH,
                                   "payload_mb": round(mb, 2), "clients": k, "poll_s": a.poll,
                                   "max_message_mb": a.max_message_mb, "repeats": repeats},
                                  figures, out=a.out, quick=q, extra=extra)
                finally:
                    for c in clients:
                        try:
                            common.send(c, stop=True)
                        except OSError:
                            pass
                    for c in clients:
                        common.stop_process(c, timeout_s=10)
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
