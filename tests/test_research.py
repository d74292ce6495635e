"""Research workflow: sweep grid expansion and runs, report numbers, critic-map statistics and maps,
point-maze renders. (Headless-browser checks of rendered pages: test_research_render.py.)"""
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from app import cli
from crl import config as C
from app.research import critic_map as CM
from app.research import report as RP
from app.research import runs as R
from app.research import sweep as SW

REPO = Path(__file__).resolve().parents[1]
TINY = {"env.name": "point_maze_u", "network.actor.width": 16, "network.critic.width": 16,
        "env.num_envs": 8, "eval.num_envs": 8, "algo.batch_size": 32,
        "learner.segments_per_call": 8, "replay.min_size_steps": 800,
        "replay.capacity_steps": 3200, "learner.total_env_steps": 2400}


def run_cli(argv):
    return cli.main(argv)


# ------------------------------------------------------------------------------ cheap imports
def test_tool_modules_are_cheap_to_import_and_registered():
    code = ("import sys, app.cli as c; p = c.build_parser(); "
            "mods = [m for m in ('jax', 'PIL', 'matplotlib', 'brax', 'flax') if m in sys.modules]; "
            "print(','.join(mods)); "
            "print(','.join(sorted(c._tool_modules())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == ""                                  # nothing heavy imported by `crl --help`
    assert {"sweep", "report", "critic-map", "render"} <= set(out[1].split(","))


# ------------------------------------------------------------------------------ statistics
def test_spearman_known_cases():
    x = np.arange(20.0)
    assert CM.spearman(x, x ** 3) == pytest.approx(1.0)            # any increasing transform
    assert CM.spearman(x, -np.exp(x / 5)) == pytest.approx(-1.0)
    # By hand: ranks of b = [1, 2, 3.5, 5, 3.5]; d = [0, 0, -0.5, -1, 1.5] ...
    a, b = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    ra, rb = np.array([1, 2, 3, 4, 5.0]), np.array([1, 2, 3.5, 5, 3.5])
    expect = np.corrcoef(ra, rb)[0, 1]
    assert CM.spearman(a, b) == pytest.approx(expect)
    assert expect == pytest.approx(0.8207826816681233)
    assert math.isnan(CM.spearman([1, 1, 1, 1], [1, 2, 3, 4]))    # constant side
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 6, 200).astype(float), rng.normal(size=200)
    stats = pytest.importorskip("scipy.stats")
    assert CM.spearman(u, v) == pytest.approx(stats.spearmanr(u, v).statistic, abs=1e-12)
    assert np.allclose(CM.rankdata(u), stats.rankdata(u))


def test_path_agreement_counts_pairs_where_path_and_line_disagree():
    path = np.array([1.0, 2.0, 3.0])
    line = np.array([3.0, 2.0, 1.0])       # every pair disagrees
    assert CM.path_agreement(path, path, line) == 1.0
    assert CM.path_agreement(line, path, line) == 0.0
    assert CM.path_agreement(np.zeros(3), path, line) == 0.5       # ties count half
    assert math.isnan(CM.path_agreement(path, path, path))          # nothing to disagree on


def test_maze_geodesic_goes_around_the_wall_of_the_u():
    mg = CM.MazeGrid("u", cell_size=1.0, per_cell=8)
    assert mg.shape == (40, 40) and mg.points.shape == (7 * 64, 2)
    goal = mg.cell_centre((3, 1))                # the tip of the U; start cell (1, 1)
    geo = mg.geodesic(goal)
    line = mg.line(goal)
    assert np.all(np.isinf(geo[mg.walls])) and np.all(np.isfinite(geo[mg.free]))
    assert np.all(geo[mg.free] >= line[mg.free] - 1e-9)
    in_goal_cell = np.zeros(mg.shape, bool)
    in_goal_cell[24:32, 8:16] = True
    assert np.allclose(geo[in_goal_cell], line[in_goal_cell])
    # Start-cell centre: straight line 2 cells; around the wall's end corners (3,3) and (2,3) of
    # the layout: 2 * sqrt(0.5^2 + 1.5^2) + 1 = 4.16 cells (the 8-connected grid is a bit longer).
    start = geo[12, 12]
    assert line[12, 12] == pytest.approx(2.0, abs=0.1)
    assert 2 * math.hypot(0.5, 1.5) + 1 - 0.1 <= start <= 4.6


