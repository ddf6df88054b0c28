import numpy as np
import pytest

from lmhead_jax.data.spamlang import SpamLangSource


def _check_rule(rec, bos, allowed, exclude_first=True):
  s = rec["targets"][0]
  assert s in allowed
  np.testing.assert_array_equal(rec["targets"], np.full_like(rec["targets"], s))
  np.testing.assert_array_equal(rec["inputs"], np.r_[bos, rec["targets"][:-1]])
  want_mask = np.ones(len(rec["mask"]), np.float32)
  want_mask[0] = 0.0 if exclude_first else 1.0
  np.testing.assert_array_equal(rec["mask"], want_mask)
  assert (rec["inputs"].dtype, rec["targets"].dtype, rec["mask"].dtype) == (
      np.int32, np.int32, np.float32)


@pytest.mark.parametrize("kw,allowed", [
    (dict(vocab_size=10), set(range(1, 10))),
    (dict(vocab_size=10, bos_id=3, exclude_first=False), set(range(10)) - {3}),
    (dict(vocab_size=50, symbol_range=(20, 30), reserved_ids=(20, 29)), set(range(21, 29))),
    (dict(vocab_size=5, reserved_ids=()), set(range(5))),
])
def test_records_obey_the_rule(kw, allowed):
  src = SpamLangSource(seq_len=7, seed=3, **kw)
  seen = set()
  for i in range(300):
    rec = src[i]
    _check_rule(rec, kw.get("bos_id", 0), allowed, kw.get("exclude_first", True))
    seen.add(int(rec["targets"][0]))
  assert seen == allowed  # 300 draws hit every one of <= 10 symbols


def test_deterministic_and_independent_of_access_order():
  a, b = SpamLangSource(100, 4, seed=7), SpamLangSource(100, 4, seed=7)
  order = np.random.default_rng(0).permutation(200)
  fwd = [int(a[i]["targets"][0]) for i in range(200)]
  shuffled = {int(i): int(b[int(i)]["targets"][0]) for i in order}
  assert fwd == [shuffled[i] for i in range(200)]
  other = [int(SpamLangSource(100, 4, seed=8)[i]["targets"][0]) for i in range(200)]
  assert np.mean(np.array(fwd) == np.array(other)) < 0.05


def test_eval_split_is_an_independent_stream():
  train = SpamLangSource(1000, 2, seed=0)
  val = SpamLangSource(1000, 2, seed=0, split="eval")
  same = np.mean([train.symbol(i) == val.symbol(i) for i in range(500)])
  assert same < 0.02  # chance level is 1/999


def test_symbols_are_uniform():
  # Pearson chi-square over K=40 allowed symbols, 20k draws: mean K-1=39, sd sqrt(2*39)~8.8.
  # 39 + 6 sd ~ 92; an off-by-one range or a biased draw gives thousands.
  src = SpamLangSource(64, 1, seed=11, symbol_range=(10, 52), reserved_ids=(10, 33))
  n = 20_000
  counts = np.bincount([src.symbol(i) for i in range(n)], minlength=64)
  allowed = np.setdiff1d(np.arange(10, 52), [10, 33])
  assert counts.sum() == counts[allowed].sum()
  expected = n / allowed.size
  chi2 = np.sum((counts[allowed] - expected) ** 2 / expected)
  assert chi2 < 92, chi2


@pytest.mark.parametrize("kw,match", [
    (dict(symbol_range=(5, 20)), r"symbol_range=\(5, 20\)"),
    (dict(symbol_range=(3, 3)), r"symbol_range=\(3, 3\)"),
    (dict(bos_id=16), "bos_id=16"),
    (dict(symbol_range=(0, 2), reserved_ids=(0, 1)), "empty"),
    (dict(split="test"), "split='test'"),
])
def test_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    SpamLangSource(16, 4, **kw)
