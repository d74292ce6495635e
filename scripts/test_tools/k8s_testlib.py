"""Helpers of the k8s/monitoring tests: render with kustomize, run etcd + kube-apiserver and
Prometheus on 127.0.0.1. Every process is started here and stopped by its own PID; every wait
is bounded. Tools come from install_tools.py (installed on first use, cached outside the repository).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import install_tools as tools  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu",
                  "gpu": K8S / "overlays" / "gpu"}
MONITORING = K8S / "base" / "monitoring"


def free_port() -> int:
    """Below the ephemeral range (crl/localhost.py: a client connecting early to a port of that
    range can be connected to itself)."""
    from crl.localhost import free_port as below_ephemeral
    return below_ephemeral()


def render(path: Path) -> str:
    proc = subprocess.run([str(tools.kubectl()), "kustomize", str(path)], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return proc.stdout


def objects(text: str) -> List[Dict[str, Any]]:
    return [o for o in yaml.safe_load_all(text) if o]


def wait_for(fn, timeout_s: float, what: str, interval_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:   # noqa: BLE001 - retried until the deadline
            last_exc = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


def stop(proc: Optional[subprocess.Popen], timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after timeout_s; only this process (by PID)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------

class ApiServer:
    """etcd + kube-apiserver on 127.0.0.1 (no kubelet, scheduler or controllers: objects are
    stored and validated, nothing runs). Auth: a static admin token; `kubeconfig` is written."""

    TOKEN = "crl-test-admin-token"

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.etcd: Optional[subprocess.Popen] = None
        self.apiserver: Optional[subprocess.Popen] = None
        self.kubeconfig = self.dir / "kubeconfig"
        self.url = ""

    def start(self, timeout_s: float = 120.0) -> "ApiServer":
        etcd_bin, api_bin = tools.etcd(), tools.kube_apiserver()
        self.dir.mkdir(parents=True, exist_ok=True)
        client, peer, port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client}"
        self.etcd_log = self.dir / "etcd.log"
        self.etcd = subprocess.Popen(
            [str(etcd_bin), "--name", "test", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer}",
             "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}"],
            stdout=open(self.etcd_log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        key = self.dir / "sa.key"
        if not key.exists():
            subprocess.run([tools.openssl(), "genrsa", "-out", str(key), "2048"], check=True,
                           capture_output=True, timeout=60)
        (self.dir / "tokens.csv").write_text(f'{self.TOKEN},admin,admin,"system:masters"\n')
        self.api_log = self.dir / "kube-apiserver.log"
        self.apiserver = subprocess.Popen(
            [str(api_bin), f"--etcd-servers={etcd_url}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={port}", f"--cert-dir={self.dir / 'certs'}",
             f"--token-auth-file={self.dir / 'tokens.csv'}", "--authorization-mode=RBAC",
             "--service-cluster-ip-range=10.233.0.0/24",
             f"--service-account-key-file={key}", f"--service-account-signing-key-file={key}",
             "--service-account-issuer=https://kubernetes.default.svc",
             "--api-audiences=https://kubernetes.default.svc",
             "--disable-admission-plugins=ServiceAccount",
             "--enable-priority-and-fairness=false", "--profiling=false",
             "--logtostderr=true", "--v=0"],
            stdout=open(self.api_log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"https://127.0.0.1:{port}"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}]}))
        try:
            wait_for(self._ready, timeout_s, "kube-apiserver /readyz", interval_s=0.5)
        except AssertionError:
            msg = (f"kube-apiserver did not become ready:\n{_tail(self.api_log)}\n"
                   f"etcd:\n{_tail(self.etcd_log, 1500)}")
            self.stop()
            raise AssertionError(msg) from None
        return self

    def _ready(self) -> bool:
        for p in (self.apiserver, self.etcd):
            if p.poll() is not None:
                raise AssertionError(f"{p.args[0]} exited with {p.returncode}:\n"
                                     f"{_tail(self.api_log)}\n{_tail(self.etcd_log, 1500)}")
        out = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "ok"

    def kubectl(self, *args, check: bool = True, timeout: float = 120, input: str = None):
        args = [str(a) for a in args]
        proc = subprocess.run([str(tools.kubectl()), f"--kubeconfig={self.kubeconfig}", *args],
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def stop(self) -> None:
        stop(self.apiserver)
        stop(self.etcd)


# ---------------------------------------------------------------------------------------------

class Prometheus:
    """The Debian Prometheus on 127.0.0.1 with a given config; `query` answers PromQL."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self, config: Dict[str, Any], port: Optional[int] = None,
              timeout_s: float = 60.0) -> "Prometheus":
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.dir / "prometheus.log"
        self.proc = subprocess.Popen(
            [str(tools.prometheus()), f"--config.file={cfg_path}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--web.enable-lifecycle", "--log.level=warn"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(self._ready, timeout_s, "prometheus /-/ready", interval_s=0.5)
        except AssertionError:
            msg = f"prometheus did not start:\n{_tail(self.log)}"
            self.stop()
            raise AssertionError(msg) from None
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{_tail(self.log)}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
            return r.status == 200

    def api(self, path: str, **params) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('errorType')}: "
                                 f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> List[Dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        stop(self.proc)


def promtool(*args, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools.promtool()), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def promql_parse(exprs: List[str]) -> Dict[str, Optional[str]]:
    """{expr: None if it parses, else the parser's error}, with promql-parser (PyPI) run in the
    test tools' venv."""
    code = ("import json, sys, promql_parser\n"
            "out = {}\n"
            "for e in json.load(sys.stdin):\n"
            "    try:\n"
            "        promql_parser.parse(e); out[e] = None\n"
            "    except Exception as ex:\n"
            "        out[e] = f'{type(ex).__name__}: {ex}'\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([str(tools.pytools_python()), "-c", code], input=json.dumps(exprs),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise AssertionError(f"promql-parser failed: {proc.stderr}")
    return json.loads(proc.stdout)


def promql_signals(exprs: List[str]) -> Dict[str, List[str]]:
    """{expr: [sub-expressions that must return data in a healthy run]}.

    An alert expression returns data only when it fires, so what is checked live is what it
    compares: the expression is split (promql-parser AST) at comparison and set operators
    (==, !=, >, <, >=, <=, and, or, unless) down to the operands that are not number literals;
    absent(X) contributes X (it returns data when X has none). A recording rule or a panel query
    (no such operator at its top) is its own signal.
    """
    code = r'''
import json, sys, promql_parser as pp
CMP = {"==", "!=", ">", "<", ">=", "<=", "and", "or", "unless"}
def op_of(e):
    return str(e.op).strip().lower()
def signals(e, out):
    while isinstance(e, pp.ParenExpr):
        e = e.expr
    if isinstance(e, (pp.NumberLiteral, pp.StringLiteral)):
        return
    if isinstance(e, pp.BinaryExpr) and op_of(e) in CMP:
        signals(e.lhs, out); signals(e.rhs, out); return
    if isinstance(e, pp.Call) and e.func.name in ("absent", "absent_over_time"):
        signals(e.args[0], out); return
    if isinstance(e, pp.Call) and e.func.name == "vector":
        return
    out.append(str(e))
res = {}
for x in json.load(sys.stdin):
    out = []
    signals(pp.parse(x), out)
    res[x] = out
print(json.dumps(res))
'''
    proc = subprocess.run([str(tools.pytools_python()), "-c", code], input=json.dumps(exprs),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise AssertionError(f"promql-parser failed: {proc.stderr}")
    return json.loads(proc.stdout)


def dashboard_queries(path: Path = MONITORING / "dashboards" / "crl.json") -> List[Dict[str, str]]:
    dash = json.loads(path.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append({"panel": p.get("title", "?"), "expr": t["expr"]})
            walk(p.get("panels", []))
    walk(dash["panels"])
    return out


def rules(path: Path = MONITORING / "crl-rules.yml") -> List[Dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    return [r for g in data["groups"] for r in g["rules"]]
