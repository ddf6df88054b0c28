"""Layer 1, core: the functional model and the object of study, plain functions over pytrees.

config (ModelConfig, HeadConfig), params (specs + logical axes), model (5 families as flags), heads
(linear, tied, factorized, and mos: Mixture of Softmaxes), backward (head.backward rules),
regularize (head regularizers), loss (dense, chunked), bottleneck (the gradient-bottleneck
statistics and head_loss), checks, flax_heads (the [V, D] head matrix of Flax layers).
Imports: nothing from lmhead_jax outside core.
"""
