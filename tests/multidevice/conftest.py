"""Tests here see 8 fake CPU devices: run them in a process of their own, `pytest tests/multidevice`
(tests/test_multidevice.py does so for the whole suite)."""

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
