"""Live: the real roles of two `crl local` runs (replay, learner, evaluator, an actor each:
separate processes on 127.0.0.1) scraped by ONE real Prometheus running k8s/'s scrape jobs (static
targets instead of DNS discovery, each with its run's namespace and crl_run labels, as the jobs set
them) and rules. For each run, every Grafana panel query (the run selector set to it; the DCGM GPU
panels need the exporter and are left out) returns data, and another run's name returns nothing;
every recording rule keeps the two runs apart; every alert expression evaluates, and what each
alert compares returns data (an alert that does not fire returns nothing, so its operands are
checked). Run A's ParameterService runs with TLS and a token, as in the k8s overlays; the pods'
probes, pointed at its local ports, succeed against its running roles (the learner's over TLS);
`crl cluster status` reads run A's metrics, and only run A's, from this Prometheus."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "test_tools"))
import k8s_testlib as T  # noqa: E402

from helpers import free_port_block  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROLE_OFFSETS = {"replay": 0, "learner": 1, "evaluator": 2, "actor": 3}   # app/launcher.py


# Two runs in one Prometheus, as two runs share a cluster's: run A (namespace crl, run crl; TLS and
# a token on its ParameterService, as in the k8s overlays) and run B (namespace crl-b, run b).
RUNS = {"a": ("crl", "crl"), "b": ("crl-b", "b")}     # name: (namespace, crl_run)


def _start_local(d: Path, name: str, tls: bool):
    """One `crl local` (1 actor, tiny networks) in d/name; returns (process, its ports, log)."""
    base = free_port_block(8)
    metrics = base + 2
    ports = {"replay_grpc": base, "params": base + 1,
             **{role: metrics + k for role, k in ROLE_OFFSETS.items()}}
    run = d / name
    run.mkdir()
    security = []
    if tls:
        # A certificate as `crl cluster create-secrets` makes it (naming `params`, which the roles
        # check while dialing 127.0.0.1), so the learner's probe runs over TLS as in the pod.
        from app.cluster import certificate_names, self_signed_certificate
        cert, key = self_signed_certificate(certificate_names("crl"), days=1)
        sec = run / "secrets"
        sec.mkdir()
        (sec / "tls.crt").write_bytes(cert)
        (sec / "ca.crt").write_bytes(cert)
        (sec / "tls.key").write_bytes(key)
        (sec / "token").write_text(__import__("secrets").token_urlsafe(32) + "\n")
        security = ["--service.tls_cert", str(sec / "tls.crt"),
                    "--service.tls_key", str(sec / "tls.key"),
                    "--service.tls_ca", str(sec / "ca.crt"), "--service.tls_server_name", "params",
                    "--service.token_file", str(sec / "token"), "--service.require_token", "true"]
    cmd = [sys.executable, "-m", "app.cli", "local", "--actors", "1",
           "--run.run_dir", str(run / "run"), *security,
           "--service.replay_address", f"127.0.0.1:{base}",
           "--service.params_address", f"127.0.0.1:{base + 1}",
           "--service.metrics_port", str(metrics),
           "--env.name", "point_maze_u", "--env.num_envs", "16",
           "--network.actor.width", "32", "--network.critic.width", "32",
           "--network.repr_dim", "16", "--algo.batch_size", "64",
           "--learner.segments_per_call", "4", "--learner.minibatches_per_call", "2",
           "--learner.num_devices", "1", "--learner.checkpoint_every", "100",
           "--learner.total_env_steps", "1000000000",
           "--replay.min_size_steps", "800", "--replay.capacity_steps", "20000",
           "--replay.checkpoint_interval_s", "15",
           "--eval.num_envs", "8", "--eval.interval_s", "2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    log = open(run / "local.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    return proc, ports, log


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("live")
    runs = {name: _start_local(d, name, tls=name == "a") for name in RUNS}
    # Prometheus with the cluster's scrape jobs, pointed at both runs' local ports, scraping every
    # second; each target carries its run's namespace and crl_run, as the jobs' relabelling sets
    # them in a run's namespace.
    k8s_cfg = yaml.safe_load((T.MONITORING / "prometheus.yml").read_text())
    prom_port = T.free_port()
    cfg = copy.deepcopy(k8s_cfg)
    cfg["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(T.MONITORING / "crl-rules.yml")]
    for job in cfg["scrape_configs"]:
        role = job["job_name"].removeprefix("crl-")
        job.pop("dns_sd_configs", None)
        if role not in ROLE_OFFSETS:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
            continue
        assert {r.get("target_label") for r in job["relabel_configs"]} >= {"namespace", "crl_run"}
        job["relabel_configs"] = [r for r in job["relabel_configs"]
                                  if r.get("target_label") not in ("namespace", "crl_run")]
        job["static_configs"] = [
            {"targets": [f"127.0.0.1:{ports[role]}"], "labels": {"namespace": ns, "crl_run": run}}
            for (_, ports, _), (ns, run) in ((runs[n], RUNS[n]) for n in RUNS)]
    prom = T.Prometheus(d / "prometheus")
    try:
        prom.start(cfg, port=prom_port)

        have = {}

        def ready():
            for name, (proc, _, _) in runs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"crl local of run {name} exited with {proc.returncode}:"
                                         f"\n" + (d / name / "local.log").read_text()[-3000:])
            # Every run has trained, evaluated and checkpointed: one series per run.
            for q in ("crl_learner_critic_loss", "crl_eval_evaluations_total > 0",
                      "crl:utd:rate5m", "crl:actor_env_steps:rate1m > 0",
                      "crl_actor_params_version > 0", "crl_replay_checkpoints_total > 0"):
                have[q] = len(prom.query(f"count by (namespace, crl_run) ({q})")) == len(RUNS)
            return all(have.values())
        try:
            T.wait_for(ready, 600, "both runs to train, evaluate and checkpoint under Prometheus",
                       interval_s=2)
        except AssertionError as e:
            logs = "\n".join(f"--- {p.relative_to(d)}:\n{p.read_text(errors='replace')[-1500:]}"
                             for p in sorted(d.glob("*/run/logs/*.log")))
            targets = prom.api("targets")["activeTargets"]
            raise AssertionError(
                f"{e}\nconditions: {have}\ntargets: "
                f"{[(t['labels']['job'], t['health'], t.get('lastError')) for t in targets]}\n"
                f"{logs}") from None
        yield {"prom": prom, "ports": runs["a"][1], "ports_b": runs["b"][1], "dir": d / "a",
               "k8s_cfg": k8s_cfg}
    finally:
        prom.stop()
        for proc, _, log in runs.values():
            T.stop(proc, timeout_s=120)
            log.close()


def _wait_all_have_data(prom, exprs, timeout_s=60):
    """{expr: error} for expressions still empty (or failing) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    pending = list(dict.fromkeys(exprs))
    errors = {}
    while pending and time.monotonic() < deadline:
        errors = {}
        for e in pending:
            try:
                if not prom.query(e):
                    errors[e] = "no data"
            except AssertionError as ex:
                errors[e] = str(ex)
        pending = list(errors)
        if pending:
            time.sleep(2)
    return errors


