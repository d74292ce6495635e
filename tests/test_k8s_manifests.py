"""k8s/: render the base and every overlay with kustomize (the real kubectl), validate strictly
against the Kubernetes schemas (kubernetes-validate), and check what the schemas miss: selectors
match pod labels, Services and probes target ports the processes open (per the crl config in the
ConfigMap), NetworkPolicies select existing pods and allow exactly the documented traffic,
security contexts, resources, GPU requests per overlay, one-line overlay changes."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "test_tools"))
import k8s_testlib as T  # noqa: E402
import install_tools as tools  # noqa: E402

from crl import config as C  # noqa: E402

CRL_ROLES = ("replay", "learner", "actor", "evaluator")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """{name: (yaml text, [objects])} for base, cpu and gpu; also written to files."""
    out = {}
    d = tmp_path_factory.mktemp("rendered")
    for name, path in T.KUSTOMIZATIONS.items():
        text = T.render(path)
        (d / f"{name}.yaml").write_text(text)
        out[name] = (d / f"{name}.yaml", T.objects(text))
    return out


def _by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def _get(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind}/{name}"
    return found[0]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def _pods(objs):
    """[(workload, pod template labels, pod spec)]"""
    return [(w, w["spec"]["template"]["metadata"]["labels"], w["spec"]["template"]["spec"])
            for w in objs if w["kind"] in WORKLOAD_KINDS]


def _role(labels):
    return labels.get("app.kubernetes.io/component") if labels.get(
        "app.kubernetes.io/name") == "crl" else labels.get("app.kubernetes.io/name")


def _crl_config(objs) -> C.Config:
    cms = [o for o in _by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("crl-config")]
    assert len(cms) == 1, [o["metadata"]["name"] for o in cms]
    return C.from_dict(yaml.safe_load(cms[0]["data"]["crl.yaml"]))


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _container_port(container, ref):
    """The containerPort a probe/Service port (name or number) refers to, or None."""
    for p in container.get("ports", []):
        if ref == p.get("name") or ref == p["containerPort"]:
            return p["containerPort"]
    return None


def _opened_ports(role: str, cfg: C.Config) -> set:
    """Ports the role's process listens on, per the config (app/launcher.py, the roles)."""
    ports = {cfg.service.metrics_port}
    if role == "replay":
        ports.add(_port(cfg.service.replay_address))
    if role == "learner":
        ports.add(_port(cfg.service.params_address))
    return ports


# ---------------------------------------------------------------------------------------------

