"""A padded vocabulary (data.allow_vocab_padding): the train step on V rows, of which the data
uses the first data_vocab, equals the step of a model with exactly those rows."""

import jax
import numpy as np
import pytest
from helpers import copy, one_device_mesh, random_batch, sgd_lr1, tiny_config

from lmhead_jax.data.tokens import write_token_dir
from lmhead_jax.runs import experiment
from lmhead_jax.training import train

DATA_VOCAB = 200


def sliced(params, n):
  """The model's parameters with their V-indexed arrays cut to the first n rows."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x[:n] if path[-1].key.split("_", 1)[-1].startswith("V") else x, params)


@pytest.mark.parametrize("kind,chunk_size", [
    ("linear", None), pytest.param("linear", 16, marks=pytest.mark.slow),
    pytest.param("tied", None, marks=pytest.mark.slow)])
def test_padding_rows_are_outside_the_softmax_and_the_metrics(tmp_path, kind, chunk_size):
  write_token_dir(tmp_path / "tok", [np.arange(3000) % DATA_VOCAB], vocab_size=DATA_VOCAB,
                  tokenizer="none")
  padded = sgd_lr1(tiny_config(n_layers=1, tie_embeddings=kind == "tied"))
  padded.optimizer.learning_rate = 0.1
  padded.head.chunk_size = chunk_size
  padded.data.update(kind="tokens", path=str(tmp_path / "tok"), allow_vocab_padding=True)
  exact = sgd_lr1(tiny_config(n_layers=1, vocab_size=DATA_VOCAB, tie_embeddings=kind == "tied"))
  exact.optimizer.learning_rate = 0.1
  exact.head.chunk_size = chunk_size
  mesh = one_device_mesh()
  setup_padded, setup_exact = experiment.resolve(padded, mesh), experiment.resolve(exact, mesh)
  assert (setup_padded.head.vocab_size, setup_padded.head.data_vocab) == (256, DATA_VOCAB)
  assert setup_exact.head.data_vocab is None

  state, _ = train.init_state(jax.random.key(0), setup_padded)
  other, _ = train.init_state(jax.random.key(1), setup_exact)
  other = other.replace(params=sliced(copy(state.params), DATA_VOCAB))
  batch = random_batch(exact)  # ids below DATA_VOCAB
  old = copy(state.params)
  new_padded, m_padded = train.make_train_step(setup_padded)(state, batch)
  new_exact, m_exact = train.make_train_step(setup_exact)(other, batch)
  for key in ("loss", "accuracy", "bottleneck/destroyed_ratio", "bottleneck/visible_cosine",
              "bottleneck/full_norm", "bottleneck/backbone_norm"):
    np.testing.assert_allclose(m_padded[key], m_exact[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(sliced(new_padded.params, DATA_VOCAB)),
                  jax.tree.leaves(new_exact.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  w = "embed" if kind == "tied" else "head"  # the padding rows never move
  np.testing.assert_array_equal(new_padded.params[w]["w_VxD"][DATA_VOCAB:],
                                old[w]["w_VxD"][DATA_VOCAB:])
