"""Test-wide setup: two forced CPU devices so the pmap paths run on a machine without GPUs.

XLA reads the flag once, when JAX initialises its backend, so it is set before anything imports
JAX. Tests that need a single device simply use device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# crl config's memory estimate keeps its compiled analyses in a cache: not the user's, in tests.
os.environ.setdefault("CRL_MEMORY_CACHE", __import__("tempfile").mkdtemp(prefix="crl-memory-"))


# Test tiers (docs/design.md): every test module belongs to one, by what it starts.
#   unit         pure code and servers inside the test process: the inner loop, a few minutes
#                (`uv run --frozen pytest -m "unit and not slow"`);
#   envs         environment physics, compiled (Brax/MJX compiles take tens of seconds each);
#   integration  real role processes and servers on 127.0.0.1;
#   e2e          whole runs (`crl local`, the driver learning, benchmarks);
#   tools        outside tools: kubectl, a kube-apiserver, promtool, Prometheus, Chromium.
# CI runs all of them (the README's test command). A module missing here fails collection, so a
# new test file is placed in a tier on purpose.
TIERS = {
    "unit": ["test_config", "test_networks", "test_learning", "test_relabel", "test_point_maze",
             "test_placement", "test_tensorboard", "test_dockerfile", "test_presets",
             "test_params_service", "test_bad_input", "test_learner_checkpoint",
             "test_gpu_install", "test_layering", "test_wandb", "test_params_follower",
             "test_learner_loop", "test_metrics"],
    "envs": ["test_brax_envs", "test_arm_envs", "test_quiet_mjx"],
    "integration": ["test_replay", "test_replay_writer", "test_actor_role", "test_learner_resume",
                    "test_learner_publisher", "test_learner_finish", "test_evaluator",
                    "test_security", "test_load", "test_launcher", "test_faults_checkpoint",
                    "test_gpu_check"],
    "e2e": ["test_local_e2e", "test_local_ant", "test_faults_local", "test_learning_point_maze",
            "test_benchmarks_quick", "test_paper_schedule", "test_research", "test_memory"],
    "tools": ["test_k8s_manifests", "test_k8s_apiserver", "test_monitoring_rules",
              "test_monitoring_live", "test_research_render", "test_cluster_cli"],
}
TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    import pytest
    missing = set()
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        tier = TIER_OF.get(module)
        if tier is None:
            missing.add(module)
        else:
            item.add_marker(getattr(pytest.mark, tier))
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: put {sorted(missing)} in a tier of TIERS")
