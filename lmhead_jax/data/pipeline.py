"""Grain pipelines: source -> shuffle -> repeat -> per-process batches -> prefetching iterator.

Batches are dicts of numpy arrays `{"inputs": int32[b, L], "targets": int32[b, L],
"mask": float32[b, L]}`. Global batch i holds records [i * G, (i + 1) * G) of the shuffled,
repeated stream; process p reads only its contiguous block [i * G + p * b, i * G + (p + 1) * b)
with b = G / process_count, so stacking the local batches in process order gives the
single-process global batch. The iterator state is grain's `{"next_index": int}`, plain JSON.
"""

import dataclasses

import grain
import jax
import numpy as np

from lmhead_jax.data.spamlang import SpamLangSource
from lmhead_jax.data.tokens import TokenFileSource

KINDS = ("spamlang", "tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a source reads: the `data` group's keys that `make_source` uses."""

  kind: str
  seq_len: int
  path: str = ""
  eval_path: str = ""
  window_mode: str = "random"
  bos_id: int = 0
  exclude_first: bool = True

  @classmethod
  def of(cls, data) -> "DataConfig":
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def make_source(data_cfg: DataConfig, vocab_size: int, *, split: str = "train", seed: int = 0):
  """The source of a DataConfig for a split.

  SpamLang splits are independent streams. Token dirs come from `data.path` (train) or
  `data.eval_path` (eval, always in sequential windows) and are checked against `vocab_size`.
  """
  if data_cfg.kind == "spamlang":
    return SpamLangSource(vocab_size, data_cfg.seq_len, seed=seed, split=split,
                          bos_id=data_cfg.bos_id, exclude_first=data_cfg.exclude_first)
  if data_cfg.kind != "tokens":
    raise ValueError(f"data.kind={data_cfg.kind!r} is not one of {KINDS}")
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r} is not 'train' or 'eval'")
  key = "path" if split == "train" else "eval_path"
  if not getattr(data_cfg, key):
    raise ValueError(f"data.{key} is empty: data.kind='tokens' needs a token directory for "
                     f"the {split} split")
  mode = data_cfg.window_mode if split == "train" else "sequential"
  source = TokenFileSource(getattr(data_cfg, key), data_cfg.seq_len, mode=mode, seed=seed)
  source.check_compatible(vocab_size)
  return source


def make_dataset(source, *, global_batch_size: int, seed: int, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Shuffled (a new permutation each epoch), repeated forever, this process's batches."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if global_batch_size % n:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={n}")
  if not 0 <= p < n:
    raise ValueError(f"process_index={p} is outside [0, process_count={n})")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat().batch(global_batch_size // n, drop_remainder=True)[p::n]
  return ds.to_iter_dataset(
      read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """Assembles each process's local rows into global `jax.Array`s laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
