"""Token-id checks: eager calls refuse ids out of range, naming them; traced calls pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.core import checks


def test_ids_in_range_pass_and_come_back_as_arrays():
  ids = checks.token_ids(np.array([[0, 3], [4, 1]]), 5, "tokens")
  assert isinstance(ids, jax.Array) and ids.tolist() == [[0, 3], [4, 1]]


@pytest.mark.parametrize("bad", [5, -1, 99])
def test_an_id_out_of_range_is_named(bad):
  with pytest.raises(ValueError, match=rf"tokens.*{bad}"):
    checks.token_ids(np.array([0, bad, 2]), 5, "tokens")


def test_the_ignore_index_is_allowed_only_when_named():
  ids = checks.token_ids(np.array([1, -100]), 5, "targets", ignore_index=-100)
  assert ids.tolist() == [1, -100]
  with pytest.raises(ValueError, match="-100"):
    checks.token_ids(np.array([1, -100]), 5, "targets")


def test_float_ids_are_refused():
  with pytest.raises(ValueError, match="tokens must have an integer dtype, got float32"):
    checks.token_ids(np.array([1.0], np.float32), 5, "tokens")


def test_under_jit_no_check_runs():
  f = jax.jit(lambda x: checks.token_ids(x, 5, "tokens") + 0)
  assert f(jnp.array([7])).tolist() == [7]  # no host sync: the caller sees NaN downstream
