"""Layer 2, data: grain pipelines (SpamLang and token-file sources, batching, per-process sharding)
the tokenizer CLI `python -m lmhead_jax.data.prepare` (it only writes token directories), and hf,
the import of local Hugging Face checkpoints into parameters.
Imports: core.
"""

from lmhead_jax.data.pipeline import global_batch, make_dataset, make_source
from lmhead_jax.data.spamlang import SpamLangSource
from lmhead_jax.data.tokens import TokenFileSource, read_index, write_token_dir

__all__ = ["SpamLangSource", "TokenFileSource", "global_batch", "make_dataset", "make_source",
           "read_index", "write_token_dir"]
