"""Layer 2, data: grain pipelines (SpamLang and token-file sources, batching, per-process sharding)
and the tokenizer CLI `python -m lmhead_jax.data.prepare`, which stays here rather than in tools:
it only writes token directories (data.tokens), and analysis.subjects builds its corpus with it.
Imports: nothing from lmhead_jax outside data.
"""

from lmhead_jax.data.pipeline import global_batch, make_dataset, make_source
from lmhead_jax.data.spamlang import SpamLangSource
from lmhead_jax.data.tokens import TokenFileSource, read_index, write_token_dir

__all__ = ["SpamLangSource", "TokenFileSource", "global_batch", "make_dataset", "make_source",
           "read_index", "write_token_dir"]
