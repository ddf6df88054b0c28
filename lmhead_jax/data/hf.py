"""Hugging Face checkpoint import: load_checkpoint(path) -> (ModelConfig, params).

Reads a local directory (config.json plus model.safetensors, or shards listed in
model.safetensors.index.json) of a GPT-2, GPT-NeoX/Pythia, Llama-3, OLMo-2 or Qwen3 model into the
`lmhead_jax.model` tree, one shard at a time. Each family is a table from our parameter paths to
HF tensor names and layouts; one loader serves them all. Untied models get `params['head']` (the
`linear` head kind); tied ones share the embedding (`config.default_head(cfg)` says which).

The checkpoint must agree with its config.json. Refused, naming the key or tensor: config values
of the wrong JSON type; tensors missing, misshapen, stored twice (say, in two shards) or read by no
parameter (say, layers beyond `n_layer`), all found from the headers before any array is
allocated; NaN/Inf weights. Only the buffers HF itself ignores on load (causal-mask biases, rotary
`inv_freq`) may go unread, and a tied model's `lm_head.weight` if it equals the embedding.
"""

import dataclasses
import json
import math
import pathlib
import re

import jax
import numpy as np

from lmhead_jax.core import model
from lmhead_jax.core.config import DTYPES, ModelConfig, default_head
from lmhead_jax.core.params import is_spec
from lmhead_jax.data.tokens import inside