def test_every_kustomization_validates_strictly(rendered, tmp_path):
    files = [str(path) for path, _ in rendered.values()]
    proc = subprocess.run([str(tools.kubernetes_validate()), "--strict", "--quiet",
                           "-k", "1.35.0", *files], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The validator is really strict: an unknown field and a wrong type are each rejected.
    objs = [o for o in yaml.safe_load_all(Path(files[1]).read_text()) if o]
    good = [o for o in objs if o["kind"] == "Deployment"][0]
    unknown, wrong = yaml.safe_load(yaml.safe_dump(good)), yaml.safe_load(yaml.safe_dump(good))
    unknown["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    wrong["spec"]["replicas"] = "two"
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(unknown))
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    proc = subprocess.run([str(tools.kubernetes_validate()), "--strict", "-k", "1.35.0",
                           str(tmp_path / "unknown.yaml"), str(tmp_path / "wrong.yaml")],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unknown.yaml did not validate" in out and "imagePullPolicyy" in out, out
    assert "wrong.yaml did not validate" in out and "'two' is not of type 'integer'" in out, out


@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_config_map_is_a_valid_crl_config_matching_the_manifests(rendered, name):
    _, objs = rendered[name]
    cfg = C.validate(_crl_config(objs))
    assert cfg.service.host == "0.0.0.0"          # pods listen on every interface
    # replay_address / params_address name a Service (by DNS name) whose port is the address
    # port and whose pods are the replay / learner pods, with a container port equal to it.
    for address, role in ((cfg.service.replay_address, "replay"),
                          (cfg.service.params_address, "learner")):
        host, port = address.rpartition(":")[0], _port(address)
        svc = _get(objs, "Service", host)
        sp = [p for p in svc["spec"]["ports"] if p["port"] == port]
        assert sp, f"Service {host} has no port {port}"
        pods = [(w, lab, spec) for w, lab, spec in _pods(objs)
                if _selects(svc["spec"]["selector"], lab)]
        assert [_role(lab) for _, lab, _ in pods] == [role], (host, pods)
        assert _container_port(pods[0][2]["containers"][0], sp[0]["targetPort"]) == port
    # Every crl container reads this file: --config points into the mounted ConfigMap.
    for w, lab, spec in _pods(objs):
        if _role(lab) not in CRL_ROLES:
            continue
        c = spec["containers"][0]
        args = c["args"]
        assert args[0] == {"evaluator": "evaluate"}.get(_role(lab), _role(lab))
        path = args[args.index("--config") + 1]
        mount = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert mount, path
        vol = [v for v in spec["volumes"] if v["name"] == mount[0]["name"]][0]
        assert vol["configMap"]["name"].startswith("crl-config")
        assert path.rsplit("/", 1)[1] == "crl.yaml"
        # Where the role writes (run_dir, checkpoints) is a mounted, writable volume.
        writes = [cfg.run.run_dir]
        if _role(lab) == "replay":
            writes.append(cfg.replay.checkpoint_dir)
        if _role(lab) == "learner":
            writes.append(cfg.learner.checkpoint_dir)
        for wpath in writes:
            m = [m for m in c["volumeMounts"] if wpath.startswith(m["mountPath"] + "/")
                 and not m.get("readOnly")]
            assert m, f"{_role(lab)} writes {wpath}, which is on no writable volume"
            if _role(lab) in ("replay", "learner") and wpath != cfg.run.run_dir:
                names = [t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])]
                vol = [v for v in spec["volumes"] if v["name"] == m[0]["name"]]
                claim = vol and (vol[0].get("persistentVolumeClaim") or {}).get("claimName")
                if claim:
                    _get(objs, "PersistentVolumeClaim", claim)
                assert m[0]["name"] in names or claim, f"{wpath} of {_role(lab)} is not on its PVC"


