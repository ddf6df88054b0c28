"""lmhead_jax: the LM head as a gradient bottleneck, in JAX."""

import os

# XLA:CPU runs QR/SVD (the bottleneck's range map) through OpenBLAS, whose threads spin against
# XLA's own thread pool: a step with the metrics ran 2x slower on 2 cores. One OpenBLAS thread
# fixes it. This only takes effect if lmhead_jax is imported before jax/numpy load OpenBLAS
# (the experiment and benchmark entry points do); an explicit setting is respected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
