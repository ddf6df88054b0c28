"""The data pipeline's global batch on 4 of the 8 devices, one process."""

from global_batch_check import check


def test_global_batch_one_process():
  assert check(1) == [0, 2, 4, 6]
