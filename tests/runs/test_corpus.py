"""The measured token data: the stdlib corpus tokenized once and shared, and its refusals."""

import pathlib

import helpers
import pytest
from helpers import counting, tiny_measurement_config

from lmhead_jax.analysis import subjects
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.data import prepare
from lmhead_jax.data.tokens import read_index
from lmhead_jax.runs import corpus, measurement
from lmhead_jax.training import sharding


FIXTURES = helpers.FIXTURES


def test_stdlib_tokens_shared_across_workdirs(tmp_path, cache_dir, monkeypatch):
  builds = counting(monkeypatch, prepare, "prepare")
  cfg = tiny_measurement_config()
  val = corpus.token_dir(cfg, tmp_path / "a", "m", None, 300)
  assert corpus.token_dir(cfg, tmp_path / "b", "m", None, 300, "train") == val[:-3] + "train"
  assert len(builds) == 1 and pathlib.Path(val).is_relative_to(cache_dir / "tokens")
  assert read_index(val)["vocab_size"] == 300 and read_index(val[:-3] + "train")["num_tokens"]
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  cfg.data.text_field = "body"  # not read for the stdlib corpus: still a hit
  assert corpus.token_dir(cfg, tmp_path / "c", "m", None, 300) == val and len(builds) == 1
  other = corpus.token_dir(cfg, tmp_path / "a", "m", None, 320)
  assert other != val and len(builds) == 2 and read_index(other)["vocab_size"] == 320


@pytest.mark.parametrize("models", ["checkpoints", "fresh"])
def test_no_tokenizer_and_too_few_ids_for_a_bpe(tmp_path, cache_dir, models):
  cfg = measurement.base_config()
  if models == "checkpoints":
    cfg.checkpoints = str(FIXTURES / "llama")  # V = 128, no tokenizer.json
    s = next(measurement.load(cfg, tmp_path, sharding.make_mesh()))
  else:  # what load(fresh="16") yields, less its params (initializing compiles for seconds)
    cfg.model.vocab_size = 128
    c = ModelConfig.of(cfg.model)
    s = subjects.Subject("fresh-d16", c, HeadConfig.of(cfg.head.to_dict(), c), params={})
  with pytest.raises(ValueError) as e:
    corpus.source(cfg, s, tmp_path)
  msg = str(e.value)
  assert f"model {s.name!r} has no tokenizer.json" in msg and "vocab_size=128" in msg
  for hint in ("--config.data.path=<token dir>", "tokenizer.json",
               "--config.model.vocab_size >= 257"):
    assert hint in msg
  assert "--train-bpe" not in msg
  assert not cache_dir.exists() and not any(tmp_path.iterdir())
