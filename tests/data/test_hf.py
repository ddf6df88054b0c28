"""HF import parity against references recorded with the real `transformers` library.

The fixtures (tiny random models plus reference.npz) come from scripts/make_hf_fixtures.py; the
tests need neither torch nor transformers.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import helpers

from lmhead_jax.core import heads, model
from lmhead_jax.core.config import default_head
from lmhead_jax.core.params import is_spec
from lmhead_jax.data import hf

FIXTURES = helpers.FIXTURES
TIED = {"gpt2": True, "gpt_neox": False, "llama": False, "olmo2": False, "qwen3": True}


def _outputs(path, dtype="float32", **overrides):
  """(cfg, params, reference, hidden, logits) of the checkpoint at `path` on its reference ids."""
  cfg, params = hf.load_checkpoint(path, dtype)
  cfg = dataclasses.replace(cfg, **overrides)
  ref = np.load(pathlib.Path(path) / "reference.npz")
  head_cfg = default_head(cfg)
  h = model.hidden(params, ref["tokens"], cfg)
  z = heads.logits(heads.params_of(params, head_cfg), h, head_cfg)
  return cfg, params, ref, np.asarray(h, np.float32), np.asarray(z)


def _shapes(tree) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_spec)
  return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}


def _copy(family, tmp_path) -> pathlib.Path:
  dst = tmp_path / family
  shutil.copytree(FIXTURES / family, dst)
  return dst


def _edit_json(file, **changes):
  """Sets keys of a JSON file; a value of None deletes the key."""
  d = json.loads(file.read_text())
  for k, v in changes.items():
    if v is None:
      d.pop(k, None)
    else:
      d[k] = v
  file.write_text(json.dumps(d))


def _edit_tensors(file, fn):
  """Rewrites a safetensors file with fn(dict of tensors) -> dict of tensors."""
  save_file(fn(load_file(file)), file, metadata={"format": "pt"})


def test_fixtures_come_from_transformers():
  for family in hf.SUPPORTED:
    ref = np.load(FIXTURES / family / "reference.npz")
    assert str(ref["transformers_version"])[0].isdigit(), family
    assert ref["logits"].dtype == np.float32 and ref["tokens"].shape == ref["hidden"].shape[:2]
  assert len(list((FIXTURES / "llama").glob("model-*-of-*.safetensors"))) > 1  # sharded


@pytest.mark.parametrize("family", hf.SUPPORTED)
def test_parity_float32(family):
  cfg, params, ref, h, z = _outputs(FIXTURES / family)
  assert cfg.family == family and cfg.tie_embeddings == TIED[family]
  assert ("head" in params) != TIED[family]
  assert default_head(cfg).kind == ("tied" if TIED[family] else "linear")
  assert _shapes(params) == _shapes(model.specs(cfg, default_head(cfg)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  np.testing.assert_allclose(h, ref["hidden"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(z, ref["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", hf.SUPPORTED)
def test_bfloat16_load(family):
  cfg, params, ref, h, z = _outputs(FIXTURES / family, "bfloat16")
  assert cfg.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert z.dtype == np.float32
  rel = np.linalg.norm(z - ref["logits"]) / np.linalg.norm(ref["logits"])
  assert rel < 0.03, rel
  assert np.mean(z.argmax(-1) == ref["logits"].argmax(-1)) > 0.9


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  """Most released checkpoints are stored in bf16: loading upcasts them exactly."""
  path = _copy("qwen3", tmp_path)
  _edit_tensors(path / "model.safetensors",
                lambda t: {k: v.astype(jnp.bfloat16) for k, v in t.items()})
  cfg, params, ref, _, z = _outputs(path)
  stored = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
  np.testing.assert_array_equal(params["embed"]["w_VxD"], stored.astype(np.float32))
  assert cfg.dtype == "float32" and params["embed"]["w_VxD"].dtype == jnp.float32
  rel = np.linalg.norm(z - ref["logits"]) / np.linalg.norm(ref["logits"])
  assert 1e-5 < rel < 0.03, rel


def test_parity_gpt_neox_odd_rotary_dim():
  """head_dim 12 x rotary_pct 0.25 = 3: as transformers, 2 frequencies (dim 3) on 4 channels."""
  path = FIXTURES / "gpt_neox_odd_rotary"
  cfg, _, ref, h, z = _outputs(path)
  assert (cfg.hd, cfg.rotary_dim) == (12, 3)
  np.testing.assert_allclose(h, ref["hidden"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(z, ref["logits"], rtol=0, atol=1e-4)
  # Frequencies from dim 4 on the same 4 channels, or 2 rotated channels, miss the reference.
  for pct in (1 / 3, 1 / 6):
    assert np.abs(_outputs(path, rotary_pct=pct)[-1] - ref["logits"]).max() > 5e-4, pct


@pytest.mark.parametrize("family, overrides", [
    ("llama", dict(rope_scaling=None)),
    ("gpt_neox", dict(rotary_pct=1.0)),
    ("gpt_neox", dict(parallel_residual=False)),
    ("gpt2", dict(mlp_act="gelu")),
    ("olmo2", dict(norm_position="pre")),
])
def test_fixtures_exercise_the_family_flags(family, overrides):
  """Without the family's feature the logits miss the reference by > 5x the parity tolerance."""
  *_, ref, _, z = _outputs(FIXTURES / family, **overrides)
  assert np.abs(z - ref["logits"]).max() > 5e-4