def test_correlations_on_synthetic_critics():
    mg = CM.MazeGrid("u", cell_size=1.0, per_cell=4)
    cell = (3, 1)
    goal = mg.cell_centre(cell)
    path = mg.geodesic(goal)[mg.free]
    line = mg.line(goal)[mg.free]
    topo = CM.correlations(path * 2 + 1, mg, cell)          # a critic that learned the maze
    eucl = CM.correlations(np.sqrt(line), mg, cell)         # one that learned the straight line
    assert topo["rho_path"] == pytest.approx(1.0) and topo["agree_path"] == 1.0
    assert eucl["rho_line"] == pytest.approx(1.0) and eucl["agree_path"] == 0.0
    assert topo["rho_line"] < 0.9 and eucl["rho_path"] < 0.9
    assert topo["rho_path_line"] == pytest.approx(eucl["rho_path_line"])
    assert topo["rho_path_line"] < 0.9
    assert topo["rho_path_cells"] > topo["rho_line_cells"]
    assert eucl["rho_line_cells"] > eucl["rho_path_cells"]


# ------------------------------------------------------------------------------ sweep
def test_grid_expansion_names_and_overrides():
    axes = {"depth": [4, 16], "width": [32], "batch": [64, 128], "seed": [0, 1, 2]}
    grid = SW.expand_grid(axes, {"algo.critic_lr": ["1e-4", "3e-4"]})
    assert len(grid) == 2 * 2 * 2 * 3
    assert grid[0] == {"depth": 4, "width": 32, "batch": 64, "algo.critic_lr": "1e-4", "seed": 0}
    assert [g["seed"] for g in grid[:3]] == [0, 1, 2]        # seeds of one setting together
    points = SW.build_points(None, {"env.name": "point_maze_u"}, axes,
                             {"algo.critic_lr": ["1e-4", "3e-4"]}, run_root="/x/runs")
    names = [p.name for p, _ in points]
    assert len(set(names)) == 24
    assert names[0] == "point-maze-u-d4-w32-b64-critic-lr0-0001-s0"
    assert len(SW.dns_label("x" * 80)) == 57
    for p, cfg in points:
        assert cfg.network.actor.depth == cfg.network.critic.depth == p.values["depth"]
        assert cfg.network.actor.width == cfg.network.critic.width == 32
        assert cfg.run.seed == cfg.actor.seed == cfg.learner.seed == p.values["seed"]
        assert cfg.run.run_dir == f"/x/runs/{p.name}"
        assert len(p.name) <= 57 and p.name == SW.dns_label(p.name)
    # A separate actor depth shows in the name.
    (p, cfg), = SW.build_points(None, {}, {"depth": [8], "actor_depth": [4]})
    assert (cfg.network.critic.depth, cfg.network.actor.depth) == (8, 4) and "-d8-ad4-" in p.name


def test_invalid_points_are_all_named_before_anything_runs():
    with pytest.raises(C.ConfigError) as e:
        SW.build_points(None, {}, {"depth": [4, 6, 10], "seed": [0]})
    msg = str(e.value)
    assert "depth=6" in msg and "depth=10" in msg and "depth=4," not in msg
    with pytest.raises(C.ConfigError, match="the same run"):
        SW.build_points(None, {}, {"depth": [4, 4]})


