"""The layering rule of docs/design.md, checked on the imports in the source (ast, nothing is
imported): the algorithm core knows nothing of the roles, the services or Kubernetes; roles do
not import each other or the application layer."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

# The algorithm core and the small utilities every layer shares.
CORE = ["crl"]
ROLES = {"actors": "actors", "learner": "learner", "evaluator": "evaluator", "replay": "replay"}
APP = ("app",)
SERVICES = ("params", "protos", "reverb", "grpc", "kubernetes", "tensorflow")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def _files(spec: str):
    p = REPO / spec
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def _hits(files, forbidden):
    out = []
    for f in files:
        for line, name in _imports(f):
            if any(name == b or name.startswith(b + ".") for b in forbidden):
                where = f.relative_to(REPO) if f.is_relative_to(REPO) else f
                out.append(f"{where}:{line} imports {name}")
    return out


def test_core_imports_no_role_service_or_application_module():
    files = [f for spec in CORE for f in _files(spec)]
    assert len(files) >= 15
    assert not _hits(files, tuple(ROLES.values()) + APP + SERVICES)


def test_roles_import_neither_each_other_nor_the_application_layer():
    bad = []
    for role, package in ROLES.items():
        others = tuple(p for r, p in ROLES.items() if r != role and r != "replay") + APP
        bad += _hits(_files(role), others)
    assert not bad


def test_the_rule_catches_a_wrong_way_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom learner.role import run\n")
    assert _hits([f], ("learner",)) == [f"{f}:2 imports learner.role"]
    assert _hits([f], ("learn",)) == []          # a module name, not a prefix of one
