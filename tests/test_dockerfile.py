"""The Dockerfile cannot be built here (no container engine). What is checked: multi-stage with a
pinned base; it installs exactly the locked set (its `uv sync` commands, run with uv's dry run on
the real pyproject.toml + uv.lock, would install the packages of `uv export --frozen`); the CUDA 12
variant pins the same jax version as the lock; the entrypoint is the `crl` console script; the
runtime user is not root and is the uid the manifests run as; everything COPY needs is in the
build context (.dockerignore)."""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions():
    """[(stage index, INSTRUCTION, argument text)] with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out, stage = [], -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        out.append((stage, word, rest.strip()))
    return out


def _args():
    return {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.M)}


def _locked_version(name):
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return [p["version"] for p in lock["package"] if p["name"] == name][0]


def test_multi_stage_pinned_base_and_non_root_entrypoint():
    ins = _instructions()
    froms = [rest for _, w, rest in ins if w == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build") and froms[1].endswith(" AS runtime")
    base = _args()["PYTHON_IMAGE"]
    # An exact patch version of Python 3.11 (what Reverb needs), on a named Debian release.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    final = [(w, r) for s, w, r in ins if s == 1]
    user = [r for w, r in final if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    uid = int(user[-1].split(":")[0])
    assert re.search(rf"useradd [^\n]*--uid {uid}\b", re.sub(r"\\\n\s*", " ", DOCKERFILE))
    # The manifests run the crl pods as this uid.
    for f in ("replay", "learner", "actor", "evaluator"):
        assert f"runAsUser: {uid}" in (REPO / "k8s" / "base" / f"{f}.yaml").read_text()
    entry = [r for w, r in final if w == "ENTRYPOINT"]
    assert entry == ['["crl"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["crl"] == "app.cli:main"
    # The runtime stage gets the venv from the build stage and puts it on PATH.
    assert any(w == "COPY" and r.startswith("--from=build /opt/crl/venv") for w, r in final)
    assert any(w == "ENV" and "PATH=/opt/crl/venv/bin:" in r for w, r in final)
    # uv is the version the README and CI use.
    readme = (REPO / "README.md").read_text()
    assert f"uv=={_args()['UV_VERSION']}" in readme


VARIANT_EXTRAS = {"cpu": [], "cuda12": ["--extra", "cuda"]}


def _variant_extras():
    """{variant: extras} as the Dockerfile's case statement writes them to /opt/uv-extras."""
    run = [r for _, w, r in _instructions() if w == "RUN" and "/opt/uv-extras" in r
           and "case" in r][0]
    out = {}
    for variant, body in re.findall(r"(\w+)\) echo \"([^\"]*)\" > /opt/uv-extras", run):
        out[variant] = body.split()
    assert "*) echo" in run and "exit 1" in run      # an unknown variant fails the build
    return out


@pytest.mark.parametrize("variant,extras,expected", [
    ("cpu", "", []), ("cpu", "wandb", ["--extra", "wandb"]),
    ("cuda12", "wandb", ["--extra", "cuda", "--extra", "wandb"])])
def test_extras_build_arg_adds_lock_extras(tmp_path, variant, extras, expected):
    """The RUN that writes /opt/uv-extras, run by sh with JAX_VARIANT and EXTRAS as build args:
    every word of EXTRAS becomes one more `--extra` of both uv syncs (e.g. W&B in pods)."""
    assert _args()["EXTRAS"] == "\"\""      # none by default
    run = [r for _, w, r in _instructions() if w == "RUN" and "/opt/uv-extras" in r
           and "case" in r][0]
    out = tmp_path / "uv-extras"
    script = run.replace("/opt/uv-extras", str(out))
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, JAX_VARIANT=variant, EXTRAS=extras))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().split() == expected
    lock = (REPO / "uv.lock").read_text()
    for name in extras.split():   # an extra the lock has
        assert re.search(rf"^{name} = \[", lock, re.M), name