def _v4_neox_config(path):  # Pythia on the hub: rotary_pct / rotary_emb_base, no rope_parameters
  _edit_json(path / "config.json", rope_parameters=None, rotary_pct=0.25, rotary_emb_base=10000)


def _v4_llama_config(path):  # Llama-3.1 on the hub: rope_theta plus rope_scaling
  rope = json.loads((path / "config.json").read_text())["rope_parameters"]
  _edit_json(path / "config.json", rope_parameters=None, rope_theta=rope.pop("rope_theta"),
             rope_scaling=rope)


def _unprefixed(path):  # GPT-2 on the hub stores 'h.0...' rather than 'transformer.h.0...'
  _edit_tensors(path / "model.safetensors",
                lambda t: {k.removeprefix("transformer."): v for k, v in t.items()})


def _lm_head_name(path):  # GPT-NeoX head saved as lm_head.weight instead of embed_out.weight
  _edit_tensors(path / "model.safetensors",
                lambda t: {k.replace("embed_out.", "lm_head."): v for k, v in t.items()})


@pytest.mark.parametrize("family, edit", [
    ("gpt_neox", _v4_neox_config), ("llama", _v4_llama_config), ("gpt2", _unprefixed),
    ("gpt_neox", _lm_head_name)])
def test_parity_of_other_checkpoint_spellings(family, edit, tmp_path):
  path = _copy(family, tmp_path)
  edit(path)
  *_, ref, _, z = _outputs(path)
  np.testing.assert_allclose(z, ref["logits"], rtol=0, atol=1e-4)


def test_unknown_model_type(tmp_path):
  path = _copy("llama", tmp_path)
  _edit_json(path / "config.json", model_type="mamba")
  with pytest.raises(ValueError, match=r"'mamba'.*supported.*gpt2.*gpt_neox.*llama.*olmo2.*qwen3"):
    hf.load_checkpoint(path)


def test_unsupported_config_value(tmp_path):
  path = _copy("qwen3", tmp_path)
  _edit_json(path / "config.json", use_sliding_window=True)
  with pytest.raises(ValueError, match="use_sliding_window=True"):
    hf.load_checkpoint(path)