@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_selectors_services_and_probes(rendered, name):
    _, objs = rendered[name]
    cfg = _crl_config(objs)
    pods = _pods(objs)
    roles = {_role(lab) for _, lab, _ in pods}
    assert set(CRL_ROLES) | {"prometheus", "grafana"} <= roles
    for w, labels, spec in pods:
        if w["kind"] == "Job":           # the Job controller makes its own selector
            assert "selector" not in w["spec"] and spec["restartPolicy"] == "OnFailure"
            continue
        # The selector matches the pod template's labels.
        assert _selects(w["spec"]["selector"]["matchLabels"], labels), w["metadata"]["name"]
        if w["kind"] == "StatefulSet":
            gov = _get(objs, "Service", w["spec"]["serviceName"])
            assert gov["spec"].get("clusterIP") == "None"
            assert _selects(gov["spec"]["selector"], labels)
    # No two workloads share pods.
    for i, (w1, l1, _) in enumerate(pods):
        for w2, l2, _ in pods[i + 1:]:
            assert _role(l1) != _role(l2), (w1["metadata"]["name"], w2["metadata"]["name"])
            if w1["kind"] != "Job":
                assert not _selects(w1["spec"]["selector"]["matchLabels"], l2), (w1, w2)
    for svc in _by_kind(objs, "Service"):
        matched = [(w, lab, spec) for w, lab, spec in pods if _selects(svc["spec"]["selector"], lab)]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for p in svc["spec"]["ports"]:
            assert p.get("protocol") == "TCP"      # the old API servers need it explicit
            for _, _, spec in matched:
                assert any(_container_port(c, p["targetPort"]) for c in spec["containers"]), \
                    f"Service {svc['metadata']['name']} port {p} targets no container port"
    for w, labels, spec in pods:
        role = _role(labels)
        for c in spec["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), (role, c["name"])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                if "exec" in probe:
                    # The learner's Health RPC probe reads the role's own config file, so it
                    # calls the port of service.params_address (test_monitoring_live runs it).
                    cmd = probe["exec"]["command"]
                    assert role == "learner"
                    assert cmd[:4] == ["python", "-m", "app.cluster", "probe"], cmd
                    assert cmd[cmd.index("--config") + 1] == \
                        c["args"][c["args"].index("--config") + 1]
                    assert "--params" not in cmd
                    continue
                ref = (probe.get("httpGet") or probe.get("tcpSocket"))["port"]
                port = _container_port(c, ref)
                assert port is not None, f"{role} {kind} targets no container port: {ref}"
                if role in CRL_ROLES:
                    assert port in _opened_ports(role, cfg), (role, kind, port)
                    if "httpGet" in probe:
                        assert port == cfg.service.metrics_port
                        assert probe["httpGet"]["path"] == "/metrics"
            if role in CRL_ROLES:
                # Every container port is one the process opens (and vice versa).
                declared = {p["containerPort"] for p in c["ports"]}
                assert declared == _opened_ports(role, cfg), (role, declared)


@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_network_policies(rendered, name):
    _, objs = rendered[name]
    pods = _pods(objs)
    allowed = {}   # (target role, port name) -> {source roles}
    for np in _by_kind(objs, "NetworkPolicy"):
        targets = [(lab, spec) for _, lab, spec in pods
                   if _selects(np["spec"]["podSelector"]["matchLabels"], lab)]
        assert targets, f"NetworkPolicy {np['metadata']['name']} selects no pods"
        assert np["spec"]["policyTypes"] == ["Ingress"]
        for rule in np["spec"]["ingress"]:
            sources = set()
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, peer     # only pods of this namespace
                matched = [_role(lab) for _, lab, _ in pods
                           if _selects(peer["podSelector"]["matchLabels"], lab)]
                assert matched, f"{np['metadata']['name']}: a source selects no pods: {peer}"
                sources |= set(matched)
            for port in rule["ports"]:
                for lab, spec in targets:
                    assert _container_port(spec["containers"][0], port["port"]), (np, port)
                    allowed.setdefault((_role(lab), port["port"]), set()).update(sources)
    assert allowed == {
        ("replay", "grpc"): {"actor", "learner"},
        ("learner", "params"): {"actor", "evaluator"},
        ("replay", "metrics"): {"prometheus"},
        ("learner", "metrics"): {"prometheus"},
        ("actor", "metrics"): {"prometheus"},
        ("evaluator", "metrics"): {"prometheus"},
    }
    # Every CRL pod is isolated by some policy (so the rules above are all that is allowed).
    for _, lab, _ in pods:
        if _role(lab) in CRL_ROLES:
            assert any(_selects(np["spec"]["podSelector"]["matchLabels"], lab)
                       for np in _by_kind(objs, "NetworkPolicy")), _role(lab)


@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_security_context_resources_and_images(rendered, name):
    _, objs = rendered[name]
    ns = _by_kind(objs, "Namespace")
    assert [n["metadata"]["name"] for n in ns] == ["crl"]
    assert ns[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(o["metadata"].get("namespace") == "crl" for o in objs
               if o["kind"] not in ("Namespace", "PriorityClass"))
    for w, labels, spec in _pods(objs):
        role = _role(labels)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["runAsGroup"] > 0
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            res = c["resources"]
            for k in ("cpu", "memory"):
                assert k in res["requests"] and k in res["limits"], (role, res)
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            if role in CRL_ROLES:
                assert psc["runAsUser"] == 10001        # the image's user (Dockerfile)
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                vols = {v["name"]: v for v in spec["volumes"]}
                assert "emptyDir" in vols[mounts["/tmp"]], role
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["HOME"] == "/tmp"


def _gpus(container):
    return {k: container["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")}


def test_gpu_requests_per_overlay(rendered):
    for name, want in (("base", {"learner": "1"}), ("cpu", {}),
                       ("gpu", {"learner": "8", "actor": "1", "evaluator": "1"})):
        _, objs = rendered[name]
        cfg = _crl_config(objs)
        for _, labels, spec in _pods(objs):
            g = _gpus(spec["containers"][0])
            w = want.get(_role(labels))
            assert g == {"requests": w, "limits": w}, (name, _role(labels), g)
            if _role(labels) == "learner" and w:
                # The same field `crl local` places the learner by (crl/placement.py).
                assert int(w) == cfg.gpus.learner, (name, cfg.gpus)
            if name == "gpu" and w:
                # Scheduled by the nvidia.com/gpu resource alone: the standard taint of GPU
                # nodes is tolerated, no node label (GPU Feature Discovery) is needed.
                assert {"key": "nvidia.com/gpu", "operator": "Exists",
                        "effect": "NoSchedule"} in spec["tolerations"]
                assert "nodeSelector" not in spec and "nodeAffinity" not in \
                    spec.get("affinity", {})
                assert spec["containers"][0]["image"].endswith("-cuda12")
        if name == "cpu":
            assert cfg.gpus.count == 0
        if name == "cpu":
            assert "nvidia.com/gpu" not in rendered[name][0].read_text()
    gpu_cfg = _crl_config(rendered["gpu"][1])
    assert gpu_cfg.learner.num_devices == 0      # pmap over every GPU of the learner pod
    learner = [spec for _, lab, spec in _pods(rendered["gpu"][1]) if _role(lab) == "learner"][0]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in learner["volumes"])


def test_prometheus_scrape_config_matches_the_metrics_services(rendered, tmp_path):
    _, objs = rendered["cpu"]
    cfg = _crl_config(objs)
    cm = [o for o in _by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("prometheus-config")][0]
    prom = yaml.safe_load(cm["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for role in CRL_ROLES:
        job = jobs[f"crl-{role}"]
        sd = job["dns_sd_configs"][0]
        svc = _get(objs, "Service", sd["names"][0])
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        assert sd["port"] == cfg.service.metrics_port == svc["spec"]["ports"][0]["port"]
        assert [_role(lab) for _, lab, _ in _pods(objs)
                if _selects(svc["spec"]["selector"], lab)] == [role]
        assert {"target_label": "role", "replacement": role} in job["relabel_configs"]
    # The rule file is mounted where the config says, and promtool accepts the whole config.
    assert prom["rule_files"] == ["/etc/prometheus/crl-rules.yml"]
    assert set(cm["data"]) == {"prometheus.yml", "crl-rules.yml"}
    (tmp_path / "crl-rules.yml").write_text(cm["data"]["crl-rules.yml"])
    prom["rule_files"] = [str(tmp_path / "crl-rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    proc = T.promtool("check", "config", tmp_path / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Grafana: the datasource is this Prometheus Service, the dashboard ConfigMap is mounted.
    prov = [o for o in _by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("grafana-provisioning")][0]
    ds = yaml.safe_load(prov["data"]["grafana-datasources.yaml"])["datasources"][0]
    svc = _get(objs, "Service", "prometheus")
    assert ds["url"] == f"http://prometheus:{svc['spec']['ports'][0]['port']}"
    dash = [o for o in _by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("grafana-dashboards")][0]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1" and "crl.json" in dash["data"]
    path = yaml.safe_load(prov["data"]["grafana-dashboards.yaml"])["providers"][0]["options"]["path"]
    grafana = [spec for _, lab, spec in _pods(objs) if _role(lab) == "grafana"][0]
    mount = [m for m in grafana["containers"][0]["volumeMounts"] if m["mountPath"] == path][0]
    vol = [v for v in grafana["volumes"] if v["name"] == mount["name"]][0]
    assert vol["configMap"]["name"] == dash["metadata"]["name"]


def test_one_line_overlay_changes(tmp_path):
    """The documented one-line edits (docs/deploy.md) change what they say and nothing else."""
    k8s = tmp_path / "k8s"
    shutil.copytree(T.K8S, k8s)
    overlay = k8s / "overlays" / "cpu"
    before = T.objects(T.render(overlay))

    def edit(path, old, new):
        text = path.read_text()
        assert text.count(old) == 1, (path, old)
        path.write_text(text.replace(old, new))

    edit(overlay / "kustomization.yaml", "        value: 2\n", "        value: 7\n")
    edit(overlay / "crl.yaml", "  name: point_maze_u\n", "  name: ant_u4_maze\n")
    edit(overlay / "crl.yaml", "  critic: {depth: 4, width: 256}\n",
         "  critic: {depth: 16, width: 256}\n")
    after = T.objects(T.render(overlay))
    assert _get(after, "Job", "actor")["spec"]["parallelism"] == 7
    cfg_before, cfg_after = _crl_config(before), _crl_config(after)
    assert (cfg_after.env.name, cfg_after.network.critic.depth) == ("ant_u4_maze", 16)
    C.validate(cfg_after)
    assert C.to_dict(cfg_after)["service"] == C.to_dict(cfg_before)["service"]
    # A new config means a new ConfigMap name, so every pod restarts with it.
    names = {o["metadata"]["name"] for o in after if o["kind"] == "ConfigMap"}
    assert not {n for n in names if n.startswith("crl-config")} & \
        {o["metadata"]["name"] for o in before if o["kind"] == "ConfigMap"}
    changed = [o["metadata"]["name"] for o, p in zip(after, before) if o != p]
    assert sorted(changed) == sorted(["actor", "evaluator", "learner", "replay"] +
                                     [n for n in names if n.startswith("crl-config")]), changed


def test_overlay_configs_keep_the_pinned_fields():
    """Each overlay carries its own crl.yaml; the fields the manifests depend on stay equal."""
    from app.cluster import PINNED_FIELDS
    base = C.to_dict(C.load(str(T.K8S / "base" / "crl.yaml")))
    for name in ("cpu", "gpu"):
        cfg = C.to_dict(C.load(str(T.KUSTOMIZATIONS[name] / "crl.yaml")))
        for field in PINNED_FIELDS:
            a, b = base, cfg
            for part in field.split("."):
                a, b = a[part], b[part]
            assert a == b, (name, field)


# ---------------------------------------------------------------------------------------------
# ParameterService security: on by default in every kustomization; each pod mounts exactly the
# Secret files its role reads (the learner: certificate, key, CA, token; actors and evaluator: the
# CA and the token, never the key); no secret in any manifest.

def _secret_files(spec, container) -> dict:
    """{path in the container: (Secret, key)} of every Secret the container mounts (secret and
    projected volumes; without `items`, the keys `crl cluster create-secrets` writes)."""
    from app.cluster import SECRET_KEYS
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in container.get("volumeMounts", []):
        v = vols.get(m["name"], {})              # absent: a StatefulSet's volume claim
        sources = [v["secret"]] if "secret" in v else []
        sources += [dict(s["secret"], secretName=s["secret"]["name"])
                    for s in (v.get("projected") or {}).get("sources", []) if "secret" in s]
        for s in sources:
            assert m.get("readOnly") is True and "subPath" not in m, m
            assert not s.get("optional"), s          # a pod without its Secret must not start
            items = s.get("items") or [{"key": k, "path": k} for k in SECRET_KEYS[s["secretName"]]]
            for it in items:
                out[f"{m['mountPath']}/{it['path']}"] = (s["secretName"], it["key"])
    for e in container.get("env", []):
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            out[f"env:{e['name']}"] = (ref["name"], ref["key"])
    return out


@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_params_tls_and_token_are_on_and_each_pod_mounts_only_what_it_reads(rendered, name):
    from app.cluster import TLS_SECRET, TOKEN_SECRET, certificate_names
    _, objs = rendered[name]
    s = C.validate(_crl_config(objs)).service
    assert s.require_token is True
    assert s.tls_cert and s.tls_key and s.tls_ca and s.token_file
    # The name the clients check is one a certificate from `crl cluster create-secrets` holds.
    host = s.tls_server_name or s.params_address.rpartition(":")[0]
    assert host in certificate_names("crl")
    client = {s.tls_ca: (TLS_SECRET, "ca.crt"), s.token_file: (TOKEN_SECRET, "token")}
    want = {"learner": {**client, s.tls_cert: (TLS_SECRET, "tls.crt"),
                        s.tls_key: (TLS_SECRET, "tls.key")},
            "actor": client, "evaluator": client, "replay": {}, "prometheus": {}, "grafana": {}}
    seen = set()
    for _, lab, spec in _pods(objs):
        role = _role(lab)
        seen.add(role)
        for c in spec["containers"]:
            assert _secret_files(spec, c) == want[role], (name, role)
        if role != "learner":
            assert "tls.key" not in yaml.safe_dump(spec), (name, role)
    assert seen == set(want)


def test_each_role_loads_its_security_from_its_pod_and_only_token_holders_get_params(
        rendered, tmp_path):
    """Each pod's Secret files (as the rendered cpu overlay mounts them, with Secrets as `crl
    cluster create-secrets` makes them) under a directory of its own: every role's config
    loading finds what it reads (an actor has no key to open), the learner serves TLS, an actor
    gets params, a client without the token is refused, and the learner's probe passes."""
    import secrets
    import subprocess as sp

    import grpc
    from prometheus_client import CollectorRegistry

    from app.cluster import TLS_SECRET, TOKEN_SECRET, certificate_names, self_signed_certificate
    from params import ParameterClient, ParameterServer, security_from_config

    _, objs = rendered["cpu"]
    cfg = _crl_config(objs)
    cert, key = self_signed_certificate(certificate_names("crl"), days=1)
    token = secrets.token_urlsafe(32)
    data = {(TLS_SECRET, "tls.crt"): cert, (TLS_SECRET, "tls.key"): key,
            (TLS_SECRET, "ca.crt"): cert, (TOKEN_SECRET, "token"): token.encode()}

    def pod_config(role):
        spec = [spec for _, lab, spec in _pods(objs) if _role(lab) == role][0]
        root = tmp_path / role
        for path, ref in _secret_files(spec, spec["containers"][0]).items():
            f = root / path.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data[ref])
        svc = {k: (str(root) + v if isinstance(v, str) and v.startswith("/etc/crl/") else v)
               for k, v in C.to_dict(cfg)["service"].items()}
        return root, C.from_dict({"service": svc})

    roots = {}
    for role in ("learner", "actor", "evaluator"):
        root, rcfg = pod_config(role)
        roots[role] = root
        sec = security_from_config(rcfg.service, server=(role == "learner"), environ={})
        assert sec.token == token and sec.tls
        if role == "learner":
            learner_cfg = rcfg
            server_sec = sec
        else:
            assert not list(root.rglob("tls.key")) and not list(root.rglob("tls.crt"))
            assert sec.tls_key is None and sec.tls_ca == cert
            client_sec = sec
    # Without the Secrets mounted, every role refuses to start, naming the field.
    for server_side in (True, False):
        with pytest.raises(C.ConfigError, match="service.token_file"):
            security_from_config(cfg.service, server=server_side, environ={})

    server = ParameterServer("127.0.0.1:0", token=server_sec.token, registry=CollectorRegistry(),
                             tls_cert=server_sec.tls_cert, tls_key=server_sec.tls_key).start()
    try:
        server.publish({"actor": {"w": __import__("numpy").ones((2, 2), "float32")}}, 5)
        addr = f"127.0.0.1:{server.port}"
        host = cfg.service.params_address.rpartition(":")[0]      # what the actors dial
        with ParameterClient(addr, 10.0, token=client_sec.token, tls_ca=client_sec.tls_ca,
                             tls_server_name=host) as actor:
            assert actor.get()[0] == 5
        with ParameterClient(addr, 10.0, tls_ca=client_sec.tls_ca, tls_server_name=host) as anon:
            with pytest.raises(grpc.RpcError) as e:
                anon.get()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ParameterClient(addr, 3.0, token=token) as plain:        # no TLS: no connection
            with pytest.raises(grpc.RpcError) as e:
                plain.get()
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED)
        # The standard gRPC health service (grpc.health.v1) answers over the same TLS, without
        # the token: "" SERVING (alive), the ParameterService SERVING once a version is out.
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from params.server import SERVICE_NAME
        creds = grpc.ssl_channel_credentials(root_certificates=client_sec.tls_ca)
        with grpc.secure_channel(addr, creds, options=[
                ("grpc.ssl_target_name_override", host)]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", SERVICE_NAME):
                got = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert got.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # The learner's probe command, with its pod's config (TLS, name of params_address).
        cfg_file = tmp_path / "learner.yaml"
        cfg_file.write_text(C.dumps(learner_cfg))
        proc = sp.run([sys.executable, "-m", "app.cluster", "probe", "--config", str(cfg_file),
                       "--params", addr, "--ready"], cwd=T.REPO, capture_output=True, text=True,
                      timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "serving=True ready=True version=5" in proc.stdout
    finally:
        server.stop(None)


TOKEN_LIKE = r"(?=[A-Za-z0-9_+/=-]*[a-z])(?=[A-Za-z0-9_+/=-]*[A-Z])(?=[A-Za-z0-9_+/=-]*[0-9])" \
             r"[A-Za-z0-9_+/=-]{32,}"


def _secret_findings(text: str) -> list:
    import re
    found = [m.group(0) for m in re.finditer(TOKEN_LIKE, text)]
    found += [line for line in text.splitlines()
              if "-----BEGIN" in line or re.match(r"\s*kind:\s*Secret\s*$", line)]
    return found


def test_no_secret_in_any_manifest(rendered):
    import secrets
    files = [p for p in T.K8S.rglob("*") if p.is_file()]
    assert len(files) > 15
    for p in files:
        assert not _secret_findings(p.read_text()), p
    for name, (path, objs) in rendered.items():
        assert not _secret_findings(path.read_text()), name
        assert not [o for o in objs if o["kind"] == "Secret"], name
        for _, lab, spec in _pods(objs):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    # A credential would come from a Secret (valueFrom), never a literal value.
                    assert not any(w in e["name"].upper() for w in
                                   ("TOKEN", "PASSWORD", "SECRET", "KEY")) or "value" not in e, e
        # The crl config holds paths to the Secret files, never their contents.
        svc = C.to_dict(_crl_config(objs))["service"]
        assert "token" not in svc and svc["token_file"].startswith("/etc/crl/")
    # The check does catch them: a generated token, a PEM block, a Secret object.
    assert _secret_findings(f"x: {secrets.token_urlsafe(32)}\n")
    assert _secret_findings("data:\n  tls.key: |\n    -----BEGIN PRIVATE KEY-----\n")
    assert _secret_findings("apiVersion: v1\nkind: Secret\n")


def test_kubectl_apply_k_k8s_is_the_cpu_overlay(rendered):
    """The design's promise, `kubectl apply -k k8s/`, renders (kustomize finds the root
    kustomization) and is exactly the CPU overlay."""
    from pathlib import Path
    root = T.objects(T.render(Path(T.K8S)))
    assert root == rendered["cpu"][1]


# ---------------------------------------------------------------------------------------------
# Run lifecycle and production settings (docs/deploy.md).

@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_finished_roles_are_not_restarted(rendered, name):
    """Contract B: the learner, the actors and the evaluator are Jobs whose pods restart only on
    failure (exit != 0); a role that exits 0 at the budget ends its Job and frees its GPUs; the
    learner exits at the budget (exit_at_budget pinned true). Replay keeps serving."""
    _, objs = rendered[name]
    kinds = {_role(lab): w["kind"] for w, lab, _ in _pods(objs)}
    assert kinds == {"learner": "Job", "actor": "Job", "evaluator": "Job",
                     "replay": "StatefulSet", "prometheus": "Deployment",
                     "grafana": "Deployment"}, kinds
    for w, lab, spec in _pods(objs):
        if w["kind"] != "Job":
            continue
        assert spec["restartPolicy"] == "OnFailure"
        assert w["spec"]["backoffLimit"] >= 10                 # crashes resume from checkpoints
        if _role(lab) == "actor":
            # No completions: once one actor succeeded (the run finished) no new pod starts.
            assert "completions" not in w["spec"] and w["spec"]["parallelism"] >= 1
        else:
            assert w["spec"]["completions"] == w["spec"]["parallelism"] == 1
    assert _crl_config(objs).learner.exit_at_budget is True
    from app.cluster import PINNED_FIELDS
    assert "learner.exit_at_budget" in PINNED_FIELDS


@pytest.mark.parametrize("name", list(T.KUSTOMIZATIONS))
def test_production_settings(rendered, name):
    _, objs = rendered[name]
    pods = {_role(lab): (w, lab, spec) for w, lab, spec in _pods(objs)}
    # Guaranteed QoS for the learner and replay: requests == limits for every resource.
    for role in ("learner", "replay"):
        res = pods[role][2]["containers"][0]["resources"]
        assert res["requests"] == res["limits"], (name, role, res)
    # PodDisruptionBudgets (policy/v1) select exactly the replay and learner pods.
    pdbs = _by_kind(objs, "PodDisruptionBudget")
    assert {p["apiVersion"] for p in pdbs} == {"policy/v1"}
    covered = sorted(_role(lab) for p in pdbs for _, lab, _ in _pods(objs)
                     if _selects(p["spec"]["selector"]["matchLabels"], lab))
    assert covered == ["learner", "replay"], covered
    for p in pdbs:       # a budget over a Job's pods takes only an integer minAvailable
        assert p["spec"]["minAvailable"] == 1 and "maxUnavailable" not in p["spec"], p
    # PriorityClasses: every crl pod names one that exists; actors rank below learner/replay.
    classes = {p["metadata"]["name"]: p for p in _by_kind(objs, "PriorityClass")}
    prio = {}
    for role in CRL_ROLES:
        pc = pods[role][2]["priorityClassName"]
        assert pc in classes, (role, pc)
        assert classes[pc]["preemptionPolicy"] == "Never"
        assert not classes[pc].get("globalDefault")
        prio[role] = classes[pc]["value"]
    assert prio["actor"] < prio["learner"] and prio["evaluator"] < prio["replay"]
    # Replay beside the learner (pod affinity on the node), preferred so that it still schedules.
    aff = pods["replay"][2]["affinity"]["podAffinity"]
    term = aff["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert _role(term["labelSelector"]["matchLabels"]) == "learner"
    # The recommended labels on every object and pod; the run is app.kubernetes.io/instance.
    for o in objs:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "crl", o["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == "crl", o["metadata"]["name"]
        if o["kind"] not in ("PriorityClass", "Namespace", "ConfigMap"):
            assert labels.get("app.kubernetes.io/name"), o["metadata"]["name"]
    for w, lab, _ in _pods(objs):
        assert lab.get("app.kubernetes.io/instance") == "crl" and lab.get(
            "app.kubernetes.io/part-of") == "crl", w["metadata"]["name"]
    # Prometheus keeps its data on a volume claim.
    prom = pods["prometheus"][2]
    data = [v for v in prom["volumes"] if v["name"] == "data"][0]
    _get(objs, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])


def test_job_entrypoint_exits_0_only_when_the_role_ended_by_itself(rendered, tmp_path):
    """The Jobs' entrypoint (the ConfigMap's script, run as the pods run it): a role that ends
    by itself passes its code on (0 at the budget: the Job completes; 3, a crash: restarted);
    a pod stopped by Kubernetes (SIGTERM to the container's PID 1) exits 143 even though the
    role stops cleanly with 0, so its Job replaces it instead of counting it done."""
    import os
    import signal
    import time
    _, objs = rendered["cpu"]
    cm = [o for o in _by_kind(objs, "ConfigMap")
          if o["metadata"]["name"].startswith("crl-job-entrypoint")][0]
    for w, lab, spec in _pods(objs):
        if w["kind"] == "Job":
            c = spec["containers"][0]
            path = c["command"][1]
            mount = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")][0]
            vol = [v for v in spec["volumes"] if v["name"] == mount["name"]][0]
            assert c["command"][0] == "sh" and vol["configMap"]["name"] == cm["metadata"]["name"]
    script = tmp_path / "job-entrypoint.sh"
    script.write_text(cm["data"]["job-entrypoint.sh"])
    # A stand-in `crl` on PATH that behaves as the roles do: SIGTERM -> clean stop, exit 0.
    (tmp_path / "fake_role.py").write_text(
        "import pathlib, signal, sys, time\n"
        "def term(*_):\n"
        "    pathlib.Path(sys.argv[2]).write_text('terminated')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "if sys.argv[1] == 'finish': sys.exit(0)\n"
        "if sys.argv[1] == 'crash': sys.exit(3)\n"
        "print('serving', flush=True)\n"
        "time.sleep(60)\n")
    crl = tmp_path / "bin" / "crl"
    crl.parent.mkdir()
    crl.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "fake_role.py"} "$@"\n')
    crl.chmod(0o755)
    env = dict(os.environ, PATH=f"{crl.parent}:{os.environ['PATH']}")
    marker = tmp_path / "terminated"
    for mode, code in (("finish", 0), ("crash", 3)):
        proc = subprocess.run(["sh", str(script), mode, str(marker)], env=env, timeout=60)
        assert proc.returncode == code, mode
    proc = subprocess.Popen(["sh", str(script), "serve", str(marker)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "serving"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "terminated"       # the role got the SIGTERM and stopped
