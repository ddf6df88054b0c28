"""The token data that the measurement experiments read (`source`), tokenized once and cached.

Data (`source`): `data.path` (a token directory) if set; else `data.text` (comma-separated
.txt/.jsonl/.parquet files or directories) tokenized with the model's tokenizer.json; else a
run's own data (its eval split when it has one); else the Python standard library corpus
(`data.stdlib`), with the model's tokenizer or, for models that have none, a byte-level BPE of
`model.vocab_size` ids trained on it. The stdlib corpus keeps 5% of its documents as a val
split, which is what gets measured (and what a `train.steps` model never trains on).
`data.text` is tokenized once into WORKDIR/tokens/<key>/; the stdlib corpus into the shared
cache (`lmhead_jax.runs.cache`), keyed by tokenizer or BPE size, corpus settings and Python
version.
"""

import hashlib
import pathlib
import platform

import ml_collections

from lmhead_jax.analysis.subjects import Subject
from lmhead_jax.data import pipeline, prepare
from lmhead_jax.runs import cache


def split_list(value) -> list[str]:
  """A comma-separated string (or a list) as its non-empty, stripped items."""
  items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
  return [s.strip() for s in items if s.strip()]


def token_dir(cfg, workdir: pathlib.Path, name: str, tokenizer: str | None, vocab_size: int,
               split: str | None = None) -> str:
  """Tokenizes data.text or the stdlib corpus (once, cached) and returns a split's directory."""
  d = cfg.data
  inputs = split_list(d.text)
  if inputs:
    if tokenizer is None:
      raise ValueError(f"data.text needs a tokenizer, but model {name!r} has no tokenizer.json; "
                       "pass data.path (a token directory) instead")
  elif not d.stdlib:
    raise ValueError(f"model {name!r} has no data: set data.path, data.text or data.stdlib")
  elif tokenizer is None and vocab_size < 257:
    raise ValueError(
        f"model {name!r} has no tokenizer.json, and its vocab_size={vocab_size} is too small for "
        "the byte-level BPE that would tokenize the stdlib corpus for it (256 bytes + 1 EOS id "
        f"needs >= 257). Pass --config.data.path=<token dir> (made by python -m {prepare.__name__}"
        " with this model's tokenizer), use a checkpoint that has its tokenizer.json, or, for "
        "fresh and trained models, set --config.model.vocab_size >= 257")
  tok = (hashlib.sha256(pathlib.Path(tokenizer).read_bytes()).hexdigest() if tokenizer
         else f"bpe{vocab_size}")
  max_chars = int(d.max_chars) or None
  if inputs:
    root, val_fraction = workdir / "tokens", 0.0
    key = dict(text=inputs, text_field=d.text_field, max_chars=max_chars, tokenizer=tok)
  else:
    root, val_fraction = cache.cache_root(cfg.cache_dir) / "tokens", 0.05
    key = dict(corpus="stdlib", python=platform.python_version(), max_chars=max_chars,
               val_fraction=val_fraction, tokenizer=tok)
  build = lambda stage: prepare.prepare(
      stage, inputs, tokenizer=tokenizer, stdlib=not inputs,
      train_bpe_vocab=None if tokenizer else vocab_size, max_chars=max_chars,
      text_field=d.text_field, val_fraction=val_fraction)
  splits = ("train", "val") if val_fraction else ("train",)
  need = ("tokenizer.json",) + tuple(f"{split_name}/index.json" for split_name in splits)
  out = cache.cached(root, key, build, need)
  return str(out / (split or ("train" if inputs else "val")))


def source(cfg, subject: Subject, workdir):
  """The windows of `data.seq_len` tokens (a grain-compatible source) that `subject` is measured
  on."""
  data = ml_collections.ConfigDict(cfg.data.to_dict())
  if not (data.path or split_list(data.text)) and subject.data is not None:
    data = ml_collections.ConfigDict(subject.data.to_dict())
    data.seq_len = cfg.data.seq_len
    split = "eval" if data.kind != "tokens" or data.eval_path else "train"
    return pipeline.make_source(pipeline.DataConfig.of(data), subject.model_cfg.vocab_size,
                                split=split, seed=cfg.seed)
  if not data.path:
    data.path = token_dir(cfg, pathlib.Path(workdir), subject.name, subject.tokenizer,
                           subject.model_cfg.vocab_size)
  data.kind = "tokens"
  return pipeline.make_source(pipeline.DataConfig.of(data), subject.model_cfg.vocab_size,
                              seed=cfg.seed)
