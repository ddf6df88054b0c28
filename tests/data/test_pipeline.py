import json
import threading

import numpy as np
import pytest

from lmhead_jax.data.pipeline import make_dataset, make_source
from lmhead_jax.data.spamlang import SpamLangSource
from lmhead_jax.data.tokens import TokenFileSource, write_token_dir
from lmhead_jax.runs.experiment import base_config


class IndexSource:
  """Record i is {"i": i}; remembers which records were read."""

  def __init__(self, n):
    self.n, self.read, self._lock = n, [], threading.Lock()

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    with self._lock:
      self.read.append(i)
    return {"i": np.int64(i)}


def _take(ds, k, it=None):
  it = it or iter(ds)
  return [next(it) for _ in range(k)]


def _equal(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_epochs_are_fresh_permutations():
  ds = make_dataset(IndexSource(12), global_batch_size=4, seed=5, process_count=1,
                    process_index=0)
  ids = np.concatenate([b["i"] for b in _take(ds, 9)])
  epochs = ids.reshape(3, 12)
  for e in epochs:
    assert sorted(e) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  unshuffled = make_dataset(IndexSource(12), global_batch_size=4, seed=5, shuffle=False,
                            process_count=1, process_index=0)
  np.testing.assert_array_equal(np.concatenate([b["i"] for b in _take(unshuffled, 6)]),
                                np.tile(np.arange(12), 2))


def test_deterministic_given_seed():
  src = SpamLangSource(64, 8, seed=1)
  kw = dict(global_batch_size=16, process_count=1, process_index=0)
  a = _take(make_dataset(src, seed=3, **kw), 5)
  assert _equal(a, _take(make_dataset(SpamLangSource(64, 8, seed=1), seed=3, **kw), 5))
  assert not _equal(a, _take(make_dataset(src, seed=4, **kw), 5))
  b = a[0]
  assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
      "inputs": (np.int32, (16, 8)), "targets": (np.int32, (16, 8)),
      "mask": (np.float32, (16, 8))}
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_process_shards_interleave_into_the_global_batch():
  n, g = 1000, 8
  single = _take(make_dataset(IndexSource(n), global_batch_size=g, seed=2, process_count=1,
                              process_index=0), 6)
  sources = [IndexSource(n), IndexSource(n)]
  per_process = [_take(make_dataset(s, global_batch_size=g, seed=2, process_count=2,
                                    process_index=p), 6) for p, s in enumerate(sources)]
  for i in range(6):
    np.testing.assert_array_equal(
        np.concatenate([per_process[0][i]["i"], per_process[1][i]["i"]]), single[i]["i"])
  read = [set(s.read) for s in sources]
  assert not read[0] & read[1]  # each process reads only its own records
  for p in range(2):
    assert {int(x) for b in per_process[p] for x in b["i"]} <= read[p]


def test_iterator_state_round_trip():
  ds = make_dataset(SpamLangSource(50, 4, seed=0, num_records=20), global_batch_size=6,
                    seed=1, process_count=1, process_index=0)
  it = iter(ds)
  _take(ds, 5, it)  # crosses an epoch boundary (20 records)
  state = json.loads(json.dumps(it.get_state()))
  after = _take(ds, 7, it)
  it2 = iter(ds)
  it2.set_state(state)
  assert _equal(_take(ds, 7, it2), after)


def test_batch_size_errors():
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
    make_dataset(IndexSource(10), global_batch_size=6, seed=0, process_count=4, process_index=0)
  with pytest.raises(ValueError, match="process_index=2 is outside"):
    make_dataset(IndexSource(10), global_batch_size=4, seed=0, process_count=2, process_index=2)


def test_make_source_from_config(tmp_path):
  cfg = base_config().data
  src = make_source(cfg, 128, seed=4)
  assert isinstance(src, SpamLangSource) and src[0]["inputs"].shape == (cfg.seq_len,)
  ev = make_source(cfg, 128, split="eval", seed=4)
  assert [src.symbol(i) for i in range(50)] != [ev.symbol(i) for i in range(50)]

  write_token_dir(tmp_path / "train", [np.arange(500) % 100], vocab_size=100, tokenizer="t")
  cfg.kind, cfg.path, cfg.seq_len = "tokens", str(tmp_path / "train"), 9
  src = make_source(cfg, 100, seed=0)
  assert isinstance(src, TokenFileSource) and len(src) == 500 // 10 - 1
  with pytest.raises(ValueError, match="data.eval_path is empty"):
    make_source(cfg, 100, split="eval")
  cfg.eval_path = cfg.path
  assert make_source(cfg, 100, split="eval").offset == 0  # eval windows are sequential
  with pytest.raises(ValueError, match=f"{tmp_path / 'train' / 'index.json'} has vocab_size=100"):
    make_source(cfg, 64)
  cfg.kind = "images"
  with pytest.raises(ValueError, match="data.kind='images'"):
    make_source(cfg, 100)
