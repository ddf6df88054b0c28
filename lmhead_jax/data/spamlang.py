"""SpamLang: each sequence repeats one symbol drawn uniformly from the allowed ids.

Record i draws its symbol with `np.random.default_rng([seed, split, i])`, so records do not
depend on the order of access and the "train" and "eval" splits are independent streams.
"""

import numpy as np

SPLITS = ("train", "eval")


class SpamLangSource:
  """Random-access source: record i is `inputs=[bos, s, ..., s]`, `targets=[s] * L`.

  `mask` is 0 at the first position when `exclude_first` (s cannot be predicted from bos),
  else 1. Symbols come from `range(*symbol_range)` minus `reserved_ids` (default `(bos_id,)`).
  """

  def __init__(self, vocab_size: int, seq_len: int, *, seed: int = 0, split: str = "train",
               num_records: int = 1 << 20, symbol_range: tuple[int, int] | None = None,
               reserved_ids: tuple[int, ...] | None = None, bos_id: int = 0,
               exclude_first: bool = True):
    lo, hi = (0, vocab_size) if symbol_range is None else map(int, symbol_range)
    if not 0 <= lo < hi <= vocab_size:
      raise ValueError(f"symbol_range=({lo}, {hi}) must satisfy 0 <= lo < hi <= "
                       f"vocab_size={vocab_size}")
    if not 0 <= bos_id < vocab_size:
      raise ValueError(f"bos_id={bos_id} is outside [0, vocab_size={vocab_size})")
    if seq_len < 1 or num_records < 1:
      raise ValueError(f"seq_len={seq_len} and num_records={num_records} must be positive")
    if split not in SPLITS:
      raise ValueError(f"split={split!r} is not one of {SPLITS}")
    reserved = (bos_id,) if reserved_ids is None else tuple(reserved_ids)
    self.symbols = np.setdiff1d(np.arange(lo, hi), reserved).astype(np.int32)
    if not self.symbols.size:
      raise ValueError(f"symbol_range=({lo}, {hi}) minus reserved_ids={reserved} is empty")
    self.seq_len, self.seed, self.bos_id = seq_len, seed, bos_id
    self.num_records, self._split = num_records, SPLITS.index(split)
    self.mask = np.ones(seq_len, np.float32)
    self.mask[0] = 0.0 if exclude_first else 1.0

  def __len__(self) -> int:
    return self.num_records

  def symbol(self, i: int) -> int:
    rng = np.random.default_rng([self.seed, self._split, i])
    return int(self.symbols[rng.integers(self.symbols.size)])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    targets = np.full(self.seq_len, self.symbol(i), np.int32)
    inputs = np.concatenate([[self.bos_id], targets[:-1]]).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "mask": self.mask.copy()}
