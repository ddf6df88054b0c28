"""lmhead_jax: the LM head as a gradient bottleneck, in JAX."""

__version__ = "0.1.0"