def test_missing_tensor(tmp_path):
  path = _copy("olmo2", tmp_path)
  name = "model.layers.1.self_attn.q_norm.weight"
  _edit_tensors(path / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_norm\.weight.*missing"):
    hf.load_checkpoint(path)


def test_missing_untied_head(tmp_path):
  path = _copy("llama", tmp_path)
  (shard,) = [f for f in path.glob("model-*.safetensors") if "lm_head.weight" in load_file(f)]
  _edit_tensors(shard, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
  with pytest.raises(ValueError, match=r"lm_head\.weight.*missing"):
    hf.load_checkpoint(path)


def test_mismatched_shape(tmp_path):
  path = _copy("gpt2", tmp_path)
  name = "transformer.h.0.attn.c_attn.weight"
  _edit_tensors(path / "model.safetensors", lambda t: t | {name: t[name][:, :-1].copy()})
  with pytest.raises(ValueError, match=rf"{name}.*\(32, 95\).*\(32, 96\)"):
    hf.load_checkpoint(path)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
    hf.load_checkpoint(tmp_path)
  path = _copy("olmo2", tmp_path)
  (path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_checkpoint(path)
  path = _copy("llama", tmp_path)
  shard = sorted(path.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    hf.load_checkpoint(path)


def test_bad_dtype():
  with pytest.raises(ValueError, match="float16"):
    hf.load_checkpoint(FIXTURES / "gpt2", "float16")


@pytest.mark.parametrize("text, match", [
    ("{'n_embd': 32}", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("\xff", "is not valid JSON")])
def test_config_json_that_is_not_an_object(tmp_path, text, match):
  path = _copy("gpt2", tmp_path)
  (path / "config.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(ValueError, match=f"{path / 'config.json'} {match}"):
    hf.load_checkpoint(path)


@pytest.mark.parametrize("family, key, value, match", [
    ("gpt2", "n_embd", "32", "n_embd='32' is not an integer"),
    ("gpt2", "n_layer", 2.0, "n_layer=2.0 is not an integer"),
    ("gpt2", "layer_norm_epsilon", "1e-5", "layer_norm_epsilon='1e-5' is not a number"),
    ("llama", "num_key_value_heads", True, "num_key_value_heads=True is not an integer"),
    ("llama", "tie_word_embeddings", "false", "tie_word_embeddings='false' is not true or false"),
    ("qwen3", "use_sliding_window", "no", "use_sliding_window='no' is not true or false"),
    ("gpt_neox", "use_parallel_residual", 1, "use_parallel_residual=1 is not true or false"),
    ("llama", "rope_parameters", "llama3", "rope_parameters='llama3' is not a JSON object"),
    ("gpt2", "activation_function", ["gelu_new"],
     r"activation_function=\['gelu_new'\] is not a string"),
    ("llama", "hidden_act", {"silu": 1}, r"hidden_act=\{'silu': 1\} is not a string"),
    ("olmo2", "rope_parameters", {"rope_type": ["default"], "rope_theta": 1e4},
     r"rope_type=\['default'\] is not a string")])
def test_config_value_of_the_wrong_type(tmp_path, family, key, value, match):
  path = _copy(family, tmp_path)
  _edit_json(path / "config.json", **{key: value})
  with pytest.raises(ValueError, match=f"{path / 'config.json'}: {match}"):
    hf.load_checkpoint(path)


def test_llama3_rope_field_of_the_wrong_type(tmp_path):
  path = _copy("llama", tmp_path)
  rope = json.loads((path / "config.json").read_text())["rope_parameters"]
  _edit_json(path / "config.json", rope_parameters=rope | {"factor": "8"})
  with pytest.raises(ValueError, match="config.json: factor='8' is not a number"):
    hf.load_checkpoint(path)
  _edit_json(path / "config.json", rope_parameters={k: v for k, v in rope.items() if k != "factor"})
  with pytest.raises(ValueError, match=r"config.json: config.json sets none of \('factor',\)"):
    hf.load_checkpoint(path)


@pytest.mark.parametrize("index, match", [
    ({"metadata": {}}, "has no weight_map"),
    ({"weight_map": []}, "has no weight_map"),
    ([], "holds a JSON list"),
    ({"weight_map": {"lm_head.weight": "../../etc/passwd"}},
     r"lists '\.\./\.\./etc/passwd', not a path inside"),
    ({"weight_map": {"lm_head.weight": "/etc/passwd"}}, "lists '/etc/passwd', not a path inside"),
    ({"weight_map": {"lm_head.weight": 3}}, "lists 3, not a path inside")])
def test_bad_safetensors_index(tmp_path, index, match):
  path = _copy("llama", tmp_path)
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=f"{path / 'model.safetensors.index.json'} {match}"):
    hf.load_checkpoint(path)


def _rewrite_header(file, edit):
  """Rewrites the JSON header of a safetensors file with edit(header), keeping the data."""
  raw = file.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
  header += b" " * (-len(header) % 8)
  file.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])


def _bigger(header):
  name = next(k for k in header if k != "__metadata__")
  header[name]["shape"][0] *= 2  # the data offsets no longer match the shape
  return header


@pytest.mark.parametrize("edit", [_bigger, lambda h: h | {"extra": {"dtype": "F32", "shape": [4],
                                                                     "data_offsets": [0, 16]}}])
def test_safetensors_header_that_lies(tmp_path, edit):
  path = _copy("llama", tmp_path)
  shard = sorted(path.glob("model-*.safetensors"))[1]
  _rewrite_header(shard, edit)
  with pytest.raises(ValueError, match=f"{shard} is not a valid safetensors file"):
    hf.load_checkpoint(path)


@pytest.mark.parametrize("value, match", [(3, "lists 3, not a path inside"),
                                          ([1], r"lists \[1\], not a path inside"),
                                          (None, "lists None, not a path inside")])
def test_weight_map_value_that_is_not_a_file_name(tmp_path, value, match):
  """One bad value among the real shard names is named (not a bare TypeError from sorting)."""
  path = _copy("llama", tmp_path)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  index["weight_map"]["model.norm.weight"] = value
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=f"{path / 'model.safetensors.index.json'} {match}"):
    hf.load_checkpoint(path)


def test_tensors_of_layers_beyond_n_layer_are_refused(tmp_path):
  path = _copy("gpt2", tmp_path)
  _edit_json(path / "config.json", n_layer=1)
  with pytest.raises(ValueError, match=r"12 tensor\(s\) that no parameter of the model in "
                                       r"config.json reads: transformer\.h\.1\.attn\.c_attn\.bias, "
                                       r".* and 7 more \(does config.json describe"):
    hf.load_checkpoint(path)


def test_stray_tensor_is_refused(tmp_path):
  path = _copy("olmo2", tmp_path)
  _edit_tensors(path / "model.safetensors",
                lambda t: t | {"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match=r"1 tensor\(s\) .* reads: model\.layers\.0\.mlp\.extra\."
                                       r"weight \(does"):
    hf.load_checkpoint(path)


def _add_buffers(path, family):
  """Adds the non-learned buffers older HF versions saved (mask biases, rotary inv_freq)."""
  mask = np.tril(np.ones((1, 1, 64, 64), bool))
  inv_freq = np.ones(8, np.float32)
  if family == "gpt2":
    extra = {f"transformer.h.{i}.attn.{b}": mask for i in (0, 1) for b in ("bias", "masked_bias")}
  elif family == "gpt_neox":
    buffers = {"bias": mask, "masked_bias": mask, "rotary_emb.inv_freq": inv_freq}
    extra = {f"gpt_neox.layers.{i}.attention.{b}": x for i in (0, 1) for b, x in buffers.items()}
  else:
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in (0, 1)}
  file = sorted(path.glob("*.safetensors"))[-1]  # the last shard, if sharded
  _edit_tensors(file, lambda t: t | extra)
  if (index := path / "model.safetensors.index.json").is_file():
    d = json.loads(index.read_text())
    d["weight_map"] |= {k: file.name for k in extra}
    index.write_text(json.dumps(d))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_buffers_hf_ignores_are_ignored(tmp_path, family):
  path = _copy(family, tmp_path)
  _add_buffers(path, family)
  *_, ref, _, z = _outputs(path)
  np.testing.assert_allclose(z, ref["logits"], rtol=0, atol=1e-4)


def test_tied_head_tensor_must_equal_the_embedding(tmp_path):
  path = _copy("gpt2", tmp_path)
  _edit_tensors(path / "model.safetensors",
                lambda t: t | {"lm_head.weight": t["transformer.wte.weight"]})
  *_, ref, _, z = _outputs(path)  # a tied head stored as well, as HF's _tied_weights_keys
  np.testing.assert_allclose(z, ref["logits"], rtol=0, atol=1e-4)
  _edit_tensors(path / "model.safetensors",
                lambda t: t | {"lm_head.weight": t["lm_head.weight"] * 2})
  with pytest.raises(ValueError, match=f"{path / 'model.safetensors'}: tensor lm_head.weight "
                                       f"differs from the embedding, which config.json ties"):
    hf.load_checkpoint(path)


def test_tensor_stored_in_two_shards(tmp_path):
  path = _copy("llama", tmp_path)
  first, _, last = sorted(path.glob("model-*.safetensors"))
  norm = load_file(last)["model.norm.weight"]
  _edit_tensors(first, lambda t: t | {"model.norm.weight": norm + 1})
  with pytest.raises(ValueError, match=f"{path}: tensor 'norm.weight' is stored twice: as "
                                       f"model.norm.weight in {first.name} and as "
                                       f"model.norm.weight in {last.name}"):
    hf.load_checkpoint(path)


def test_tensor_stored_with_and_without_the_prefix(tmp_path):
  path = _copy("gpt2", tmp_path)
  _edit_tensors(path / "model.safetensors",
                lambda t: t | {"h.0.ln_1.weight": t["transformer.h.0.ln_1.weight"]})
  with pytest.raises(ValueError, match="tensor 'h.0.ln_1.weight' is stored twice: as "
                                       "h.0.ln_1.weight in model.safetensors and as "
                                       "transformer.h.0.ln_1.weight in model.safetensors"):
    hf.load_checkpoint(path)


@pytest.mark.parametrize("family, name, value, dtype", [
    ("gpt2", "transformer.h.1.mlp.c_fc.weight", np.nan, "float32"),
    ("qwen3", "model.layers.0.self_attn.k_norm.weight", -np.inf, "bfloat16"),
    ("olmo2", "lm_head.weight", 1e300, "float32"),  # finite in float64, not in float32
])
def test_non_finite_weight_names_the_tensor(tmp_path, family, name, value, dtype):
  path = _copy(family, tmp_path)

  def poison(t):
    x = t[name].astype(np.float64 if value == 1e300 else t[name].dtype)
    x.flat[5] = value
    return t | {name: x}

  _edit_tensors(path / "model.safetensors", poison)
  with pytest.raises(ValueError, match=f"{path / 'model.safetensors'}: tensor {name} \\(for "
                                       f".*\\) holds NaN or Inf values in {dtype}"):
    hf.load_checkpoint(path, dtype)


@pytest.mark.parametrize("changes, match", [
    (dict(vocab_size=2**31), "vocab_size=2147483648 must be an integer in"),
    (dict(n_layer=10**12), r"tensor 'h\.2\.attn\.c_attn\.bias' .* is missing"),
    (dict(vocab_size=2**24, n_embd=2**12),
     r"wte\.weight has shape \(128, 32\), expected \(16777216, 4096\)")])
def test_absurd_sizes_refused_before_allocating(tmp_path, changes, match):
  """Shapes are checked against the headers before any array is allocated (no MemoryError)."""
  path = _copy("gpt2", tmp_path)
  _edit_json(path / "config.json", **changes)
  with pytest.raises(ValueError, match=match):
    hf.load_checkpoint(path)
