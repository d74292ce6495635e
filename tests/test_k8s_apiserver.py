"""A real API server (etcd + kube-apiserver v1.20 from Debian's source package, on 127.0.0.1)
accepts `kubectl apply -k` of every overlay; a second apply and `kubectl diff` change nothing;
`crl cluster create-secrets` creates, replaces and keeps the ParameterService's Secrets (the
first deploy step) and never prints them; `crl cluster status | scale-actors | logs | apply` work
against it, with clear errors for a missing namespace and an unreachable server. Nothing is scheduled (no kubelet, no controllers):
status reports desired and ready counts.

The server is v1.20 (the newest the reachable registries give): the two API fields newer than it
are translated down before applying (`for_api_1_20`): PodDisruptionBudget policy/v1 ->
policy/v1beta1 (same fields) without unhealthyPodEvictionPolicy (1.26+). Everything else is
applied as rendered; test_k8s_manifests validates the untranslated manifests against the 1.35
schemas.

The first run builds kube-apiserver (scripts/test_tools/install_tools.py: ~290 CPU-seconds,
measured 445 s on a loaded 2-core machine; cached in ~/.cache/crl-test-tools); later runs start
it in ~6 s and the module takes ~1 min."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "test_tools"))
import k8s_testlib as T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = T.ApiServer(tmp_path_factory.mktemp("apiserver")).start()
    try:
        yield s
    finally:
        s.stop()


def for_api_1_20(text: str) -> str:
    """The rendered manifests as a v1.20 API server accepts them (see the module docstring)."""
    import yaml
    out = []
    for o in T.objects(text):
        if o["kind"] == "PodDisruptionBudget":
            o["apiVersion"] = "policy/v1beta1"
            o["spec"].pop("unhealthyPodEvictionPolicy", None)
        out.append(o)
    return yaml.safe_dump_all(out, sort_keys=False)


def rendered_1_20(path: Path, tmp: Path) -> Path:
    f = tmp / f"{path.name}-1.20.yaml"
    f.write_text(for_api_1_20(T.render(path)))
    return f


NAMESPACED_KINDS = "configmap,service,pvc,deployment,statefulset,job,networkpolicy,pdb"


def crl(server, *args, input=None, kubeconfig=True):
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = str(server.kubeconfig)
    return subprocess.run([sys.executable, "-m", "app.cli", "cluster", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=180, env=env, input=input)


def _versions(server, namespace):
    """{kind/name: resourceVersion} of everything the manifests create in namespace."""
    out = server.kubectl("get", NAMESPACED_KINDS, "-n", namespace, "-o", "json").stdout
    items = json.loads(out)["items"]
    ns = json.loads(server.kubectl("get", "namespace", namespace, "-o", "json").stdout)
    return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"]
            for o in items + [ns]}


def _secret(server, namespace, name):
    """(type, {key: decoded bytes}, resourceVersion) of a Secret as the server stores it."""
    import base64
    o = json.loads(server.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
    return (o["type"], {k: base64.b64decode(v) for k, v in o["data"].items()},
            o["metadata"]["resourceVersion"])


def _san(cert_pem: bytes):
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert, cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def _assert_never_printed(proc, *values: bytes):
    out = proc.stdout + proc.stderr
    for v in values:
        text = v.decode()
        assert text.strip() not in out, "a secret value was printed"
        for line in text.splitlines():
            if len(line) > 20 and "-----" not in line:
                assert line not in out, "a secret value was printed"


def test_create_secrets_before_the_first_apply(server, tmp_path):
    """The documented first step: `crl cluster create-secrets` (namespace created on request),
    then the overlay applies (test_apply_is_accepted_and_idempotent)."""
    from cryptography.hazmat.primitives import serialization
    from app.cluster import self_signed_certificate
    from params import check_token
    proc = crl(server, "create-secrets")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "namespace 'crl' does not exist" in proc.stderr and "--create-namespace" in proc.stderr
    assert server.kubectl("get", "namespace", "crl", check=False).returncode != 0

    first = crl(server, "create-secrets", "--create-namespace")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "namespace/crl created" in first.stdout
    assert "secret/crl-params-tls -n crl created (kubernetes.io/tls: tls.crt, tls.key, ca.crt;" \
        in first.stdout
    assert "secret/crl-params-token -n crl created (Opaque: token;" in first.stdout
    ns = json.loads(server.kubectl("get", "namespace", "crl", "-o", "json").stdout)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    kind, tls, rv_tls = _secret(server, "crl", "crl-params-tls")
    assert kind == "kubernetes.io/tls" and set(tls) == {"tls.crt", "tls.key", "ca.crt"}
    cert, names = _san(tls["tls.crt"])
    for n in ("params", "params.crl", "params.crl.svc", "params.crl.svc.cluster.local",
              "learner", "learner.crl.svc", "learner.crl.svc.cluster.local"):
        assert n in names, names
    assert tls["ca.crt"] == tls["tls.crt"]                     # self-signed: its own CA
    key = serialization.load_pem_private_key(tls["tls.key"], password=None)
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    kind, tok, rv_tok = _secret(server, "crl", "crl-params-token")
    assert kind == "Opaque" and set(tok) == {"token"} and len(tok["token"]) >= 43
    check_token(tok["token"].decode(), "token")
    _assert_never_printed(first, tok["token"], tls["tls.key"])

    # A second run replaces both (new certificate, new token) and says the pods must restart.
    second = crl(server, "create-secrets")
    assert second.returncode == 0, second.stderr
    assert "secret/crl-params-tls -n crl replaced" in second.stdout
    assert "secret/crl-params-token -n crl replaced" in second.stdout
    assert "kubectl delete pod -n crl -l 'app.kubernetes.io/name=crl,app.kubernetes.io/" \
        "component in (learner,actor,evaluator)'" \
        in second.stderr
    _, tls2, rv2 = _secret(server, "crl", "crl-params-tls")
    _, tok2, _ = _secret(server, "crl", "crl-params-token")
    assert rv2 != rv_tls and tls2["tls.key"] != tls["tls.key"] and tok2 != tok
    _assert_never_printed(second, tok2["token"], tls2["tls.key"])
    # --if-missing keeps what exists.
    kept = crl(server, "create-secrets", "--if-missing")
    assert kept.returncode == 0 and kept.stdout.count(" kept (") == 2, kept.stdout
    assert _secret(server, "crl", "crl-params-tls")[2] == rv2

    # The user's own certificate, key and token; a Secret of the wrong type is replaced (the
    # type cannot change in place).
    cert_pem, key_pem = self_signed_certificate(["params", "params.crl.svc"], days=2)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    (tmp_path / "token").write_text("my-own-token-0123456789abcdefXYZ\n")
    server.kubectl("delete", "secret", "crl-params-tls", "-n", "crl")
    server.kubectl("create", "secret", "generic", "crl-params-tls", "-n", "crl",
                   "--from-literal=tls.crt=placeholder")
    own = crl(server, "create-secrets", "--cert", tmp_path / "tls.crt", "--key",
              tmp_path / "tls.key", "--token-file", tmp_path / "token")
    assert own.returncode == 0, own.stderr
    kind, tls3, _ = _secret(server, "crl", "crl-params-tls")
    assert kind == "kubernetes.io/tls"
    assert tls3 == {"tls.crt": cert_pem, "tls.key": key_pem, "ca.crt": cert_pem}
    assert _secret(server, "crl", "crl-params-token")[1] == {"token": b"my-own-token-0123456789abcdefXYZ"}
    _assert_never_printed(own, b"my-own-token-0123456789abcdefXYZ", key_pem)
    # Back to generated ones for the rest of the module.
    assert crl(server, "create-secrets").returncode == 0


def test_apply_is_accepted_and_idempotent(server, tmp_path):
    path = rendered_1_20(T.KUSTOMIZATIONS["cpu"], tmp_path)
    secrets_before = {n: _secret(server, "crl", n) for n in ("crl-params-tls", "crl-params-token")} \
        if server.kubectl("get", "secret", "crl-params-tls", "-n", "crl", check=False).returncode \
        == 0 else None
    first = server.kubectl("apply", "-f", path)
    assert "job.batch/actor created" in first.stdout and "job.batch/learner created" in \
        first.stdout
    assert "networkpolicy.networking.k8s.io/replay-ingress created" in first.stdout
    assert "priorityclass.scheduling.k8s.io/crl-learner created" in first.stdout
    before = _versions(server, "crl")
    objs = T.objects(path.read_text())
    assert len(before) == len([o for o in objs if o["kind"] != "PriorityClass"]) == 29
    second = server.kubectl("apply", "-f", path)
    lines = [l for l in second.stdout.splitlines() if l.strip()]
    assert lines and all(l.endswith(" unchanged") for l in lines), second.stdout
    assert _versions(server, "crl") == before
    diff = server.kubectl("diff", "-f", path, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    # The applies left the Secrets alone (the manifests hold none; nothing is pruned).
    if secrets_before is not None:
        assert {n: _secret(server, "crl", n) for n in secrets_before} == secrets_before
    # The pods mount them: the learner the whole TLS Secret, the actors only the CA.
    sts = json.loads(server.kubectl("get", "job", "learner", "-n", "crl", "-o", "json").stdout)
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["params-tls"]["secret"]["secretName"] == "crl-params-tls"
    assert "items" not in vols["params-tls"]["secret"]
    dep = json.loads(server.kubectl("get", "job", "actor", "-n", "crl", "-o", "json").stdout)
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["params-tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert vols["params-token"]["secret"]["secretName"] == "crl-params-token"
    # What the server stored is what the overlay says.
    dep = json.loads(server.kubectl("get", "job", "actor", "-n", "crl", "-o", "json").stdout)
    assert dep["spec"]["parallelism"] == 2 and dep["spec"]["template"]["spec"][
        "restartPolicy"] == "OnFailure"
    sts = json.loads(server.kubectl("get", "job", "learner", "-n", "crl", "-o", "json").stdout)
    assert "nvidia.com/gpu" not in json.dumps(sts["spec"]["template"])
    assert sts["spec"]["template"]["spec"]["priorityClassName"] == "crl-learner"
    # The actor count is the Job's parallelism (the exploration knob), patched in place.
    server.kubectl("patch", "job/actor", "-n", "crl", "-p", '{"spec":{"parallelism":4}}')
    assert server.kubectl("get", "job", "actor", "-n", "crl", "-o",
                          "jsonpath={.spec.parallelism}").stdout == "4"


def test_cluster_status_scale_and_logs(server, tmp_path):
    server.kubectl("apply", "-f", rendered_1_20(T.KUSTOMIZATIONS["cpu"], tmp_path))
    proc = crl(server, "status", "--json", "--no-metrics")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    work = {w["role"]: w for w in report["workloads"]}
    assert set(work) == {"replay", "learner", "actor", "evaluator", "prometheus", "grafana"}
    assert (work["actor"]["kind"], work["actor"]["desired"], work["actor"]["ready"]) == \
        ("Job", 2, 0)
    assert (work["replay"]["kind"], work["learner"]["kind"]) == ("StatefulSet", "Job")
    assert work["learner"]["state"] == "Running" and work["learner"]["succeeded"] == 0
    assert report["pods"] == [] and report["run"]["finished"] is False

    proc = crl(server, "scale-actors", "6")
    assert proc.returncode == 0 and "2 -> 6" in proc.stdout, proc.stdout + proc.stderr
    assert server.kubectl("get", "job", "actor", "-n", "crl", "-o",
                          "jsonpath={.spec.parallelism}").stdout == "6"

    # Text status: counts, and why metrics are missing (no Prometheus pod runs here).
    proc = crl(server, "status")
    assert proc.returncode == 0, proc.stderr
    assert "actor       Job          actor       6" in proc.stdout, proc.stdout
    assert "run: in progress" in proc.stdout
    assert "no pods yet (11 desired)" in proc.stdout
    assert "metrics: Prometheus:" in proc.stdout and "no running learner pod" in proc.stdout

    proc = crl(server, "logs", "actor")
    assert proc.returncode == 2
    assert "no pods of role actor in namespace 'crl'" in proc.stderr
    assert "job/actor wants 6" in proc.stderr
    # A pod that exists but is not scheduled: its logs cannot be read, and the error says so.
    server.kubectl("run", "evaluator-manual", "-n", "crl", "--image=busybox:1.36", "--restart=Never",
                   "--labels=app.kubernetes.io/name=crl,app.kubernetes.io/component=evaluator,"
                   "app.kubernetes.io/part-of=crl", "--overrides",
                   json.dumps({"spec": {"containers": [{"name": "evaluator", "image": "busybox:1.36"}]}}))
    proc = crl(server, "logs", "evaluator")
    assert proc.returncode == 2 and "evaluator-manual (Pending) is not scheduled on a node yet" \
        in proc.stderr, proc.stderr
    proc = crl(server, "status", "--json", "--no-metrics")
    pods = json.loads(proc.stdout)["pods"]
    assert [(p["name"], p["role"], p["phase"], p["ready"]) for p in pods] == \
        [("evaluator-manual", "evaluator", "Pending", "0/1")]


def test_cluster_errors(server, tmp_path):
    proc = crl(server, "status", "-n", "no-such-namespace")
    assert proc.returncode == 2
    assert "namespace 'no-such-namespace' does not exist" in proc.stderr
    proc = crl(server, "scale-actors", "-1")
    assert proc.returncode == 2 and "must be >= 0" in proc.stderr
    # A kubeconfig whose server is down.
    cfg = Path(server.kubeconfig).read_text().replace(server.url, f"https://127.0.0.1:{T.free_port()}")
    (tmp_path / "down").write_text(cfg)
    proc = crl(server, "status", "--kubeconfig", tmp_path / "down")
    assert proc.returncode == 2 and "cannot reach the Kubernetes API server" in proc.stderr
    # A token the server does not know.
    (tmp_path / "badtoken").write_text(Path(server.kubeconfig).read_text().replace(
        T.ApiServer.TOKEN, "wrong-token"))
    proc = crl(server, "scale-actors", "3", "--kubeconfig", tmp_path / "badtoken")
    assert proc.returncode == 2 and "Unauthorized" in proc.stderr, proc.stderr


def test_cluster_apply_a_run(server, tmp_path):
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(for_api_1_20(T.render(T.KUSTOMIZATIONS["cpu"])))
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text("env: {name: point_maze_open}\nnetwork: {critic: {depth: 8}}\n"
                       "service: {replay_address: '127.0.0.1:1234'}\nrun: {run_dir: /runs/x}\n")
    args = ["apply", "--name", "sweep-a", "--manifests", manifests, "--config", run_cfg,
            "--learner.total_env_steps", "50000", "--actors", "3"]
    proc = crl(server, *args)
    assert proc.returncode == 0, proc.stderr
    assert "namespace/crl-sweep-a created" in proc.stdout
    assert "run.run_dir: '/runs/x' -> '/data/run'" in proc.stderr     # pinned by the manifests
    # The run's namespace has no Secrets yet: apply says so and how to make them.
    assert "the pods wait for Secret(s) crl-params-tls, crl-params-token" in proc.stderr
    assert "crl cluster create-secrets -n crl-sweep-a" in proc.stderr
    made = crl(server, "create-secrets", "--name", "sweep-a")
    assert made.returncode == 0 and made.stdout.count(" created (") == 2, made.stderr
    _, names = _san(_secret(server, "crl-sweep-a", "crl-params-tls")[1]["tls.crt"])
    assert "params.crl-sweep-a.svc" in names
    proc2 = crl(server, *args)
    assert proc2.returncode == 0
    assert "the pods wait for Secret" not in proc2.stderr
    lines = proc2.stdout.strip().splitlines()
    assert len(lines) == len(proc.stdout.strip().splitlines()) and \
        all(l.endswith(" unchanged") for l in lines), proc2.stdout
    # The run's objects: its config in a new ConfigMap the pods mount, its actor count.
    import yaml
    cms = json.loads(server.kubectl("get", "configmap", "-n", "crl-sweep-a", "-o", "json").stdout)
    crl_cm = [c for c in cms["items"] if c["metadata"]["name"].startswith("crl-config")]
    assert len(crl_cm) == 1
    cfg = yaml.safe_load(crl_cm[0]["data"]["crl.yaml"])
    assert (cfg["env"]["name"], cfg["network"]["critic"]["depth"],
            cfg["learner"]["total_env_steps"]) == ("point_maze_open", 8, 50000)
    assert cfg["service"]["replay_address"] == "replay:18000"
    dep = json.loads(server.kubectl("get", "job", "actor", "-n", "crl-sweep-a", "-o",
                                    "json").stdout)
    assert dep["spec"]["parallelism"] == 3
    assert dep["metadata"]["labels"]["app.kubernetes.io/instance"] == "sweep-a"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == crl_cm[0]["metadata"]["name"]
    # status sees the run; an invalid config is refused before anything is applied.
    proc = crl(server, "status", "--name", "sweep-a", "--json", "--no-metrics")
    assert {w["role"]: w["desired"] for w in json.loads(proc.stdout)["workloads"]}["actor"] == 3
    proc = crl(server, "apply", "--name", "bad", "--manifests", manifests,
               "--network.critic.depth", "6")
    assert proc.returncode == 2 and "network.critic.depth = 6" in proc.stderr
    assert server.kubectl("get", "namespace", "crl-bad", check=False).returncode != 0
    # The gpu overlay is accepted too (in a namespace of its own: a StatefulSet's volume claims
    # cannot change in place), and re-applying it changes nothing.
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(for_api_1_20(T.render(T.KUSTOMIZATIONS["gpu"])))
    for state in ("created", "unchanged"):
        proc = crl(server, "apply", "--namespace", "crl-gpu", "--manifests", gpu)
        assert proc.returncode == 0, proc.stderr
        lines = [l for l in proc.stdout.strip().splitlines() if "priorityclass/" not in l]
        assert len(lines) == len(T.objects(gpu.read_text())) - 3 and \
            all(l.endswith(" " + state) for l in lines), proc.stdout
    sts = json.loads(server.kubectl("get", "job", "learner", "-n", "crl-gpu", "-o",
                                    "json").stdout)
    limits = sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    # A new config for a run: the Jobs' pod templates cannot change in place, so apply
    # replaces them (their pods resume from the volumes); the rest is configured in place.
    proc = crl(server, "apply", "--name", "sweep-a", "--manifests", manifests, "--config",
               run_cfg, "--learner.total_env_steps", "60000", "--actors", "3")
    assert proc.returncode == 0, proc.stderr
    for job in ("learner", "actor", "evaluator"):
        assert f"job/{job} -n crl-sweep-a replaced" in proc.stdout, proc.stdout
    assert "statefulset/replay -n crl-sweep-a configured" in proc.stdout


def test_cluster_delete_keeps_the_volumes_unless_asked(server, tmp_path):
    manifests = tmp_path / "cpu.yaml"
    manifests.write_text(for_api_1_20(T.render(T.KUSTOMIZATIONS["cpu"])))
    assert crl(server, "apply", "--name", "gone", "--manifests", manifests).returncode == 0
    server.kubectl("create", "secret", "generic", "crl-params-token", "-n", "crl-gone",
                   "--from-literal=token=not-a-real-token-0123456789abcdefXYZ")
    proc = crl(server, "delete", "--name", "gone")
    assert proc.returncode == 0, proc.stderr
    for obj in ("job/learner", "job/actor", "statefulset/replay", "service/params",
                "networkpolicy/replay-ingress"):
        assert f"{obj} -n crl-gone deleted" in proc.stdout, proc.stdout
    assert "kept: volume claims evaluator-data, learner-data, prometheus-data" in proc.stdout
    left = json.loads(server.kubectl("get", NAMESPACED_KINDS + ",secret", "-n", "crl-gone", "-o",
                                     "json").stdout)["items"]
    assert sorted(f"{o['kind']}/{o['metadata']['name']}" for o in left
                  if o["kind"] != "PodDisruptionBudget") == [   # policy/v1beta1 here: v1.20
        "PersistentVolumeClaim/evaluator-data", "PersistentVolumeClaim/learner-data",
        "PersistentVolumeClaim/prometheus-data", "Secret/crl-params-token"], left
    # The PriorityClasses are cluster-wide, shared with the other runs: kept.
    assert server.kubectl("get", "priorityclass", "crl-learner", check=False).returncode == 0
    # Volumes too: only when confirmed; the namespace goes with everything in it.
    proc = crl(server, "delete", "--name", "gone", "--delete-volumes")
    assert proc.returncode == 2 and "add --yes to confirm" in proc.stderr
    assert "learner-data" in proc.stderr
    proc = crl(server, "delete", "--name", "gone", "--delete-volumes", "--yes")
    assert proc.returncode == 0 and "namespace/crl-gone deleted" in proc.stdout, proc.stderr
    phase = server.kubectl("get", "namespace", "crl-gone", "-o", "jsonpath={.status.phase}",
                           check=False)
    # No namespace controller runs here: the namespace stays Terminating (a real cluster
    # then removes everything in it).
    assert phase.returncode != 0 or phase.stdout == "Terminating", phase.stdout
    proc = crl(server, "delete", "-n", "default")
    assert proc.returncode == 2 and "holds no CRL run" in proc.stderr