def _for_run(expr: str, run: str = "a") -> str:
    """A panel query with the dashboard's run selector set to one of the live runs."""
    ns, crl_run = RUNS[run]
    return expr.replace("$namespace", ns).replace("$run", crl_run)


@pytest.mark.parametrize("run", list(RUNS))
def test_every_dashboard_query_returns_data_for_each_run(live, run):
    queries = [dict(q, expr=_for_run(q["expr"], run)) for q in T.dashboard_queries()
               if "DCGM_" not in q["expr"]]
    assert len(queries) > 40
    errors = _wait_all_have_data(live["prom"], [q["expr"] for q in queries])
    assert not errors, {q["panel"]: (q["expr"], errors[q["expr"]])
                        for q in queries if q["expr"] in errors}
    # The selector really selects: another run's name returns nothing.
    ns, _ = RUNS[run]
    assert not live["prom"].query(queries[0]["expr"].replace(f'"{ns}"', '"other"'))


def test_two_runs_stay_apart_in_every_recorded_series(live):
    """Every series a recording rule writes belongs to exactly one run (namespace and crl_run
    kept), and each run has its own: nothing is summed over both runs."""
    prom = live["prom"]
    records = [r["record"] for r in T.rules() if "record" in r]
    assert records
    # Both runs in every recorded series (waited for: a rule needs a few evaluations).
    assert not _wait_all_have_data(
        prom, [f"count(count by (namespace, crl_run) ({r})) == {len(RUNS)}" for r in records])
    for record in records:
        runs = {(s["metric"].get("namespace"), s["metric"].get("crl_run"))
                for s in prom.query(record)}
        assert runs == set(RUNS.values()), (record, runs)      # no series without its run
    per_run = {(s["metric"]["namespace"], s["metric"]["crl_run"])
               for s in prom.query("crl_actor_params_version")}
    assert per_run == set(RUNS.values())


