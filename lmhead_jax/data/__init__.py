"""Layer 2, data: grain pipelines (SpamLang and token-file sources, batching, per-process sharding)
the tokenizer CLI `python -m lmhead_jax.data.prepare` (it only writes token directories), and hf,
the import of local Hugging Face checkpoints into parameters.
Imports: core.
"""
