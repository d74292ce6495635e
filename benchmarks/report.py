"""Prints the figures of one benchmark run as tables (plain text or Markdown), with the targets.

    python -m benchmarks.report [--run latest | RUN_ID] [--file results/benchmarks.jsonl] [--markdown]
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Dict, List, Sequence, Tuple

from benchmarks import common

Col = Tuple[str, Callable[[Dict], object]]


def _f(name: str, digits: int = 2, scale: float = 1.0) -> Callable[[Dict], object]:
    def get(r):
        v = r["figures"].get(name)
        if v is None:
            v = (r["extra"].get("not_positive") or {}).get(name)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        v = v * scale
        return f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return get


def _c(name: str) -> Callable[[Dict], object]:
    return lambda r: r["config"].get(name, "–")


def _params_client(r: Dict) -> str:
    """The params clients' settings: wire dtype, and whether they share a host cache."""
    c = r["config"]
    return c.get("wire_dtype", "float32") + (" + host cache" if c.get("host_cache") else "")


def _table(rows: Sequence[Dict], cols: Sequence[Col], markdown: bool) -> str:
    cells = [[str(fn(r)) for _, fn in cols] for r in rows]
    heads = [h for h, _ in cols]
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    out = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


SECTIONS: Dict[str, Tuple[str, List[Col]]] = {
    "update_step": ("Update step (one SGD step: actor + temperature + critic)", [
        ("variant", _c("variant")), ("depth", _c("depth")), ("params", _f("params", 0)),
        ("compile s", _f("compile_s", 1)), ("compile CPU s", _f("compile_cpu_s", 1)),
        ("step s", _f("step_s", 3)), ("step CPU s", _f("step_cpu_s", 2)),
        ("SGD steps/s", _f("sgd_steps_per_s", 2)),
        ("samples/s", _f("samples_per_s", 0)), ("GFLOP/s", _f("gflops_per_s", 1)),
        ("XLA peak MiB", _f("xla_peak_mb", 0)), ("peak RSS MiB", _f("peak_rss_mb", 0))]),
    "update_step_scaling": ("Depth scaling (least squares over the depths above; CPU = process "
                            "CPU time, which other processes' load does not inflate)", [
        ("variant", _c("variant")), ("depths", lambda r: "/".join(map(str, r["config"]["depths"]))),
        ("slope ms/layer", _f("slope_ms_per_layer", 1)),
        ("slope CPU ms/layer", _f("slope_cpu_ms_per_layer", 1)),
        ("linearity", _f("linearity", 2)), ("linearity CPU", _f("linearity_cpu", 2)),
        ("compile ratio deepest/4", _f("compile_ratio", 2)),
        ("compile CPU-time ratio", _f("compile_cpu_ratio", 2)),
        ("RSS MiB/layer", _f("rss_mb_per_layer", 1))]),
    "learner_pipeline": ("Learner pipeline (Reverb over gRPC vs arrays on the device)", [
        ("case", lambda r: r["case"]), ("MB/call", _c("mb_per_call")),
        ("device SGD/s", _f("device_sgd_steps_per_s", 2)),
        ("pipeline SGD/s", _f("pipeline_sgd_steps_per_s", 2)),
        ("ratio (≥0.9)", _f("ratio_pipeline_device", 2)),
        ("role-loop SGD/s", _f("role_sgd_steps_per_s", 2)),
        ("ratio role loop", _f("ratio_role_device", 2)),
        ("sampler MB/s", _f("sample_only_mb_per_s", 0)), ("needed MB/s", _f("required_mb_per_s", 1)),
        ("one publish s", _f("publish_s", 3))]),
    "actor": ("Actor (role loop writing to Reverb + params refresh vs bare jitted unroll)", [
        ("env", lambda r: r["case"]), ("envs x T", lambda r: f"{r['config']['num_envs']}x{r['config']['segment_length']}"),
        ("bare steps/s", _f("bare_env_steps_per_s", 0)), ("actor steps/s", _f("actor_env_steps_per_s", 0)),
        ("ratio (≥0.9)", _f("ratio_actor_bare", 2)),
        ("wait for unroll s", _f("unroll_wait_s", 3)),
        ("loop share waiting", _f("unroll_wait_share", 2)),
        ("write s", _f("write_s", 3)), ("write MB/s", _f("write_mb_per_s", 1))]),
    "replay": ("Replay server throughput", [
        ("case", lambda r: r["case"]), ("segment MB", _c("segment_mb")),
        ("insert env steps/s", _f("insert_env_steps_per_s", 0)), ("insert MB/s", _f("insert_mb_per_s", 1)),
        ("sample env steps/s", _f("sample_env_steps_per_s", 0)), ("sample MB/s", _f("sample_mb_per_s", 1))]),
    "params": ("Params: publish -> actors (gRPC loopback)", [
        ("params", _c("params")), ("MB", _c("payload_mb")), ("clients", _c("clients")),
        ("client", _params_client),
        ("publish s", _f("publish_s", 3)), ("latency s", _f("latency_s", 3)),
        ("max fetch s", _f("max_fetch_s", 3)), ("MB/s total", _f("mb_per_s", 0)),
        ("device_put s", _f("device_put_s", 3))]),
    "end_to_end": ("End to end: crl local vs in-process driver, same config and UTD", [
        ("case", lambda r: r["case"]),
        ("local env/s", _f("local_env_steps_per_s", 0)), ("local SGD/s", _f("local_sgd_steps_per_s", 1)),
        ("driver env/s", _f("driver_env_steps_per_s", 0)), ("driver SGD/s", _f("driver_sgd_steps_per_s", 1)),
        ("ratio env (≥0.9)", _f("ratio_env_steps", 2)), ("ratio SGD (≥0.9)", _f("ratio_sgd_steps", 2)),
        ("local start-up s", _f("local_startup_s", 0))]),
}