def test_k8s_backend_writes_one_valid_config_and_command_per_point(tmp_path, capsys):
    out = tmp_path / "sw"
    rc = run_cli(["sweep", "--out", str(out), "--backend", "k8s", "--depth", "4,64",
                  "--seeds", "0,1", "--config", str(REPO / "presets/paper/ant_big_maze.yaml"),
                  "--apply-args", "--overlay k8s/overlays/gpu"])
    assert rc == 0
    files = sorted((out / "k8s").glob("*.yaml"))
    assert len(files) == 4
    for f in files:
        cfg = C.load(str(f))
        assert cfg.env.name == "ant_big_maze" and cfg.learner.total_env_steps == 100_000_000
        assert cfg.run.run_dir == f"/runs/sw/{f.stem}"
    lines = [l for l in (out / "k8s" / "apply.sh").read_text().splitlines()
             if l.startswith("crl cluster apply")]
    assert sorted(lines) == sorted(f'crl cluster apply --config "$HERE/{f.name}" --name {f.stem}'
                                   " --overlay k8s/overlays/gpu" for f in files)
    # The script runs: with `crl` stubbed to print its arguments, every config path resolves.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "crl").write_text('#!/bin/sh\necho "$@"\n')
    (stub / "crl").chmod(0o755)
    import os
    ran = subprocess.run(["bash", str(out / "k8s" / "apply.sh")], capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}"), check=True)
    for line in ran.stdout.splitlines():
        assert Path(line.split()[3]).exists() and line.split()[2] == "--config"
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["backend"] == "k8s" and len(meta["points"]) == 4

    # Collect: histories written by the cluster's evaluators land in the sweep, report reads them.
    remote = tmp_path / "remote"
    for i, f in enumerate(files):
        (remote / f.stem).mkdir(parents=True)
        rows = [{"params_version": v, "time_at_goal": float(v + 10 * i)} for v in range(6)]
        (remote / f.stem / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(["sweep", "--out", str(out), "--backend", "k8s", "--depth", "4,64",
                    "--seeds", "0,1", "--config", str(REPO / "presets/paper/ant_big_maze.yaml"),
                    "--collect-from", str(remote)]) == 0
    res = RP.build_report(str(out), str(tmp_path / "rep"), figures=False)
    assert [s["n"] for s in res["settings"]] == [2, 2]


def test_local_sweep_trains_saves_params_and_resumes(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--out", str(out), "--depth", "4", "--seeds", "3", "--num-evals", "2",
            "--jobs", "1"] + [f"--set={k}={v}" for k, v in TINY.items()]
    assert run_cli(argv) == 0
    (run_dir,) = list((out / "runs").iterdir())
    assert run_dir.name == "point-maze-u-d4-w16-b32-s3"
    hist = R.load_history(str(run_dir))
    assert [h["env_steps"] for h in hist] == [0, 1600, 2400]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    actor, critic, meta = R.load_params(str(run_dir / R.PARAMS_FILE))
    assert meta["env_steps"] == 2400 and meta["sgd_steps"] > 0
    assert critic["sa_encoder"]["trunk"]["blocks"]["layer0"]["Dense_0"]["kernel"].shape == (1, 16, 16)
    cfg = R.load_config(str(run_dir))
    assert cfg.run.seed == 3 and cfg.network.critic.width == 16
    capsys.readouterr()
    assert run_cli(argv) == 0                           # second time: nothing left to do
    assert "done already, skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------------ report
def make_run(root: Path, name: str, overrides: dict, values, steps=None, wall=60.0):
    d = root / "runs" / name
    d.mkdir(parents=True)
    cfg = C.load(overrides=overrides)
    C.dump(cfg, str(d / "config.yaml"))
    steps = steps or [1000 * i for i in range(len(values))]
    with open(d / "history.jsonl", "w") as f:
        for s, v in zip(steps, values):
            f.write(json.dumps({"env_steps": s, "time_at_goal": v, "wall_s": wall}) + "\n")
    (d / "result.json").write_text(json.dumps({"status": "ok", "wall_s": wall}))
    return d


def test_report_numbers_and_figures(tmp_path):
    # depth 4: last-5 means 10, 20, 30 over seeds; depth 16: 40, 40 (SE 0); other batch: one seed.
    base = {"env.name": "point_maze_u"}
    for seed, v in enumerate([10, 20, 30]):
        make_run(tmp_path, f"d4-s{seed}", {**base, "run.seed": seed},
                 [0, 0, 0, v - 2, v + 2, v - 1, v + 1, v])
    for seed in range(2):
        make_run(tmp_path, f"d16-s{seed}", {**base, "run.seed": seed, "network.critic.depth": 16,
                                            "network.actor.depth": 16}, [5, 40, 40, 40, 40, 40])
    make_run(tmp_path, "d4-b128", {**base, "algo.batch_size": 128}, [1, 2, 3, 4, 5, 6, 7])
    make_run(tmp_path, "d16-b128", {**base, "algo.batch_size": 128, "network.critic.depth": 16,
                                    "network.actor.depth": 16}, [7, 7, 7, 7, 7, 9])
    (tmp_path / "runs" / "empty").mkdir()
    C.dump(C.load(), str(tmp_path / "runs" / "empty" / "config.yaml"))
    out = tmp_path / "report"
    assert run_cli(["report", str(tmp_path), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    by = {(s["fields"]["network.critic.depth"], s["fields"]["algo.batch_size"]): s
          for s in res["settings"]}
    assert set(by) == {(4, 256), (16, 256), (4, 128), (16, 128)}
    s = by[(4, 256)]
    assert s["per_seed"] == pytest.approx([10, 20, 30]) and s["mean"] == pytest.approx(20)
    assert s["se"] == pytest.approx(10 / math.sqrt(3))               # std 10, n 3
    assert by[(16, 256)]["mean"] == pytest.approx(40) and by[(16, 256)]["se"] == pytest.approx(0)
    assert by[(4, 128)]["mean"] == pytest.approx(5) and math.isnan(by[(4, 128)]["se"])
    md = (out / "report.md").read_text()
    assert "| point_maze_u | 4 | 256 | 256 | 3 | 20.0 ± 5.8 | 10.0, 20.0, 30.0 | 7,000 | 1.0 |" in md
    assert "| point_maze_u | 16 | 256 | 128 | 1 | 7.4 |" in md
    assert "empty" in md                                               # listed as left out
    from PIL import Image
    for name in ("learning_curves.png", "depth_scaling.png", "depth_vs_width.png",
                 "batch_by_depth.png"):
        img = Image.open(out / name)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        assert img.size == (720, 440) and len(np.unique(pixels, axis=0)) > 10, name
        assert f"({name})" in md


def test_report_skips_figures_whose_axis_has_one_value(tmp_path):
    make_run(tmp_path, "a", {"run.seed": 0}, [1, 2, 3])
    make_run(tmp_path, "b", {"run.seed": 1}, [3, 4, 5])
    out = tmp_path / "rep"
    res = RP.build_report(str(tmp_path), str(out))
    assert len(res["settings"]) == 1 and res["settings"][0]["mean"] == pytest.approx(3)
    md = (out / "report.md").read_text()
    assert "Batch size by depth, point_maze_u: skipped (one batch size)" in md
    assert not (out / "batch_by_depth.png").exists() and (out / "learning_curves.png").exists()


def test_mean_se_and_last_k():
    assert RP.mean_se([1, 2, 3]) == pytest.approx((2.0, 1 / math.sqrt(3), 3))
    assert RP.last_k_mean([{"time_at_goal": v} for v in range(10)], 5) == 7.0
    assert RP.last_k_mean([{"time_at_goal": 4}], 5) == 4.0


# ------------------------------------------------------------------------------ critic map
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A hand-built run directory: tiny untrained nets saved as params.npz."""
    d = tmp_path_factory.mktemp("run") / "tiny-d4"
    d.mkdir()
    cfg = C.load(overrides={**TINY, "run.run_dir": str(d)})
    C.dump(cfg, str(d / "config.yaml"))
    actor, critic = CM._init_params(cfg, seed=1)
    R.save_params(str(d / R.PARAMS_FILE), actor, critic, {"env_steps": 123})
    return d


def test_params_npz_round_trip(tiny_run):
    actor, critic, meta = R.load_params(str(tiny_run / R.PARAMS_FILE))
    cfg = R.load_config(str(tiny_run))
    a0, c0 = CM._init_params(cfg, seed=1)
    for x, y in zip(*(R.flatten_tree(t).items() for t in (c0, critic))):
        assert x[0] == y[0] and np.array_equal(np.asarray(x[1]), y[1])
    assert meta == {"env_steps": 123}


def test_learned_distance_modes_match_the_networks(tiny_run):
    import jax.numpy as jnp
    from crl.envs import make_env
    from crl.networks import CRLNetworks
    cfg = R.load_config(str(tiny_run))
    actor, critic, _ = R.load_params(str(tiny_run / R.PARAMS_FILE))
    env = make_env(cfg.env.name)
    nets = CRLNetworks(cfg.network, env.state_dim, env.action_size, env.goal_dim)
    states = CM.probe_states(env, np.array([[0.0, 0.0], [0.3, 1.0], [2.0, 0.1]]))
    goals = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
    zero = CM.learned_distances(nets, actor, critic, states, goals, "zero")
    best = CM.learned_distances(nets, actor, critic, states, goals, "best")
    mean = CM.learned_distances(nets, actor, critic, states, goals, "mean")
    pol = CM.learned_distances(nets, actor, critic, states, goals, "policy")
    assert zero.shape == best.shape == mean.shape == pol.shape == (2, 3)
    phi = nets.encode_sa(critic, jnp.asarray(states), jnp.zeros((3, 2)))
    psi = nets.encode_g(critic, jnp.asarray(goals))
    manual = np.linalg.norm(np.asarray(phi)[None] - np.asarray(psi)[:, None], axis=-1)
    assert np.allclose(zero, manual, atol=1e-5)
    assert np.all(best <= zero + 1e-6) and np.all(best <= mean + 1e-6)


def test_critic_map_command_shapes_walls_and_outputs(tiny_run, tmp_path, capsys):
    out = tmp_path / "cm"
    rc = run_cli(["critic-map", str(tiny_run), f"{tiny_run}@init", "--out", str(out),
                  "--per-cell", "4", "--panels", "all"])
    assert rc == 0
    arrays = np.load(out / "critic_map.npz")
    walls = np.kron(np.array([[c == "#" for c in row] for row in
                              ["#####", "#R..#", "###.#", "#...#", "#####"]]), np.ones((4, 4), bool))
    for k in ("panel0", "panel1"):
        img = arrays[k]
        assert img.shape == (20, 20)
        assert np.all(np.isnan(img[walls])) and np.all(np.isfinite(img[~walls]))
        assert np.all(img[~walls] >= 0)
    res = json.loads((out / "critic_map.json").read_text())
    assert [r["kind"] for r in res] == ["final", "untrained"]
    assert res[0]["goal_cell"] == [3, 1]                      # farthest from the start by path
    for r in res:
        for key in ("rho_path", "rho_line", "all_goals_rho_path", "rho_path_cells"):
            assert -1 <= r[key] <= 1
    from PIL import Image
    img = Image.open(out / "critic_map.png")
    assert img.size[0] > 2 * img.size[1] * 0.8                  # two panels side by side
    md = (out / "critic_map.md").read_text()
    assert "| point_maze_u | 4 | 16 | 32 | final | 1 |" in md
    assert "rho path" in capsys.readouterr().out.replace("_", " ")


def test_critic_map_rejects_a_goal_in_a_wall(tiny_run, tmp_path):
    assert run_cli(["critic-map", str(tiny_run), "--out", str(tmp_path / "x"),
                    "--goal", "2,1"]) == 2


# ------------------------------------------------------------------------------ render
def test_render_point_maze_png_and_svg(tiny_run, tmp_path):
    out = tmp_path / "r"
    assert run_cli(["render", str(tiny_run), "--out", str(out), "--episodes", "3",
                    "--steps", "40", "--goal", "1,3"]) == 0
    root = ET.parse(out / "trajectories.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 3
    for pl in lines:
        assert len(pl.get("points").split()) == 41                # start + 40 steps
    walls = [r for r in root.findall(f"{ns}rect") if r.get("fill") == "#3c3c3c"]
    assert len(walls) == 18                                        # wall cells of the U layout
    eps = json.loads((out / "episodes.json").read_text())["episodes"]
    assert len(eps) == 3 and all(e["goal"] == [0.0, 2.0] for e in eps)   # cell (1,3) from (1,1)
    from PIL import Image
    assert Image.open(out / "trajectories.png").size[0] == 5 * 80
    gif = Image.open(out / "episodes.gif")            # the episodes moving, no server needed
    assert gif.is_animated and gif.n_frames >= 20 and gif.size[0] == 5 * 80
    first = gif.convert("RGB").tobytes()
    gif.seek(gif.n_frames - 1)
    assert gif.convert("RGB").tobytes() != first      # the agents moved


def test_evaluate_a_checkpoint_offline_on_both_goal_sets(tiny_run, tmp_path, capsys):
    """`crl evaluate --checkpoint RUN`: no learner; the training goal set, and the evaluation
    goal set where the env has one (the ant U4 maze: the authors' _eval layout); a row appended
    per call."""
    out = tmp_path / "ev.jsonl"
    assert run_cli(["evaluate", "--checkpoint", str(tiny_run), "--episodes", "4",
                    "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train goals: time_at_goal=" in text and "eval goals" not in text
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["episodes"] == 4 and set(row["goal_sets"]) == {"train"}
    ant = tmp_path / "ant-u4"
    ant.mkdir()
    cfg = C.load(overrides={**TINY, "env.name": "ant_u4_maze", "env.episode_length": 40,
                            "replay.min_size_steps": 8000, "replay.capacity_steps": 16000,
                            "run.run_dir": str(ant)})
    C.dump(cfg, str(ant / "config.yaml"))
    actor, critic = CM._init_params(cfg, seed=1)
    R.save_params(str(ant / R.PARAMS_FILE), actor, critic, {"env_steps": 5})
    assert run_cli(["evaluate", "--checkpoint", str(ant), "--episodes", "2",
                    "--out", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[-1])
    assert set(row["goal_sets"]) == {"train", "eval"} and row["env"] == "ant_u4_maze"
    for r in row["goal_sets"].values():
        assert 0 <= r["time_at_goal"] <= 40 and 0 <= r["success"] <= 1
    assert run_cli(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2   # named error