def _sync_commands(extras):
    """The Dockerfile's `uv sync` commands with the variant's extras in place."""
    cmds = []
    for r in [r for _, w, r in _instructions() if w == "RUN" and "uv sync" in r]:
        line = r[r.index("uv sync"):].split("&&")[0].replace("$(cat /opt/uv-extras)",
                                                                " ".join(extras))
        cmds.append(shlex.split(line))
    return cmds


@pytest.mark.parametrize("variant", ["cpu", "cuda12"])
def test_installs_exactly_the_locked_set(tmp_path, variant):
    """Runs the Dockerfile's `uv sync` commands (dry run) for each image variant on a copy of
    the build context's pyproject.toml + uv.lock: they resolve from the lock alone (--frozen)
    and would install exactly the packages `uv export --frozen --no-dev` (with the variant's
    extras) lists; nothing is installed beside the lock but uv itself."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    extras = _variant_extras()
    assert extras == VARIANT_EXTRAS, extras
    cmds = _sync_commands(extras[variant])
    assert len(cmds) == 2
    for cmd in cmds:
        assert "--frozen" in cmd and "--no-dev" in cmd, cmd
        assert not {"--upgrade", "-U", "--refresh"} & set(cmd)
    assert "--no-install-project" in cmds[0] and "--no-editable" in cmds[1]
    assert not re.search(r"uv (lock|add)\b", DOCKERFILE)
    for _, w, r in _instructions():   # uv itself is the only package installed by pip
        if w == "RUN" and "pip install" in r:
            for name, value in _args().items():
                r = r.replace("${%s}" % name, value)
            pkgs = [t for t in shlex.split(r.split("pip install")[1].split("&&")[0])
                    if not t.startswith("-")]
            assert pkgs and all(re.fullmatch(r"uv==[0-9][\w.]*", p) for p in pkgs), pkgs
    for f in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO / f, tmp_path / f)
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"),
               UV_PYTHON=sys.executable, UV_OFFLINE="1", UV_PYTHON_DOWNLOADS="never")
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([uv, *cmds[0][1:], "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    would = set(re.findall(r"^ \+ (\S+)==(\S+)", proc.stderr + proc.stdout, re.M))
    export = subprocess.run([uv, "export", "--frozen", "--no-dev", "--no-hashes",
                             "--no-emit-project", "--no-header", "--no-annotate",
                             *extras[variant]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    locked = set(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", export.stdout, re.M))
    norm = lambda s: {(n.lower().replace("_", "-"), v) for n, v in s}  # noqa: E731
    assert norm(would) == norm(locked) and len(locked) > 50
    jax = _locked_version("jax")
    assert ("jax", jax) in norm(would) and ("jaxlib", jax) in norm(would)
    assert ("dm-reverb", "0.14.0") in norm(would)
    cuda = {n for n, _ in norm(would) if n.startswith(("nvidia-", "jax-cuda12"))}
    if variant == "cpu":
        assert not cuda
    else:   # the CUDA build of the same JAX, and NVIDIA's wheels, all from the lock
        assert ("jax-cuda12-plugin", jax) in norm(would) and ("jax-cuda12-pjrt", jax) in norm(would)
        assert len(cuda) >= 12 and ("nvidia-cudnn-cu12", "9.5.1.17") in norm(would)


def test_default_variant_is_cpu_and_the_gpu_overlay_runs_cuda12():
    assert _args()["JAX_VARIANT"] == "cpu"
    assert "newTag: 0.1.0-cuda12" in (REPO / "k8s/overlays/gpu/kustomization.yaml").read_text()


def test_build_context_has_what_copy_needs():
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

    def ignored(rel):
        return any(fnmatch.fnmatch(rel, p) or rel.split("/")[0] == p.rstrip("/")
                   for p in patterns)

    for p in (".venv", ".git", "runs", "tests"):
        assert ignored(p), p
    copies = [r for _, w, r in _instructions() if w == "COPY" and not r.startswith("--from")]
    assert copies
    for r in copies:
        *srcs, _dst = r.split()
        for src in srcs:
            assert (REPO / src).exists(), src
            assert not ignored(src), f"{src} is excluded by .dockerignore"
    # Every package pyproject installs is copied.
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = {r.split()[0] for r in copies}
    for pattern in include:
        assert pattern.rstrip("*") in copied, pattern