def test_every_rule_expression_evaluates_and_its_signals_return_data(live):
    prom = live["prom"]
    rules = T.rules()
    # Recording rules: their recorded series exist, and their expressions return data.
    records = [r["record"] for r in rules if "record" in r]
    assert not _wait_all_have_data(prom, records + [r["expr"] for r in rules if "record" in r])
    # Alerts: the expression evaluates without error (empty = not firing) and its operands have
    # data; the rules are loaded and healthy in Prometheus itself.
    alerts = [r for r in rules if "alert" in r]
    for r in alerts:
        prom.query(r["expr"])
    signals = T.promql_signals([r["expr"] for r in alerts])
    flat = [s for r in alerts for s in signals[r["expr"]]]
    assert len(flat) >= len(alerts)
    errors = _wait_all_have_data(prom, flat)
    assert not errors, errors
    groups = prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    for r in rules:
        got = loaded[r.get("alert") or r["record"]]
        assert got["health"] == "ok", got
    # A healthy run fires none of the critical alerts that need no time to fire.
    firing = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]
              if a["state"] == "firing"}
    assert not firing & {"CRLNaNLoss", "CRLReplayCheckpointFailing"}, firing


def test_probes_of_the_manifests_succeed_against_the_running_roles(live):
    """Each probe of the rendered cpu overlay, with the pod's port mapped to the local port of
    the same role (crl local gives every role its own metrics port), succeeds."""
    objs = T.objects(T.render(T.KUSTOMIZATIONS["cpu"]))
    cfg = yaml.safe_load([o for o in objs if o["kind"] == "ConfigMap" and
                          o["metadata"]["name"].startswith("crl-config")][0]["data"]["crl.yaml"])
    pod_to_local = {cfg["service"]["metrics_port"]: None,
                    int(cfg["service"]["replay_address"].rpartition(":")[2]): live["ports"]["replay_grpc"],
                    int(cfg["service"]["params_address"].rpartition(":")[2]): live["ports"]["params"]}
    checked = 0
    for w in objs:
        if w["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        role = w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        if role not in ROLE_OFFSETS:
            continue
        c = w["spec"]["template"]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe:
                continue
            if "exec" in probe:
                # The probe reads the role's config: here the one crl local wrote for its roles.
                cmd = list(probe["exec"]["command"])
                i = cmd.index("--config") + 1
                cmd[i] = str(live["dir"] / "run" / "config.yaml")
                run_cfg = yaml.safe_load(Path(cmd[i]).read_text())["service"]
                assert run_cfg["tls_ca"] and run_cfg["require_token"]   # a TLS probe, as in k8s
                assert cmd[0] == "python"
                proc = subprocess.run([sys.executable] + cmd[1:], cwd=REPO, capture_output=True,
                                      text=True, timeout=60)
                assert proc.returncode == 0, (role, kind, proc.stdout, proc.stderr)
                assert f"params 127.0.0.1:{live['ports']['params']}: serving=True ready=True" \
                    in proc.stdout, proc.stdout
            else:
                spec = probe.get("httpGet") or probe.get("tcpSocket")
                pod_port = named.get(spec["port"], spec["port"])
                local = pod_to_local[pod_port] or live["ports"][role]
                if "httpGet" in probe:
                    with urllib.request.urlopen(f"http://127.0.0.1:{local}{spec['path']}",
                                                timeout=10) as r:
                        assert r.status == 200 and b"crl_" in r.read()
                else:
                    socket.create_connection(("127.0.0.1", local), timeout=10).close()
            checked += 1
    assert checked >= 8


def test_cluster_status_reads_the_metrics_from_prometheus(live):
    from app.cluster import format_status, read_metrics
    metrics, source = read_metrics(None, [], live["prom"].url)
    assert source and "error" not in metrics, metrics
    assert metrics["params_version"] >= 1 and metrics["sgd_steps"] > 0
    assert metrics["utd_target"] == pytest.approx(0.05)
    assert metrics["utd"] is not None and metrics["env_steps_per_s"] > 0
    assert len(metrics["actor_params_versions"]) == 1
    text = format_status({"namespace": "crl", "server": "(local)", "workloads": [], "pods": [],
                          "metrics": metrics, "metrics_source": source})
    assert f"params version {metrics['params_version']:.0f}" in text and "UTD 0." in text


def test_every_role_scrape_passes_promtool_check_metrics(live):
    """Prometheus naming conventions on what each role really exports: counters end in _total,
    durations in _seconds, base units (promtool check metrics lints them)."""
    problems = {}
    for role in ROLE_OFFSETS:
        with urllib.request.urlopen(f"http://127.0.0.1:{live['ports'][role]}/metrics",
                                    timeout=10) as r:
            text = r.read()
        assert b"crl_" in text, role
        proc = subprocess.run([str(T.tools.promtool()), "check", "metrics"], input=text,
                              capture_output=True, timeout=60)
        out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        if proc.returncode or out:
            problems[role] = out
    assert not problems, problems