def scaling_rows(rows: Sequence[Dict]) -> List[Dict]:
    """Per-variant depth-scaling rows recomputed from the per-depth lines of the run."""
    from benchmarks.update_step import scaling_figures
    per = [r for r in rows if r["benchmark"] == "update_step" and "depth=" in r["case"]]
    out = []
    for variant in dict.fromkeys(r["config"]["variant"] for r in per):
        vr = sorted((r for r in per if r["config"]["variant"] == variant),
                    key=lambda r: r["config"]["depth"])
        if len(vr) < 2 or not all("step_cpu_s" in r["figures"] and "compile_cpu_s" in r["figures"]
                                  for r in vr):
            continue
        out.append({"config": {"variant": variant, "depths": [r["config"]["depth"] for r in vr]},
                    "figures": scaling_figures([{**r["figures"], "depth": r["config"]["depth"]}
                                                for r in vr]), "extra": {}, "case": f"{variant} scaling"})
    return out


def targets(rows: Sequence[Dict]) -> List[Tuple[str, str, str]]:
    """[(target, measured, met/MISSED)] of the issue's targets found in rows."""
    out = []
    for r in scaling_rows(rows):
        f, d = r["figures"], r["config"]["depths"]
        v = r["config"]["variant"]
        out.append((f"compile time depth {d[-1]} / depth {d[0]} ≤ 1.5 ({v}; wall / CPU time)",
                    f"{f['compile_ratio']:.2f} / {f['compile_cpu_ratio']:.2f}",
                    f"{_met(f['compile_ratio'] <= 1.5)} / {_met(f['compile_cpu_ratio'] <= 1.5)}"))
        if v == "fp32":
            ok = lambda x: 0.8 <= x <= 1.25   # noqa: E731
            out.append((f"update time linear in depth ({v}; per-layer time at {d[-1]} / at {d[-2]}, "
                        "wall / CPU time)", f"{f['linearity']:.2f} / {f['linearity_cpu']:.2f}",
                        f"{_met(ok(f['linearity']))} / {_met(ok(f['linearity_cpu']))}"))
    for r in rows:
        f, b = r["figures"], r["benchmark"]
        if b == "update_step" and "side by side" in r["case"] and "compile_ratio_side_by_side" in f:
            d = r["config"]["depths"]
            out.insert(0, (f"compile time depth {d[1]} / depth {d[0]} ≤ 1.5 ({r['config']['variant']}, "
                           "side by side in one process; wall / CPU time)",
                           f"{f['compile_ratio_side_by_side']:.2f} / "
                           f"{f.get('compile_cpu_ratio_side_by_side', float('nan')):.2f}",
                           f"{_met(f['compile_ratio_side_by_side'] <= 1.5)} / "
                           f"{_met(f.get('compile_cpu_ratio_side_by_side', 9) <= 1.5)}"))
        elif b == "learner_pipeline" and "ratio_pipeline_device" in f:
            out.append((f"learner fed by Reverb / fed on device ≥ 0.9 ({r['case']})",
                        f"{f['ratio_pipeline_device']:.2f}", _met(f["ratio_pipeline_device"] >= 0.9)))
        elif b == "actor" and "ratio_actor_bare" in f:
            # A loop that still waits for the unroll after writing has hidden the write entirely.
            hidden = f.get("unroll_wait_share", 0) > 0.05
            out.append((f"actor role / bare unroll ≥ 0.9 ({r['case']}; bracketed ratio; write "
                        "hidden behind the next unroll?)",
                        f"{f['ratio_actor_bare']:.2f}; {'yes' if hidden else 'no'}",
                        _met(f["ratio_actor_bare"] >= 0.9)))
        elif b == "params" and r["config"]["clients"] >= 16 and r["config"]["params"] > 50e6:
            out.append((f"{r['config']['params'] / 1e6:.0f}M params reach {r['config']['clients']} "
                        f"actors on loopback < 2 s ({_params_client(r)})", f"{f.get('latency_s', float('nan')):.2f} s",
                        _met(f.get("latency_s", 99) < 2.0)))
        elif b == "end_to_end" and "ratio_env_steps" in f:
            ratio = min(f["ratio_env_steps"], f.get("ratio_sgd_steps", 0))
            out.append((f"crl local / driver ≥ 0.9 ({r['case']})",
                        f"env {f['ratio_env_steps']:.2f}, SGD {f.get('ratio_sgd_steps', float('nan')):.2f}",
                        _met(ratio >= 0.9)))
    return out


