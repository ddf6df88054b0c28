"""Layer 6, tools: plans for a config on a slice, checked offline.

plan (fit a config to a TPU or GPU slice, tune its layout: `python -m lmhead_jax.plan`), aot (its
XLA:TPU and XLA:GPU compiles without a device), collectives (the bytes a compiled program sends),
costs (parameter, FLOP and collective counts), chips (the chip table).
Imports: core, data, training, analysis, runs.
"""