SUPPORTED = ("gpt2", "gpt_neox", "llama", "olmo2", "qwen3")
_PREFIX = {"gpt2": "transformer.", "gpt_neox": "gpt_neox."}  # others: "model."
_ALIASES = {"embed_out.weight": "lm_head.weight"}  # Pythia's head, as newer transformers names it
# config.json values our trunk cannot express (checked only when the key is present).
_REQUIRED = {
    "gpt2": {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False},
    "gpt_neox": {"attention_bias": True},
    "llama": {"attention_bias": False, "mlp_bias": False},
    "olmo2": {"attention_bias": False},
    "qwen3": {"attention_bias": False, "use_sliding_window": False},
}
# Buffers some checkpoints hold and HF ignores on load (its `_keys_to_ignore_on_load_unexpected`):
# causal-mask biases and rotary frequencies, computed from the config rather than learned.
_BUFFERS = {"gpt2": r"h\.\d+\.attn\.(bias|masked_bias)",
            "gpt_neox": r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"}
_ROTARY_BUFFER = r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"  # llama, olmo2, qwen3
_GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
          "gelu_fast": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class Src:
  """Where one of our parameters lives in a HF checkpoint and how it is laid out there."""

  name: str  # HF tensor name without the base-model prefix; '{i}' is the layer index
  layout: str = "same"  # 'same' | 'vec' (1-D) | 'linear' ([out, in]) | 'conv1d' ([in, out])
  n_in: int = 1  # linear/conv1d: how many of our leading dims form the input axis
  # q/k/v fused in one tensor: (shape of its output axis, axis of the part in it, part index)
  fused: tuple[tuple[int, ...], int, int] | None = None

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the HF tensor must have to give our parameter `shape`."""
    if self.layout == "same":
      return tuple(shape)
    n_in = 0 if self.layout == "vec" else self.n_in
    d_in = math.prod(shape[:n_in])
    d_out = math.prod(self.fused[0] if self.fused else shape[n_in:])
    return {"vec": (d_out,), "linear": (d_out, d_in), "conv1d": (d_in, d_out)}[self.layout]

  def convert(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if self.layout == "linear":
      x = x.T  # [in, out], as conv1d
    if self.fused:
      out_shape, axis, part = self.fused
      x = x.reshape(*x.shape[:-1], *out_shape).take(part, axis=x.ndim - 1 + axis)
    return x.reshape(shape)


def _norm(ours: str, name: str) -> dict:
  return {f"{ours}/scale": Src(f"{name}.weight", "vec"), f"{ours}/bias": Src(f"{name}.bias", "vec")}


def _proj(ours: str, name: str, layout: str, n_in: int = 1, fused=None) -> dict:
  """A projection's weight and its bias (our 'wq' -> 'bq', 'w_up' -> 'b_up', as model._dense)."""
  group, w = ours.rsplit("/", 1)
  return {ours: Src(f"{name}.weight", layout, n_in, fused),
          f"{group}/b{w[1:]}": Src(f"{name}.bias", "vec", fused=fused)}


def _table(family: str, c: ModelConfig) -> dict[str, Src]:
  """Our parameter path ('layers/attn/wq') -> Src. Entries a config lacks are never looked up."""
  qkv = ("layers/attn/wq", "layers/attn/wk", "layers/attn/wv")
  if family == "gpt2":
    t = {"embed/w_VxD": Src("wte.weight"), "pos_embed/w_PxD": Src("wpe.weight"),
         **_norm("final_norm", "ln_f"), **_norm("layers/attn_norm", "h.{i}.ln_1"),
         **_norm("layers/mlp_norm", "h.{i}.ln_2"),
         **_proj("layers/attn/wo", "h.{i}.attn.c_proj", "conv1d", n_in=2),
         **_proj("layers/mlp/w_up", "h.{i}.mlp.c_fc", "conv1d"),
         **_proj("layers/mlp/w_down", "h.{i}.mlp.c_proj", "conv1d")}
    for part, ours in enumerate(qkv):  # [q | k | v] along the output axis
      t |= _proj(ours, "h.{i}.attn.c_attn", "conv1d", fused=((3, c.n_heads * c.hd), 0, part))
    return t
  layer = "layers.{i}."
  if family == "gpt_neox":
    t = {"embed/w_VxD": Src("embed_in.weight"), "head/w_VxD": Src("lm_head.weight"),
         **_norm("final_norm", "final_layer_norm"),
         **_norm("layers/attn_norm", layer + "input_layernorm"),
         **_norm("layers/mlp_norm", layer + "post_attention_layernorm"),
         **_proj("layers/attn/wo", layer + "attention.dense", "linear", n_in=2),
         **_proj("layers/mlp/w_up", layer + "mlp.dense_h_to_4h", "linear"),
         **_proj("layers/mlp/w_down", layer + "mlp.dense_4h_to_h", "linear")}
    for part, ours in enumerate(qkv):  # per head [q | k | v]
      t |= _proj(ours, layer + "attention.query_key_value", "linear",
                 fused=((c.n_heads, 3, c.hd), 1, part))
    return t
  # llama, qwen3, olmo2. OLMo-2's two norms follow the sublayers, under other names.
  post = c.norm_position == "post"
  t = {"embed/w_VxD": Src("embed_tokens.weight"), "head/w_VxD": Src("lm_head.weight"),
       **_norm("final_norm", "norm"),
       **_norm("layers/attn_norm",
               layer + ("post_attention_layernorm" if post else "input_layernorm")),
       **_norm("layers/mlp_norm",
               layer + ("post_feedforward_layernorm" if post else "post_attention_layernorm")),
       **_norm("layers/attn/q_norm", layer + "self_attn.q_norm"),
       **_norm("layers/attn/k_norm", layer + "self_attn.k_norm"),
       **_proj("layers/attn/wo", layer + "self_attn.o_proj", "linear", n_in=2)}
  for ours, name in zip(qkv, ("q_proj", "k_proj", "v_proj")):
    t |= _proj(ours, layer + "self_attn." + name, "linear")
  for w in ("gate", "up", "down"):
    t |= _proj(f"layers/mlp/w_{w}", f"{layer}mlp.{w}_proj", "linear")
  return t


_UNSET = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", dict: "a JSON object",
          str: "a string"}


def _is(value, kind: type) -> bool:
  """Whether a JSON value is of `kind` (JSON's true/false are no numbers, 32 is a float)."""
  if kind is bool:
    return isinstance(value, bool)
  return isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)


def _get(hf: dict, *keys, default=_UNSET, kind: type | None = None):
  """The first of `keys` set in config.json, else `default` (an error if none is given).

  With `kind` (int, float, bool, dict or str) a set value of another JSON type is an error
  naming it.
  """
  for k in keys:
    if (v := hf.get(k)) is not None:
      if kind and not _is(v, kind):
        raise ValueError(f"{k}={v!r} is not {_KINDS[kind]}")
      return v
  if default is _UNSET:
    raise ValueError(f"config.json sets none of {keys}")
  return default