def render(rows: Sequence[Dict], markdown: bool = False) -> str:
    if not rows:
        return "(no results)"
    parts = []
    m, v = rows[0]["machine"], rows[0]["versions"]
    devs = next((r["machine"]["devices"] for r in rows if "devices" in r["machine"]), "?")
    loads = [r["machine"].get("load_avg_1m", float("nan")) for r in rows]
    parts.append(f"run {rows[0]['run_id']}{' (QUICK: not meaningful)' if rows[0]['quick'] else ''}"
                 f" on {m['host']}: {m['cpu']}, {m['cpus_usable']} CPUs, {m['mem_gib']} GiB, "
                 f"devices {devs}; 1-min load average {min(loads):.1f}–{max(loads):.1f} over the "
                 f"run's result lines; git {rows[0]['git']}; jax {v['jax']}, dm-reverb "
                 f"{v['dm-reverb']}, tensorflow {v['tensorflow']}, grpcio {v['grpcio']}, "
                 f"python {v['python']}")
    for key, (title, cols) in SECTIONS.items():
        if key == "update_step":
            sel = [r for r in rows if r["benchmark"] == "update_step" and "depth=" in r["case"]]
        elif key == "update_step_scaling":
            sel = scaling_rows(rows)
        else:
            sel = [r for r in rows if r["benchmark"] == key]
        if not sel:
            continue
        parts.append(("### " if markdown else "== ") + title + ("" if markdown else " =="))
        if key == "replay":
            mem = [r for r in sel if r["case"] == "memory"]
            sel = [r for r in sel if r["case"] != "memory"]
        parts.append(_table(sel, cols, markdown))
        if key == "replay":
            for r in mem:
                f = r["figures"]
                parts.append(
                    f"Replay memory: {f.get('rss_mb', float('nan')):,.0f} MiB RSS holding "
                    f"{r['config']['items']:,} segments ({r['config']['items'] * r['config']['segment_length']:,} "
                    f"env steps), {f.get('bytes_per_env_step', float('nan')):,.0f} bytes per stored env "
                    f"step = {f.get('overhead_ratio', float('nan')):.2f}x the raw payload; empty server "
                    f"{f.get('rss_empty_mb', float('nan')):,.0f} MiB.")
        if key == "end_to_end":
            for r in sel:
                e = r["extra"]
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(e.get("cpu_cores_by_role", {}).items()))
                parts.append(
                    f"Where the time goes in crl local ({r['case']}): learner waiting for samples "
                    f"{100 * e.get('learner_wait_frac', 0):.0f}%, computing "
                    f"{100 * e.get('learner_compute_frac', 0):.0f}%"
                    + (f", publishing {100 * e['learner_publish_frac']:.0f}%"
                       if "learner_publish_frac" in e else "")
                    + f" of wall time; actors unrolling "
                    f"{100 * e.get('actor_unroll_frac', 0):.0f}% and writing (incl. rate-limiter "
                    f"waits) {100 * e.get('actor_write_frac', 0):.0f}%; replay table: inserts held "
                    f"{100 * e.get('replay_insert_wait_frac', 0):.0f}%, samples held "
                    f"{100 * e.get('replay_sample_wait_frac', 0):.0f}% of the time; CPU cores by "
                    f"role: {cpu}; measured UTD {e.get('utd', float('nan')):.4f}.")
    t = targets(rows)
    if t:
        parts.append(("### " if markdown else "== ") + "Targets" + ("" if markdown else " =="))
        parts.append(_table([{"t": x} for x in t], [("target", lambda r: r["t"][0]),
                                                     ("measured", lambda r: r["t"][1]),
                                                     ("", lambda r: r["t"][2])], markdown))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="latest", help="run id, or 'latest' (default)")
    p.add_argument("--file", default=common.DEFAULT_OUT)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    print(render(common.load_results(a.file, a.run), markdown=a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
