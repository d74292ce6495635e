"""Rendered episodes open in a real headless Chromium and draw something.

Chromium comes from Debian (`apt-get install chromium`) when it is not on the machine; the test
skips only when there is no apt-get (or no root to run it). The Brax page's JavaScript libraries
(three.js, lil-gui, pako) come from the npm registry via `npm pack`, cached in
~/.cache/crl/brax-viewer (crl render --offline-viewer), so the page renders without the CDNs.
"""
import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from app import cli
from crl import config as C
from app.research import critic_map as CM
from app.research import runs as R


@pytest.fixture(scope="session")
def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is unavailable to install it")
    prefix = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or subprocess.run(["sudo", "-n", "true"]).returncode:
            pytest.skip("chromium is not installed and apt-get needs root (no passwordless sudo)")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = prefix + ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env)
    if proc.returncode:
        subprocess.run(prefix + ["apt-get", "update"], capture_output=True, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"apt-get install chromium failed:\n{proc.stderr[-2000:]}"
    return shutil.which("chromium")


def browse(exe, url, out_png=None, dump_dom=False, size=(800, 600)):
    """Headless Chromium; software WebGL (SwiftShader) for three.js."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
           f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=20000"]
    cmd += ["--dump-dom"] if dump_dom else [f"--screenshot={out_png}"]
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def colours(png):
    from PIL import Image
    px = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    uniq, counts = np.unique(px, axis=0, return_counts=True)
    return {tuple(map(int, u)): int(c) / len(px) for u, c in zip(uniq, counts)}


@pytest.fixture()
def http_dir():
    servers = []

    def serve(directory):
        handler = functools.partial(QuietHandler, directory=str(directory))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_point_maze_trajectories_svg_renders_in_chromium(chromium, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = C.load(overrides={"env.name": "point_maze_u", "network.actor.width": 16,
                            "network.critic.width": 16})
    C.dump(cfg, str(run / "config.yaml"))
    R.save_params(str(run / R.PARAMS_FILE), *CM._init_params(cfg, 0))
    out = tmp_path / "out"
    assert cli.main(["render", str(run), "--out", str(out), "--episodes", "4", "--steps", "60"]) == 0
    shot = tmp_path / "svg.png"
    browse(chromium, (out / "trajectories.svg").as_uri(), shot, size=(400, 460))
    c = colours(shot)
    # The maze's walls: 18 of the 25 cells of the U, 400 x 400 px of a 400 x 460 window.
    assert 0.45 < c.get((60, 60, 60), 0) < 0.75
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    assert sum(any(abs(np.subtract(col, p)).max() < 40 for col in c) for p in palette) >= 3


def test_brax_episode_renders_in_chromium_viewer(chromium, tmp_path, http_dir):
    if shutil.which("npm") is None and not Path(
            os.path.expanduser("~/.cache/crl/brax-viewer/three.module.js")).exists():
        pytest.skip("npm is not installed: no way to fetch the viewer's three.js")
    out = tmp_path / "ant"
    assert cli.main(["render", "--env", "ant", "--steps", "20", "--out", str(out),
                     "--offline-viewer"]) == 0
    page = (out / "episode_0.html").read_text()
    assert "unpkg.com" not in page and "jsdelivr" not in page      # nothing from a CDN
    url = http_dir(out) + "/episode_0.html"
    dom = browse(chromium, url, dump_dom=True)
    assert "<canvas" in dom                                         # three.js made its canvas
    shot = tmp_path / "ant.png"
    browse(chromium, url, shot)
    c = colours(shot)
    assert len(c) > 100 and c.get((255, 255, 255), 0) < 0.2         # a 3-d scene, not a blank page
    # Control: the same page without the viewer's scripts is blank, so the check above can fail.
    (out / "viewer").rename(out / "viewer.off")
    blank = tmp_path / "blank.png"
    browse(chromium, url, blank)
    assert len(colours(blank)) < 10
