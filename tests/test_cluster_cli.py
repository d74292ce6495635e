"""`crl cluster` without a cluster: cheap import, clear errors when no cluster is configured or
reachable, `apply --dry-run` (the run's objects: namespace, config, actor count, image), the
checks `create-secrets` makes before it contacts a cluster, and the learner pod's health probe
against a real ParameterService, in plaintext and over TLS."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "test_tools"))
import k8s_testlib as T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(*args, env=None, input=None, module="app.cli"):
    base = dict(os.environ)
    base.pop("KUBECONFIG", None)
    base.update(env or {})
    pre = ["cluster"] if module == "app.cli" else []
    return subprocess.run([sys.executable, "-m", module, *pre, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=base, input=input)


def test_import_is_cheap_and_listed_in_help():
    code = ("import sys, app.cluster\n"
            "heavy = [m for m in ('kubernetes', 'grpc', 'jax', 'tensorflow', 'yaml', 'reverb') "
            "if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    proc = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "cluster" in proc.stdout
    proc = run("--help")
    for cmd in ("status", "scale-actors", "apply", "logs", "probe", "create-secrets", "delete"):
        assert cmd in proc.stdout


def test_no_cluster_configured(tmp_path):
    proc = run("status", env={"HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "no Kubernetes cluster configured" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("scale-actors", "3", "--kubeconfig", tmp_path / "missing.yaml",
               env={"HOME": str(tmp_path)})
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr, proc.stderr


def test_unreachable_server(tmp_path):
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{T.free_port()}",
                                                  "insecure-skip-tls-verify": True}}],
           "users": [{"name": "u", "user": {"token": "t"}}],
           "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(cfg))
    for args in (["status"], ["scale-actors", "2"], ["logs", "learner"], ["create-secrets"],
                 ["delete"]):
        proc = run(*args, env={"KUBECONFIG": str(tmp_path / "kubeconfig")})
        assert proc.returncode == 2, proc.stderr
        assert "cannot reach the Kubernetes API server at https://127.0.0.1:" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "cpu.yaml"
    path.write_text(T.render(T.KUSTOMIZATIONS["cpu"]))
    return path


def _objs(text):
    return [o for o in yaml.safe_load_all(text) if o]


def test_apply_dry_run_builds_the_run(manifests, tmp_path):
    cfg = tmp_path / "point.yaml"
    cfg.write_text(yaml.safe_dump({"env": {"name": "point_maze_open"},
                                   "network": {"critic": {"depth": 8}},
                                   "service": {"params_address": "127.0.0.1:5"},
                                   "run": {"run_dir": "/runs/p1"}}))
    proc = run("apply", "--name", "p1", "--manifests", manifests, "--config", cfg,
               "--algo.batch_size", "128", "--actors", "5", "--image", "registry.local/crl:dev",
               "--dry-run")
    assert proc.returncode == 0, proc.stderr
    objs = _objs(proc.stdout)
    assert objs[0]["kind"] == "Namespace" and objs[0]["metadata"]["name"] == "crl-p1"
    assert all(o["metadata"].get("namespace") == "crl-p1" for o in objs[1:]
               if o["kind"] != "PriorityClass")            # cluster-wide, shared by the runs
    # The run label on every object and pod; the run's Prometheus labels its series with it.
    assert all(o["metadata"]["labels"]["app.kubernetes.io/instance"] == "p1" for o in objs)
    assert all(o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "p1"
               for o in objs if o["kind"] in ("Job", "Deployment", "StatefulSet"))
    prom_cm = [o for o in objs if o["kind"] == "ConfigMap" and
               o["metadata"]["name"].startswith("prometheus-config")][0]
    for job in yaml.safe_load(prom_cm["data"]["prometheus.yml"])["scrape_configs"]:
        if job["job_name"].startswith("crl-"):
            labels = {r["target_label"]: r["replacement"] for r in job["relabel_configs"]}
            assert (labels["namespace"], labels["crl_run"]) == ("crl-p1", "p1"), job
    cm = [o for o in objs if o["kind"] == "ConfigMap" and
          o["metadata"]["name"].startswith("crl-config-")]
    assert len(cm) == 1
    run_cfg = yaml.safe_load(cm[0]["data"]["crl.yaml"])
    assert run_cfg["env"]["name"] == "point_maze_open"
    assert run_cfg["network"]["critic"]["depth"] == 8 and run_cfg["algo"]["batch_size"] == 128
    # The fields the pods depend on come from the manifests, with a note on stderr.
    assert run_cfg["service"]["params_address"] == "params:18001"
    assert run_cfg["run"]["run_dir"] == "/data/run"
    assert "service.params_address: '127.0.0.1:5' -> 'params:18001'" in proc.stderr
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        role = w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        is_crl = role in ("replay", "learner", "actor", "evaluator")
        if is_crl:
            vol = [v for v in spec["volumes"] if v["name"] == "config"][0]
            assert vol["configMap"]["name"] == cm[0]["metadata"]["name"]
        assert (spec["containers"][0]["image"] == "registry.local/crl:dev") == is_crl, role
    actor = [w for w in workloads if w["metadata"]["name"] == "actor"][0]
    assert actor["spec"]["parallelism"] == 5
    # The same inputs give the same objects (a re-apply is a no-op); another config, another
    # ConfigMap name (the pods restart with it).
    again = run("apply", "--name", "p1", "--manifests", manifests, "--config", cfg,
                "--algo.batch_size", "128", "--actors", "5", "--image", "registry.local/crl:dev",
                "--dry-run")
    assert again.stdout == proc.stdout
    other = run("apply", "--name", "p1", "--manifests", manifests, "--dry-run",
                "--without-monitoring")
    names = {o["metadata"]["name"] for o in _objs(other.stdout)}
    assert cm[0]["metadata"]["name"] not in names
    assert not {n for n in names if n.startswith(("prometheus", "grafana"))}
    # Stdin works as the manifests source too.
    piped = run("apply", "--namespace", "x", "--manifests", "-", "--dry-run",
                input=manifests.read_text())
    assert piped.returncode == 0 and all(o["metadata"].get("namespace", "x") == "x" or
                                         o["kind"] == "Namespace" for o in _objs(piped.stdout))


def test_apply_errors(manifests, tmp_path):
    proc = run("apply", "--name", "p", "--manifests", manifests, "--network.critic.depth", "6",
               "--dry-run")
    assert proc.returncode == 2 and "network.critic.depth = 6" in proc.stderr
    proc = run("apply", "--manifests", tmp_path / "nope.yaml", "--dry-run")
    assert proc.returncode == 2 and "cannot read manifests" in proc.stderr
    (tmp_path / "twice.yaml").write_text("algo:\n  batch_size: 64\nalgo:\n  discount: 0.9\n")
    proc = run("apply", "--name", "p", "--manifests", manifests, "--config",
               tmp_path / "twice.yaml", "--dry-run")   # the rules of every --config file
    assert proc.returncode == 2 and "duplicate key 'algo'" in proc.stderr, proc.stderr
    (tmp_path / "empty.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    proc = run("apply", "--manifests", tmp_path / "empty.yaml", "--dry-run")
    assert proc.returncode == 2 and "no ConfigMap crl-config" in proc.stderr
    proc = run("apply", "--dry-run", env={"PATH": "/nonexistent", "KUBECTL": ""})
    assert proc.returncode == 2 and "needs kubectl" in proc.stderr
    proc = run("apply", "--dry-run", "--overlay", "k8s/overlays/gpu",
               "--kubectl", T.tools.kubectl(), "--actors", "1")
    assert proc.returncode == 0, proc.stderr
    assert "nvidia.com/gpu" in proc.stdout
    # The learner's GPUs follow gpus.learner, the field `crl local` places the learner by.
    proc = run("apply", "--dry-run", "--overlay", "k8s/overlays/gpu",
               "--kubectl", T.tools.kubectl(), "--gpus.learner", "4")
    assert proc.returncode == 0, proc.stderr
    learner = [o for o in _objs(proc.stdout) if o["kind"] == "Job"
               and o["metadata"]["name"] == "learner"][0]
    res = learner["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "4"
    proc = run("apply", "--name", "Depth_64", "--manifests", manifests, "--dry-run")
    assert proc.returncode == 2 and "a run name is a DNS label" in proc.stderr
    # From another directory (what `crl sweep --backend k8s`'s apply.sh does), the checkout's
    # cpu overlay is the default.
    proc = subprocess.run([sys.executable, "-m", "app.cli", "cluster", "apply", "--name", "s1",
                           "--dry-run", "--kubectl", str(T.tools.kubectl())], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert "namespace: crl-s1" in proc.stdout and "nvidia.com/gpu" not in proc.stdout


def test_params_probe_against_a_real_parameter_service(tmp_path):
    from params import ParameterServer
    server = ParameterServer("127.0.0.1:0").start()
    addr = f"127.0.0.1:{server.port}"
    try:
        probe = lambda *a: run("probe", "--params", addr, *a, module="app.cluster")  # noqa: E731
        alive, ready = probe(), probe("--ready")
        assert alive.returncode == 0, alive.stdout + alive.stderr
        assert "serving=True ready=False version=-1" in alive.stdout
        assert ready.returncode == 1
        server.publish({"actor": {"w": np.ones((2, 3), np.float32)}}, version=3)
        ready = probe("--ready")
        assert ready.returncode == 0 and "ready=True version=3" in ready.stdout
        # --config: the port of service.params_address on 127.0.0.1 (what the pod runs).
        cfg = tmp_path / "crl.yaml"
        cfg.write_text(yaml.safe_dump({"service": {"params_address": f"params:{server.port}"}}))
        by_config = run("probe", "--config", cfg, "--ready", module="app.cluster")
        assert by_config.returncode == 0, by_config.stdout + by_config.stderr
        assert f"params 127.0.0.1:{server.port}: serving=True ready=True" in by_config.stdout
    finally:
        server.stop()
    gone = run("probe", "--params", addr, module="app.cluster")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr
    assert run("probe", module="app.cluster").returncode == 2


def _write_cert(directory: Path, names, stem):
    from app.cluster import self_signed_certificate
    cert, key = self_signed_certificate(list(names), days=1)
    (directory / f"{stem}.crt").write_bytes(cert)
    (directory / f"{stem}.key").write_bytes(key)
    return directory / f"{stem}.crt", directory / f"{stem}.key"


def test_params_probe_over_tls_needs_the_ca_but_no_token(tmp_path):
    """The learner pod's probe with the k8s config: TLS on (trusting service.tls_ca, checking
    the name of service.params_address while dialing 127.0.0.1), a token required for params
    but not for Health."""
    from prometheus_client import CollectorRegistry

    from app.cluster import certificate_names
    from params import ParameterServer
    cert, key = _write_cert(tmp_path, certificate_names("crl"), "tls")
    other, _ = _write_cert(tmp_path, ["params"], "other")
    server = ParameterServer("127.0.0.1:0", token="t0ken-" + "y" * 30, registry=CollectorRegistry(),
                             tls_cert=cert.read_bytes(), tls_key=key.read_bytes()).start()
    token = tmp_path / "token"
    token.write_text("t0ken-" + "y" * 30)

    def probe(ca, *extra, name=""):
        cfg = tmp_path / "crl.yaml"
        svc = {"params_address": f"params:{server.port}", "tls_cert": str(cert),
               "tls_key": str(key), "tls_ca": str(ca), "token_file": str(token),
               "require_token": True}
        if name:
            svc["tls_server_name"] = name
        cfg.write_text(yaml.safe_dump({"service": svc}))
        return run("probe", "--config", cfg, *extra, module="app.cluster")
    try:
        server.publish({"actor": {"w": np.ones((2, 3), np.float32)}}, version=4)
        ok = probe(cert, "--ready")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"params 127.0.0.1:{server.port}: serving=True ready=True version=4" in ok.stdout
        # An untrusted certificate, or a name the certificate does not hold: no connection.
        for bad in (probe(other), probe(cert, name="elsewhere")):
            assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr, bad.stdout + bad.stderr
        # A plaintext probe of the TLS port fails too.
        plain = run("probe", "--params", f"127.0.0.1:{server.port}", module="app.cluster")
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
        # A missing CA file: exit 2, naming the file.
        missing = probe(tmp_path / "no-ca.crt")
        assert missing.returncode == 2 and "no-ca.crt" in missing.stderr, missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        server.stop(None)


def test_create_secrets_checks_its_inputs_before_contacting_a_cluster(tmp_path):
    """Each bad input is refused with exit 2 and a message naming it, before any cluster call
    (no cluster is configured here); no token or key in any message."""
    good_cert, good_key = _write_cert(tmp_path, ["params", "learner"], "good")
    other_cert, other_key = _write_cert(tmp_path, ["somewhere.else"], "other")
    (tmp_path / "notpem").write_text("hello\n")
    (tmp_path / "badtoken").write_text("two words\n")
    (tmp_path / "empty").write_text("\n")
    env = {"HOME": str(tmp_path)}
    cases = [
        (["--cert", good_cert], "--cert and --key go together"),
        (["--ca", good_cert], "--ca needs --cert and --key"),
        (["--cert", tmp_path / "nope.crt", "--key", good_key], "nope.crt': cannot read it"),
        (["--cert", tmp_path / "notpem", "--key", good_key], "not a PEM certificate"),
        (["--cert", good_cert, "--key", tmp_path / "notpem"], "not a PEM private key"),
        (["--cert", good_cert, "--key", other_key], "is not the private key of the certificate"),
        (["--cert", other_cert, "--key", other_key], "not 'params', the name the actors check"),
        (["--token-file", tmp_path / "badtoken"], "printable ASCII without spaces"),
        (["--token-file", tmp_path / "empty"], "the file is empty"),
        (["--days", "0"], "--days 0: must be in 1..3650"),
    ]
    for args, message in cases:
        proc = run("create-secrets", *args, env=env)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "two words" not in proc.stderr and "PRIVATE KEY-----" not in proc.stderr
    # Good inputs get as far as the cluster (none is configured here).
    proc = run("create-secrets", "--cert", good_cert, "--key", good_key, env=env)
    assert proc.returncode == 2 and "no Kubernetes cluster configured" in proc.stderr


def test_status_says_finished_with_env_steps_against_the_budget():
    """The run line of `crl cluster status` (contract B), from the learner's metrics or, once
    its pod has ended, from its Job's state."""
    from app.cluster import format_run_state, run_state
    jobs = lambda learner_state: [  # noqa: E731
        {"role": "learner", "kind": "Job", "name": "learner", "state": learner_state},
        {"role": "actor", "kind": "Job", "name": "actor", "state": learner_state}]
    running = run_state(jobs("Running"), {"env_steps": 500000.0, "budget_env_steps": 2e6,
                                          "finished": 0.0})
    assert not running["finished"] and running["progress"] == 0.25
    assert format_run_state(running) == \
        "run: in progress at 500000 / 2000000 env steps (25.0% of the budget)"
    done = run_state(jobs("Complete"), {"env_steps": 2e6, "budget_env_steps": 2e6,
                                        "finished": 1.0})
    text = format_run_state(done)
    assert done["finished"] and text.startswith("run: finished at 2000000 / 2000000 env steps")
    assert "released their GPUs" in text and "crl cluster delete" in text
    # Metrics say finished while the learner still serves its grace period.
    serving = run_state(jobs("Running"), {"env_steps": 2e6, "budget_env_steps": 2e6,
                                          "finished": 1.0})
    assert serving["finished"] and "final params" in format_run_state(serving)
    # No metrics (no Prometheus): the completed learner Job alone says finished.
    assert run_state(jobs("Complete"), {})["finished"]
    failed = run_state([{"role": "learner", "kind": "Job", "name": "learner",
                         "state": "Failed"}], {})
    assert not failed["finished"] and "FAILED job(s): learner" in format_run_state(failed)
