"""crl.memory: the learner's device-memory estimate that `crl config` prints.

Small networks (width 32, batch 64, point-maze sizes) so each compile takes seconds:
- "direct" is XLA's own memory analysis of the learner's compiled update (the same
  `update_many` compiled independently here): equal to the byte, and its parts add up (params and
  Adam moments exact from the parameter count);
- "fit" (temporaries fitted on depths 16 and 32, extrapolated to 64) against a compile at 64:
  measured 0.13% apart on the peak without remat (jax 0.4.34, CPU); the test allows 1%;
- the warning fires when the estimate exceeds the target and names the remat setting that fits.
"""
import time

import jax
import pytest

from crl import config as C
from crl import memory as M
from crl.learning import make_learner
from crl.networks import count_params

S, A, GOAL = 4, 2, (0, 1)      # point-maze sizes
FIT_TOLERANCE = 0.01           # |fit - direct| / direct on the peak, depth 64 from 16 and 32


def small_cfg(depth: int, remat: bool = False, **extra) -> C.Config:
    o = {"env.name": "point_maze_u", "algo.batch_size": 64, "learner.segments_per_call": 8,
         "learner.minibatches_per_call": 4, "replay.segment_length": 100, "network.repr_dim": 16,
         **extra}
    for n in ("actor", "critic"):
        o.update({f"network.{n}.width": 32, f"network.{n}.depth": depth,
                  f"network.{n}.remat": remat})
    return C.load(overrides=o)


def xla_peak(cfg: C.Config) -> int:
    """XLA's analysis of the learner's update compiled here, independently of crl.memory."""
    learner = make_learner(cfg, S, A, GOAL)
    state = jax.eval_shape(learner.init, jax.random.PRNGKey(0))
    n, t = cfg.learner.segments_per_call, cfg.segment_length
    seg = {"state": jax.ShapeDtypeStruct((n, t, S), "float32"),
           "action": jax.ShapeDtypeStruct((n, t, A), "float32"),
           "episode_id": jax.ShapeDtypeStruct((n, t), "int32")}
    m = learner.update_many.lower(state, seg).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def test_direct_equals_xla_and_fit_extrapolates_to_a_held_out_depth():
    t0 = time.perf_counter()
    cfg = small_cfg(64)
    truth = xla_peak(cfg)
    direct = M.estimate(cfg, S, A, GOAL, method="direct")
    assert direct.method == "direct" and direct.total == truth
    counts = count_params(cfg.network, S, A, len(GOAL))
    n_params = counts["actor"] + counts["critic"]
    assert direct.params == 4 * n_params                      # float32
    assert 2 * direct.params <= direct.adam <= 2 * direct.params + 64   # mu, nu (+ counters)
    assert direct.data == 8 * 100 * (S + A + 1) * 4           # one call's segments, exactly
    fit = M.estimate(cfg, S, A, GOAL, method="fit", points=(16, 32))
    assert [(p.actor_depth, p.critic_depth) for p in fit.points] == [(16, 16), (32, 32)]
    err = abs(fit.total - truth) / truth
    print(f"\nfit 16,32 -> 64: {fit.total:,} vs direct {truth:,} bytes: {100 * err:.2f}% "
          f"({time.perf_counter() - t0:.0f} s)")
    assert err < FIT_TOLERANCE
    # exact parts do not depend on the method
    assert (fit.params, fit.adam, fit.data) == (direct.params, direct.adam, direct.data)


def test_fit_depths_follow_the_actor_critic_ratio():
    assert M.fit_depths(512, 1024) == [(32, 64), (64, 128), (128, 256)]
    assert M.fit_depths(1024, 1024) == [(64, 64), (128, 128), (256, 256)]
    assert M.fit_depths(4, 1024) == [(4, 64), (4, 128), (4, 256)]
    assert M.fit_depths(1024, 12) == [(64, 4), (128, 4), (256, 4)]
    assert M.linear_fit([1, 2, 3], [3, 5, 7]) == pytest.approx((2.0, 1.0))


def _est(remat, total_gib):
    gib = M.GiB
    return M.Estimate(remat=(remat, remat), actor_depth=512, critic_depth=1024, params=gib // 2,
                      adam=gib, data=gib // 8, other_state=0,
                      temp=int(total_gib * gib) - gib // 2 - gib - gib // 8, unaliased_output=0,
                      method="fit", points=(), fit_residual=0.001)


def test_warning_fires_when_the_estimate_exceeds_the_target(monkeypatch, capsys):
    off, on = _est(False, 11.0), _est(True, 4.0)
    gib = M.GiB
    assert M.warnings_for([off, on], 80 * gib, (False, False)) == []
    w = M.warnings_for([off, on], 8 * gib, (False, False))
    assert len(w) == 1 and "exceeds the target 8.0 GiB" in w[0] and "remat on fits" in w[0]
    assert "--network.critic.remat true" in w[0]
    assert M.warnings_for([off, on], 8 * gib, (True, True)) == []   # configured setting fits
    w = M.warnings_for([off, on], 2 * gib, (True, True))
    assert len(w) == 1 and "no remat setting fits" in w[0]
    assert M.recommendation([off, on], 40 * gib).startswith("remat off fits")
    assert M.recommendation([off, on], 8 * gib).startswith("remat off does not fit, remat on does")

    # The target: the config field when set; without a GPU the 80 GiB default.
    cfg = small_cfg(4, **{"learner.device_memory_gib": 8})
    assert M.target_bytes(cfg) == (8 * gib, "learner.device_memory_gib")
    assert M.target_bytes(small_cfg(4), jax.devices("cpu")[0])[0] == 80 * gib
    with pytest.raises(C.ConfigError, match="learner.device_memory_gib"):
        small_cfg(4, **{"learner.device_memory_gib": -1})

    # What `crl config` prints (stderr), with the compiles replaced by the figures above.
    monkeypatch.setattr(M, "estimate", lambda c, s, a, g, remat: off if not remat[0] else on)
    M.print_report(cfg, __import__("sys").stderr)
    err = capsys.readouterr().err
    assert "remat off" in err and "11.00 GiB" in err and "4.00 GiB" in err
    assert "WARNING: the learner's estimated device memory 11.00 GiB (remat off) exceeds" in err


def test_analyses_are_cached_per_program_and_reused_without_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("CRL_MEMORY_CACHE", str(tmp_path))
    cfg = small_cfg(4)
    first = M.analyse(cfg, S, A, GOAL, 4, 4, (False, False))
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_compile(*a):
        raise AssertionError("compiled although the analysis is cached")
    monkeypatch.setattr(M, "_shapes", no_compile)
    assert M.analyse(cfg, S, A, GOAL, 4, 4, (False, False)) == first
    # A run directory is not part of the program; a width, a remat or a batch is.
    assert M.analyse(C.override(cfg, {"run.run_dir": str(tmp_path / "x")}), S, A, GOAL, 4, 4,
                     (False, False)) == first
    for other in ({"network.critic.width": 64}, {"algo.batch_size": 32}):
        with pytest.raises(AssertionError, match="compiled"):
            M.analyse(C.override(cfg, other), S, A, GOAL, 4, 4, (False, False))
    with pytest.raises(AssertionError, match="compiled"):
        M.analyse(cfg, S, A, GOAL, 4, 4, (True, True))
    monkeypatch.setenv("CRL_MEMORY_CACHE", "off")
    with pytest.raises(AssertionError, match="compiled"):
        M.analyse(cfg, S, A, GOAL, 4, 4, (False, False))
