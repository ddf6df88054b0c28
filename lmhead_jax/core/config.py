"""Typed views of the experiment config's `model`, `head` and `loss` groups (ModelConfig,
HeadConfig, LossConfig), from which those groups' keys are declared; the schema and checks of the
whole config are `lmhead_jax.runs.experiment`."""

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lmhead_jax.core import loss
from lmhead_jax.core.attention import KINDS as ATTENTION_KINDS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FAMILIES = ("llama", "qwen3", "olmo2", "gpt2", "gpt_neox")
HEAD_KINDS = ("linear", "tied", "factorized", "mos")
HEAD_BACKWARDS = ("exact", "feedback_alignment", "whitened", "truncated")
# The largest model.vocab_size: 2^24 ids (16.8M; HF checkpoints have at most ~0.3M). One
# embedding row of D=64 float32 per id is already 4 GiB of parameters.
MAX_VOCAB_SIZE = 2**24

# Architecture flags each family sets unless the config gives them (None = family default).
_LLAMA = dict(norm="rms", bias=False, mlp_act="swiglu", pos="rope", rotary_pct=1.0,
              parallel_residual=False, norm_position="pre", qk_norm="none")
FAMILY_FLAGS = {
    "llama": _LLAMA,
    "qwen3": _LLAMA | dict(qk_norm="head"),
    "olmo2": _LLAMA | dict(norm_position="post", qk_norm="full"),
    "gpt2": _LLAMA | dict(norm="layer", bias=True, mlp_act="gelu_tanh", pos="learned"),
    "gpt_neox": _LLAMA | dict(norm="layer", bias=True, mlp_act="gelu", rotary_pct=0.25,
                              parallel_residual=True),
}
FLAG_CHOICES = {
    "norm": ("rms", "layer"),
    "mlp_act": ("swiglu", "gelu_tanh", "gelu"),
    "pos": ("rope", "learned"),
    "norm_position": ("pre", "post"),
    "qk_norm": ("none", "full", "head"),
}


def _number(x) -> str:
  return str(int(x)) if float(x).is_integer() else repr(x)


def check_range(key: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> None:
  """Refuses, naming `key`, `value` and the range, a `value` outside [low, high] (open ends
  where asked) or not an int (`integer`) or not a finite real number; so NaN and inf always fail.
  """
  kind = numbers.Integral if integer else numbers.Real
  ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
  if ok and (low < value if low_open else low <= value) and (
      value < high if high_open else value <= high):
    return
  what = "an integer" if integer else "a finite number"
  if high == math.inf:
    bounds = f"{'>' if low_open else '>='} {_number(low)}"
  else:
    bounds = (f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}"
              f"{')' if high_open else ']'}")
  raise ValueError(f"{key}={value!r} must be {what} {bounds}")


