"""Layer 5, tools: standalone utilities over a config.

plan (fit a config to a TPU slice: `python -m lmhead_jax.plan`), aot (its XLA:TPU compile with
libtpu, no TPU needed), costs (parameter and FLOP counts).
Imports: core, data, training, analysis.
"""