def _model_config(hf: dict, dtype: str) -> ModelConfig:
  """ModelConfig of a HF config.json (the family's flags come from ModelConfig defaults)."""
  family = hf.get("model_type")
  if family not in SUPPORTED:
    raise ValueError(f"model_type={family!r} is not supported; supported: {SUPPORTED}")
  for key, want in _REQUIRED[family].items():
    if _get(hf, key, default=want, kind=bool) != want:
      raise ValueError(f"{key}={hf[key]!r} is not supported for model_type={family!r}")
  act = _get(hf, "hidden_act", "activation_function", kind=str)
  if family in ("gpt2", "gpt_neox"):
    if act not in _GELUS:
      raise ValueError(f"activation {act!r} is not supported for {family}; use one of "
                       f"{tuple(_GELUS)}")
    mlp_act = _GELUS[act]
  elif act != "silu":
    raise ValueError(f"hidden_act={act!r} is not supported for {family} (gated MLP needs 'silu')")
  else:
    mlp_act = "swiglu"
  rope = _get(hf, "rope_parameters", "rope_scaling", default={}, kind=dict)
  rope_type = _get(rope, "rope_type", "type", default="default", kind=str)
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"rope_type={rope_type!r} is not supported (only 'default' and 'llama3')")
  scaling = None
  if rope_type == "llama3":
    scaling = (*(float(_get(rope, k, kind=float))
                 for k in ("factor", "low_freq_factor", "high_freq_factor")),
               _get(rope, "original_max_position_embeddings", kind=int))
  return ModelConfig(
      family=family,
      vocab_size=_get(hf, "vocab_size", kind=int),
      d_model=_get(hf, "hidden_size", "n_embd", kind=int),
      n_layers=_get(hf, "num_hidden_layers", "n_layer", kind=int),
      n_heads=_get(hf, "num_attention_heads", "n_head", kind=int),
      n_kv_heads=_get(hf, "num_key_value_heads", default=None, kind=int),
      d_ff=_get(hf, "intermediate_size", "n_inner", default=None, kind=int),
      head_dim=_get(hf, "head_dim", default=None, kind=int),
      tie_embeddings=_get(hf, "tie_word_embeddings", default=family == "gpt2", kind=bool),
      dtype=dtype,
      max_seq_len=_get(hf, "max_position_embeddings", "n_positions", kind=int),
      rope_theta=float(_get(rope, "rope_theta", kind=float, default=_get(
          hf, "rope_theta", "rotary_emb_base", default=10_000.0, kind=float))),
      norm_eps=float(_get(hf, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", kind=float)),
      mlp_act=mlp_act,
      rotary_pct=_get(rope, "partial_rotary_factor", kind=float, default=_get(
          hf, "rotary_pct", "partial_rotary_factor", default=None, kind=float)),
      parallel_residual=_get(hf, "use_parallel_residual", default=None, kind=bool),
      rope_scaling=scaling)


def _read_json(file: pathlib.Path) -> dict:
  """The JSON object in `file`; errors name the file."""
  if not file.is_file():
    raise FileNotFoundError(f"{file} does not exist")
  try:
    with open(file, encoding="utf-8") as f:
      d = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{file} holds a JSON {type(d).__name__}, not an object")
  return d


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  """model.safetensors, or the shards that model.safetensors.index.json lists."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no weight_map (tensor name -> shard file) object")
    files = [pathlib.Path(f) for f in sorted({inside(path, f, index) for f in weight_map.values()})]
  elif (path / "model.safetensors").is_file():
    files = [path / "model.safetensors"]
  else:
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json")
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"{f} (listed in {index.name}) does not exist")
  return files


def _safe_open(file: pathlib.Path):
  """safe_open(file) for numpy; a malformed header is an error naming the file."""
  from safetensors import SafetensorError, safe_open

  try:
    return safe_open(file, "np")
  except SafetensorError as e:
    raise ValueError(f"{file} is not a valid safetensors file: {e}") from None


def _tensors(path: pathlib.Path, prefix: str) -> dict[str, tuple[pathlib.Path, str, tuple]]:
  """HF name without `prefix` (aliases applied) -> (file, name in file, shape), from the headers;
  a tensor stored twice (in two shards, or with and without the prefix) is an error."""
  where = {}
  for file in _weight_files(path):
    with _safe_open(file) as f:
      for name in f.keys():
        short = name.removeprefix(prefix)
        short = _ALIASES.get(short, short)
        if short in where:
          other, other_name, _ = where[short]
          raise ValueError(f"{path}: tensor {short!r} is stored twice: as {other_name} in "
                           f"{other.name} and as {name} in {file.name}")
        where[short] = (file, name, tuple(f.get_slice(name).get_shape()))
  return where


def _unread(path: pathlib.Path, c: ModelConfig, where: dict, read: set) -> str | None:
  """Refuses the tensors of `where` that no parameter reads, but for HF's ignorable buffers and
  a tied model's lm_head.weight, which is returned (to be checked equal to the embedding)."""
  buffer = re.compile(_BUFFERS.get(c.family, _ROTARY_BUFFER))
  left = [n for n in where if n not in read and not buffer.fullmatch(n)]
  tied_head = "lm_head.weight" if c.tie_embeddings and "lm_head.weight" in left else None
  if names := [where[n][1] for n in left if n != tied_head]:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise ValueError(f"{path}: {len(names)} tensor(s) that no parameter of the model in "
                     f"config.json reads: {shown} (does config.json describe this checkpoint?)")
  return tied_head


def _path(key_path) -> str:
  return "/".join(k.key for k in key_path)


def read_config(path, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a local Hugging Face checkpoint directory, from its config.json alone."""
  return _model_config(_read_json(pathlib.Path(path) / "config.json"), dtype)


def load_checkpoint(path, dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(cfg, params) of a local HF checkpoint; params (and compute) in `dtype`.

  All names and shapes are checked from the safetensors headers before any memory is allocated;
  then the shards are read one at a time into host arrays (each checked finite), which go to the
  default device at the end.
  """
  path = pathlib.Path(path)
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {tuple(DTYPES)}")
  hf = _read_json(path / "config.json")
  try:
    c = _model_config(hf, dtype)
  except ValueError as e:
    raise ValueError(f"{path / 'config.json'}: {e}") from None
  prefix = _PREFIX.get(c.family, "model.")
  where = _tensors(path, prefix)
  table, specs = _table(c.family, c), model.specs(c, default_head(c))
  leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
  jobs, read = {}, set()  # file -> [(our path, layer or None, name, Src, our shape)]
  for key_path, spec in leaves:
    ours = _path(key_path)
    src = table[ours]
    stacked = ours.startswith("layers/")
    shape = spec.shape[1:] if stacked else spec.shape
    for i in range(c.n_layers) if stacked else [None]:
      name = src.name.format(i=i)
      if name not in where:
        raise ValueError(f"{path}: tensor {name!r} (for {ours}; names compared without the "
                         f"{prefix!r} prefix) is missing from the checkpoint")
      file, full_name, got = where[name]
      if got != src.hf_shape(shape):
        raise ValueError(f"{file}: tensor {full_name} has shape {got}, expected "
                         f"{src.hf_shape(shape)} (for {ours} of shape {shape})")
      jobs.setdefault(file, []).append((ours, i, full_name, src, shape))
      read.add(name)
  tied_head = _unread(path, c, where, read)

  out = {_path(kp): np.empty(spec.shape, np.dtype(DTYPES[dtype])) for kp, spec in leaves}
  for file, file_jobs in jobs.items():
    with _safe_open(file) as f:
      for ours, i, name, src, shape in file_jobs:
        x = out[ours] if i is None else out[ours][i]  # a view
        with np.errstate(over="ignore"):  # a cast to inf is refused below
          x[...] = src.convert(f.get_tensor(name), shape)
        if not np.isfinite(x).all():
          raise ValueError(f"{file}: tensor {name} (for {ours}) holds NaN or Inf values in "
                           f"{dtype}")
  if tied_head:
    file, name, _ = where[tied_head]
    with _safe_open(file) as f:
      head = f.get_tensor(name).astype(out["embed/w_VxD"].dtype)
    if not np.array_equal(head, out["embed/w_VxD"]):
      raise ValueError(f"{file}: tensor {name} differs from the embedding, which config.json "
                       f"ties the head to (tie_word_embeddings)")
  params = jax.tree_util.tree_map_with_path(
      lambda kp, _: jax.device_put(out.pop(_path(kp))), specs, is_leaf=is_spec)
  return c, params
