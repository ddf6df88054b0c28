import lmhead_jax  # noqa: F401  (sets OPENBLAS_NUM_THREADS before jax loads OpenBLAS)