def from_mapping(cls, cfg, group: str):
  """Builds a frozen dataclass from a dataclass, dict or ConfigDict; a key that is not one of
  its fields, or a missing required one, is an error naming `group.key`."""
  if isinstance(cfg, cls):
    return cfg
  if not isinstance(cfg, Mapping) and not hasattr(cfg, "to_dict"):
    raise TypeError(f"expected a {cls.__name__}, dict or ConfigDict, got {type(cfg).__name__}")
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  fields = dataclasses.fields(cls)
  unknown = sorted(set(d) - {f.name for f in fields})
  if unknown:
    raise ValueError(f"unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                     f"{group} has {', '.join(f.name for f in fields)}")
  missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
  if missing:
    raise ValueError(f"missing key(s) {', '.join(f'{group}.{k}' for k in missing)}")
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder trunk hyper-parameters. Family flags select GPT-2/NeoX/OLMo-2/Qwen3 variants.

  The flags after `remat` default to None, which `family` fills in (FAMILY_FLAGS); set one to
  override it. `dataclasses.replace(cfg, family=...)` keeps the old family's resolved flags.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None  # None: same as n_heads
  d_ff: int | None = None  # None: 4 * d_model
  head_dim: int | None = None  # None: d_model // n_heads
  family: str = "llama"
  tie_embeddings: bool = False
  dtype: str = "float32"  # compute dtype; parameters stay float32
  max_seq_len: int = 2048
  rope_theta: float = 500_000.0
  norm_eps: float = 1e-5
  remat: bool = False
  norm: str | None = None  # 'rms' | 'layer' (LayerNorm with bias)
  bias: bool | None = None  # biases on the attention and MLP projections
  mlp_act: str | None = None  # 'swiglu' (gated SiLU) | 'gelu_tanh' | 'gelu' (non-gated)
  pos: str | None = None  # 'rope' | 'learned' (absolute, max_seq_len rows)
  rotary_pct: float | None = None  # fraction of head_dim that RoPE rotates
  parallel_residual: bool | None = None  # x + attn(norm1 x) + mlp(norm2 x)
  norm_position: str | None = None  # 'pre': x + f(norm x); 'post': x + norm(f x)
  qk_norm: str | None = None  # RMSNorm on q and k: 'none' | 'full' (all heads) | 'head'
  # llama3 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_len)
  rope_scaling: tuple[float, float, float, int] | None = None
  attention: str = "xla"  # 'xla' | 'flash' | 'cudnn' | 'auto' (`lmhead_jax.core.attention`)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family={self.family!r} is not one of {FAMILIES}")
    for name, value in FAMILY_FLAGS[self.family].items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    for name, choices in FLAG_CHOICES.items():
      if getattr(self, name) not in choices:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {choices}")
    if self.parallel_residual and self.norm_position == "post":
      raise ValueError("model.parallel_residual=True needs model.norm_position='pre'")
    check_range("model.rotary_pct", self.rotary_pct, 0, 1, low_open=True)
    if self.rope_scaling is not None:
      if len(self.rope_scaling) != 4:
        raise ValueError(
            f"model.rope_scaling={self.rope_scaling} must be (factor, low_freq_factor, "
            "high_freq_factor, original_max_len)")
      object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
      factor, low, high, original_len = self.rope_scaling
      check_range("model.rope_scaling[0] (factor)", factor, 0, low_open=True)
      check_range("model.rope_scaling[1] (low_freq_factor)", low, 0, low_open=True)
      check_range("model.rope_scaling[2] (high_freq_factor, above low_freq_factor)", high, low,
                  low_open=True)
      check_range("model.rope_scaling[3] (original_max_len)", original_len, 1, integer=True)
    check_range("model.vocab_size", self.vocab_size, 2, MAX_VOCAB_SIZE, integer=True)
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "n_kv_heads", "d_ff",
                 "head_dim"):
      if getattr(self, name) is not None:  # the last three: None takes the default
        check_range(f"model.{name}", getattr(self, name), 1, integer=True)
    for name in ("rope_theta", "norm_eps"):
      check_range(f"model.{name}", getattr(self, name), 0, low_open=True)
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is not one of {tuple(DTYPES)}")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"model.attention={self.attention!r} is not one of {ATTENTION_KINDS}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
          f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    if self.n_heads % self.kv_heads:
      raise ValueError(
          f"model.n_kv_heads={self.kv_heads} does not divide model.n_heads={self.n_heads}")
    if self.pos == "rope" and self.rotary_dim + self.rotary_dim % 2 > self.hd:
      raise ValueError(f"model.head_dim={self.hd} is odd: rotary_pct={self.rotary_pct} rotates "
                       f"{self.rotary_dim} dims, rounded up to an even {self.rotary_dim + 1}")

  @classmethod
  def of(cls, cfg: Any) -> "ModelConfig":
    return from_mapping(cls, cfg, "model")

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else int(self.n_kv_heads)

  @property
  def ff(self) -> int:
    return 4 * self.d_model if self.d_ff is None else int(self.d_ff)

  @property
  def hd(self) -> int:
    return self.d_model // self.n_heads if self.head_dim is None else int(self.head_dim)

  @property
  def rotary_dim(self) -> int:
    """HF's int(head_dim * rotary_pct): RoPE's frequency dim; an odd one rotates one dim more."""
    return int(self.hd * self.rotary_pct)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """LM head: kind (linear / tied / factorized / mos), rank for factorized, mixtures for mos,
  chunk_size for the loss; backward (what the trunk receives, `lmhead_jax.core.backward`),
  forward_rank (rank-r logits, the full gradient: `backward.projected`) and ortho_weight;
  data_vocab < V (set from the data by `runs.experiment.resolve`) hides the padding rows. (`lmhead_jax.core.regularize.ortho`)."""

  vocab_size: int
  d_model: int
  kind: str = "linear"
  rank: int | None = None
  chunk_size: int | None = None  # tokens per chunk in the fused loss; None = dense
  mixtures: int | None = None  # K softmaxes of the mos head
  backward: str = "exact"  # exact | feedback_alignment | whitened | truncated
  backward_rank: int | None = None  # truncated: the trunk receives G W_r, W_r of rank r
  forward_rank: int | None = None  # logits h W_rᵀ of rank r, the trunk receives G W (projected)
  ortho_weight: float = 0.0
  # ids from data_vocab up are padding rows (data.allow_vocab_padding): out of the softmax
  data_vocab: int | None = None

  @property
  def live_vocab(self) -> int:
    """The rows the softmax sees: data_vocab when the vocabulary is padded, else V."""
    return self.vocab_size if self.data_vocab is None else int(self.data_vocab)

  def __post_init__(self):
    if self.kind not in HEAD_KINDS:
      raise ValueError(f"head.kind={self.kind!r} is not one of {HEAD_KINDS}")
    check_range("head.vocab_size", self.vocab_size, 2, MAX_VOCAB_SIZE, integer=True)
    check_range("head.d_model", self.d_model, 1, integer=True)
    if self.kind == "factorized":
      if self.rank is None or not 0 < int(self.rank) <= self.d_model:
        raise ValueError(
            f"head.rank={self.rank} must satisfy 0 < rank <= d_model={self.d_model}")
    if self.chunk_size is not None:  # None: the dense loss
      check_range("head.chunk_size", self.chunk_size, 1, integer=True)
    if self.kind == "mos" and (self.mixtures is None or int(self.mixtures) < 1):
      raise ValueError(f"head.kind='mos' needs head.mixtures >= 1, got {self.mixtures}")
    if self.backward not in HEAD_BACKWARDS:
      raise ValueError(f"head.backward={self.backward!r} is not one of {HEAD_BACKWARDS}")
    check_range("head.ortho_weight", self.ortho_weight, 0)
    if self.data_vocab is not None:
      check_range("head.data_vocab", self.data_vocab, 2, self.vocab_size, integer=True)
    if self.backward == "truncated":
      check_range("head.backward_rank", self.backward_rank, 1, self.d_model, integer=True)
    elif self.backward_rank is not None:
      raise ValueError(f"head.backward_rank={self.backward_rank} needs head.backward='truncated'"
                       f", got {self.backward!r}")
    if self.forward_rank is not None:
      check_range("head.forward_rank", self.forward_rank, 1, self.d_model, integer=True)
      if self.kind not in ("linear", "tied") or self.backward not in ("exact", "truncated"):
        raise ValueError(f"head.forward_rank={self.forward_rank} needs head.kind 'linear' or "
                         f"'tied' and head.backward 'exact' or 'truncated', got "
                         f"{self.kind!r} and {self.backward!r}")
    # The mos head has no single matrix W: no chunked loss, no W-based backward or regularizer.
    if self.kind == "mos":
      for key, value, plain in (("chunk_size", self.chunk_size, None),
                                ("backward", self.backward, "exact"),
                                ("ortho_weight", float(self.ortho_weight), 0.0)):
        if value != plain:
          raise ValueError(f"head.kind='mos' does not support head.{key}={value!r} "
                           f"(needs {plain!r})")
    if self.backward == "feedback_alignment" and self.chunk_size is not None:
      raise ValueError("head.backward='feedback_alignment' needs G, which head.chunk_size="
                       f"{self.chunk_size} never forms; set head.chunk_size=None")

  @classmethod
  def of(cls, cfg: Any, model: ModelConfig | None = None) -> "HeadConfig":
    """From a head mapping plus the model config that fixes V, D and tying.

    Tying comes from `model.tie_embeddings` alone: when it is set, the head is the embedding and
    kind 'linear' (the default) resolves to 'tied'; 'factorized' is an error. When it is not,
    'tied' is an error. config.json holds the resolved kind.
    """
    if isinstance(cfg, cls):
      return cfg
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if model is not None:
      d.setdefault("vocab_size", model.vocab_size)
      d.setdefault("d_model", model.d_model)
      if model.tie_embeddings:
        if d.get("kind", "tied") not in ("tied", "linear"):
          raise ValueError(
              f"model.tie_embeddings=True conflicts with head.kind={d['kind']!r}")
        d["kind"] = "tied"
      elif d.get("kind") == "tied":
        raise ValueError("head.kind='tied' needs model.tie_embeddings=True")
    return from_mapping(cls, d, "head")


def default_head(model: ModelConfig) -> HeadConfig:
  """The plain head of `model`: tied to the embedding when it ties them, else linear."""
  return HeadConfig(model.vocab_size, model.d_model,
                    kind="tied" if model.tie_embeddings else "linear")


def typed(value, cls):
  """`value` if it is a `cls`, else a TypeError that says how to make one."""
  if not isinstance(value, cls):
    raise TypeError(f"expected a {cls.__name__}, got {type(value).__name__} (a mapping converts "
                    f"with {cls.__name__}.of)")
  return value


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The training loss's options (`loss.Options`, the mean reduction): the train step's head
  loss takes them; evals report the plain mean CE."""

  z_loss: float = 0.0
  softcap: float | None = None
  label_smoothing: float = 0.0

  def __post_init__(self):
    try:
      loss.options(**self.options())
    except ValueError as e:
      raise ValueError(f"loss.{e}") from None

  def options(self) -> dict:
    return dataclasses.asdict(self)
