"""Test-wide setup: two forced CPU devices so the pmap paths run on a machine without GPUs.

XLA reads the flag once, when JAX initialises its backend, so it is set before anything imports
JAX. Tests that need a single device simply use device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
