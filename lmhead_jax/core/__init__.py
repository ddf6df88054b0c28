"""Layer 1, core: the functional model and the object of study, plain functions over pytrees.

config (ModelConfig, HeadConfig), params (specs + logical axes), model (5 families as flags), heads,
loss (dense, chunked), bottleneck (the gradient-bottleneck statistics), checks.
Imports: nothing from lmhead_jax outside core.
"""
