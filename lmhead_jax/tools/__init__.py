"""Layer 4, tools: standalone utilities over a config or a checkpoint.

plan (fit and compile a config for a TPU slice: `python -m lmhead_jax.plan`), costs (parameter and
FLOP counts), hf (import a local Hugging Face checkpoint).
Imports: core, data, training.
"""
