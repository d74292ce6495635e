"""MJX (>= 3.3.6) prints "Failed to import warp" lines at import when warp-lang is absent;
crl.envs.make_env imports it through crl/quiet_mjx.py, which drops exactly those lines. A fresh
interpreter, so that this import is the first one."""
from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import sys
from crl.envs import make_env
make_env("point_maze_u")
print("mjx imported:", "mujoco.mjx" in sys.modules)
"""


def test_make_env_imports_mjx_without_the_warp_lines():
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "mjx imported: True\n"
    assert "warp" not in proc.stderr.lower(), proc.stderr[-3000:]


def test_only_the_warp_lines_are_dropped(tmp_path, monkeypatch, capsys):
    from crl.quiet_mjx import import_mjx
    (tmp_path / "noisy_module.py").write_text(
        "print('Failed to import warp: No module named warp')\n"
        "print('kept: first')\n"
        "print('Failed to import mujoco_warp: No module named warp')\n"
        "print('kept: Failed to import warp is quoted here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_mjx("noisy_module")
    assert capsys.readouterr().out == "kept: first\nkept: Failed to import warp is quoted here\n"
    import_mjx("noisy_module")                   # imported once: nothing runs or prints
    assert capsys.readouterr().out == ""
    monkeypatch.delitem(sys.modules, "noisy_module")
