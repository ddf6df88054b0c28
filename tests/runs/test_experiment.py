"""The config schema: every key declared once, unknown keys refused, resolved printing, checks."""

import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import helpers
import ml_collections
import numpy as np
import pytest
from helpers import ALL, PRESETS

from experiments import rank_sweep, spamlang
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.data import hf
from lmhead_jax.data.tokens import write_token_dir
from lmhead_jax.runs import experiment, measurement


ROOT = helpers.ROOT


# Names that stand for one config group in one file (besides `cfg` and `run_cfg`).
ALIASES = {"lmhead_jax/training/optim.py": {"o": "optimizer"},
           "lmhead_jax/data/pipeline.py": {"data_cfg": "data"},
           "lmhead_jax/runs/corpus.py": {"d": "data", "data": "data"},
           "experiments/gradient_spectrum.py": {"sp": "spectrum"},
           "experiments/update_direction.py": {"u": "update_dir"}}


NOT_CONFIG_DICTS = {"lmhead_jax/core/heads.py"}  # its `cfg` is a HeadConfig


def flat_keys(c, prefix=""):
  out = set()
  for k, v in c.items():
    out.add(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out |= flat_keys(v, f"{prefix}{k}.")
  return out


def keys_read_in_source() -> dict[str, set[str]]:
  """Dotted config keys that the library and experiments read, found in their source text."""
  reads = {}
  files = sorted(ROOT.glob("lmhead_jax/**/*.py")) + sorted(ROOT.glob("experiments/*.py"))
  for path in files:
    rel = str(path.relative_to(ROOT))
    if rel in NOT_CONFIG_DICTS:
      continue
    text = path.read_text()
    for m in re.finditer(r"\b(?:cfg|run_cfg)\.(\w+(?:\.\w+)?)\b(?!\s*\()", text):
      reads.setdefault(m[1], set()).add(rel)
    for name, group in ALIASES.get(rel, {}).items():
      for m in re.finditer(rf"\b{name}\.(\w+)\b(?!\s*\()", text):
        reads.setdefault(f"{group}.{m[1]}", set()).add(rel)
  return reads


def test_every_key_read_is_declared():
  declared = flat_keys(experiment.base_config()) | flat_keys(measurement.base_config())
  for module, preset in ALL:
    declared |= flat_keys(module.get_config(preset))
  reads = keys_read_in_source()
  assert len(reads) > 60  # the scan finds the reads (optimizer, data, train, ... keys)
  assert {"optimizer.learning_rate", "data.bos_id", "train.steps", "spectrum.rank_k",
          "train.divergence_factor", "train.divergence_action"} <= set(reads)
  missing = {k: sorted(v) for k, v in reads.items() if k not in declared}
  assert not missing, f"keys read but never declared: {missing}"


def test_model_and_head_groups_are_the_dataclass_fields():
  cfg = experiment.base_config()
  assert set(cfg.model) == {f.name for f in dataclasses.fields(ModelConfig)}
  # V and D come from the model, data_vocab from the data
  assert set(cfg.head) == {f.name for f in dataclasses.fields(HeadConfig)} - {
      "vocab_size", "d_model", "data_vocab"}


@pytest.mark.parametrize("key,value", [
    ("norm", "layer"), ("bias", True), ("mlp_act", "gelu"), ("pos", "learned"),
    ("rotary_pct", 0.5), ("parallel_residual", True), ("norm_position", "post"),
    ("qk_norm", "head"), ("rope_scaling", (8.0, 1.0, 4.0, 64)), ("d_ff", 96), ("head_dim", 8)])
def test_optional_model_keys_are_settable(key, value):
  cfg = experiment.base_config()
  cfg.model[key] = value
  assert getattr(ModelConfig.of(cfg.model), key) == value
  cfg.model[key] = None  # back to the family default; the key keeps its type
  cfg.model[key] = value
  assert getattr(ModelConfig.of(cfg.model), key) == value


def test_presets_are_every_preset_of_every_experiment():
  """PRESETS (which the tests below validate) lists each experiments/*.py module with a
  get_config, with the presets its unknown-preset error names."""
  found = {}
  for path in sorted((ROOT / "experiments").glob("*.py")):
    module = importlib.import_module(f"experiments.{path.stem}")
    if hasattr(module, "get_config"):
      with pytest.raises(ValueError, match=r"\(known: ([\w, ]+)\)") as e:
        module.get_config("no-such-preset")
      found[module] = tuple(re.search(r"\(known: ([\w, ]+)\)", str(e.value))[1].split(", "))
  assert found == PRESETS


@pytest.mark.parametrize("module,preset", ALL)
def test_presets_refuse_unknown_keys(module, preset):
  cfg = module.get_config(preset)
  experiment.validate_experiment(cfg)
  with pytest.raises(KeyError, match="stepz"):
    cfg.train.update(stepz=5)
  with pytest.raises(AttributeError, match="biass"):
    cfg.model.biass = True
  with pytest.raises(AttributeError, match="optimiser"):
    cfg.optimiser = {}


def test_resolved_fills_the_family_flags():
  cfg = experiment.base_config()
  cfg.model.update(family="gpt_neox", n_heads=4, d_model=64, qk_norm="head")
  out = experiment.resolved(cfg)
  # GPT-NeoX (Pythia): LayerNorm with biases, exact GELU, parallel residual, 25% rotary.
  assert {k: out.model[k] for k in ("norm", "bias", "mlp_act", "pos", "rotary_pct",
                                    "parallel_residual", "norm_position", "qk_norm")} == dict(
      norm="layer", bias=True, mlp_act="gelu", pos="rope", rotary_pct=0.25,
      parallel_residual=True, norm_position="pre", qk_norm="head")  # the explicit flag wins
  assert cfg.model.norm is None  # the input is untouched
  assert out.train.to_dict() == cfg.train.to_dict() and out.sweep == cfg.sweep
  # config.json holds this; read back (lists for tuples), it gives the same model.
  cfg.model.rope_scaling = (8.0, 1.0, 4.0, 64)
  back = ml_collections.ConfigDict(json.loads(experiment.resolved(cfg).to_json()))
  assert ModelConfig.of(back.model) == ModelConfig.of(cfg.model)


def test_resolved_head_kind_is_tied_with_tied_embeddings():
  cfg = experiment.base_config()
  cfg.model.tie_embeddings = True
  assert experiment.resolved(cfg).head.kind == "tied"


def bad(key, value, **more):
  return pytest.param({key: value, **more}, f"{key}={value!r}", id=f"{key}={value}")


@pytest.mark.parametrize("overrides,needle", [
    bad("train.log_every", 0), bad("train.steps", -5), bad("train.steps", 0),
    bad("train.batch_size", 0), bad("train.grad_accum", 0), bad("train.eval_every", -1),
    bad("train.eval_batches", 0, **{"train.eval_every": 10}), bad("train.eval_batches", -1),
    bad("train.bottleneck_every", -1), bad("checkpoint.every", -1), bad("checkpoint.keep", 0),
    bad("checkpoint.keep", -2), bad("data.seq_len", 0), bad("optimizer.warmup_steps", -1),
    bad("optimizer.learning_rate", -0.1), bad("optimizer.clip_norm", -1.0),
    bad("optimizer.name", "adam"), bad("optimizer.schedule", "step"), bad("data.kind", "images"),
    bad("model.qk_norm", "both"), bad("head.kind", "tide")])
def test_validate_names_key_and_value(overrides, needle):
  cfg = spamlang.get_config("smoke")
  for key, value in overrides.items():
    group, name = key.split(".")
    cfg[group][name] = value
  with pytest.raises(ValueError, match=re.escape(needle)):
    experiment.validate(cfg)


def set_key(cfg, key, value):
  group, _, name = key.rpartition(".")
  (cfg[group] if group else cfg)[name] = value


def out_of_range(key, value, allowed):
  return pytest.param(key, value, f"{key}={value!r} must be {allowed}", id=f"{key}={value}")


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("key,value,message", [
    out_of_range("optimizer.learning_rate", 0.0, "a finite number > 0"),
    out_of_range("optimizer.learning_rate", NAN, "a finite number > 0"),
    out_of_range("optimizer.learning_rate", INF, "a finite number > 0"),
    out_of_range("optimizer.end_lr_fraction", -1.0, "a finite number in [0, 1]"),
    out_of_range("optimizer.end_lr_fraction", 1.5, "a finite number in [0, 1]"),
    out_of_range("optimizer.end_lr_fraction", INF, "a finite number in [0, 1]"),
    out_of_range("optimizer.clip_norm", NAN, "a finite number >= 0"),
    out_of_range("optimizer.weight_decay", NAN, "a finite number >= 0"),
    out_of_range("optimizer.b1", 1.5, "a finite number in [0, 1)"),
    out_of_range("optimizer.b1", -0.1, "a finite number in [0, 1)"),
    out_of_range("optimizer.b2", 1.0, "a finite number in [0, 1)"),
    out_of_range("optimizer.eps", -1.0, "a finite number > 0"),
    out_of_range("optimizer.eps", 0.0, "a finite number > 0"),
    out_of_range("optimizer.momentum", -0.5, "a finite number in [0, 1)"),
    out_of_range("optimizer.momentum", 5.0, "a finite number in [0, 1)"),
    out_of_range("train.alignment_weight", NAN, "a finite number >= 0"),
    out_of_range("train.divergence_patience", 0, "an integer >= 1"),
    out_of_range("seed", -1, "an integer in [0, 4294967295]"),
    out_of_range("seed", 2**32, "an integer in [0, 4294967295]"),
    out_of_range("data.bos_id", 1024, "an integer in [0, 1023]"),  # the smoke preset's V=1024
    out_of_range("model.norm_eps", -1.0, "a finite number > 0"),
    out_of_range("model.rope_theta", 0.0, "a finite number > 0"),
    out_of_range("model.rope_theta", INF, "a finite number > 0"),
    out_of_range("model.rotary_pct", NAN, "a finite number in (0, 1]"),
    out_of_range("model.head_dim", 0, "an integer >= 1"),
    out_of_range("model.d_ff", 0, "an integer >= 1"),
    out_of_range("model.n_kv_heads", 0, "an integer >= 1"),
    out_of_range("model.n_layers", 0, "an integer >= 1"),
    out_of_range("model.max_seq_len", -1, "an integer >= 1"),
    out_of_range("model.vocab_size", 2**31, "an integer in [2, 16777216]"),
    out_of_range("model.vocab_size", 1, "an integer in [2, 16777216]"),
    out_of_range("head.chunk_size", 0, "an integer >= 1"),
    out_of_range("head.ortho_weight", INF, "a finite number >= 0"),
    pytest.param("model.rope_scaling", (8.0, 1.0, 1.0, 64),
                 "model.rope_scaling[2] (high_freq_factor, above low_freq_factor)=1.0 must be a "
                 "finite number > 1", id="rope_scaling high=low"),
    pytest.param("model.rope_scaling", (-8.0, 1.0, 4.0, 64),
                 "model.rope_scaling[0] (factor)=-8.0 must be a finite number > 0",
                 id="rope_scaling factor<0"),
    pytest.param("train.divergence_factor", 0.5,
                 "train.divergence_factor=0.5 must be 0 (off) or a finite number > 1", id="f=0.5"),
    pytest.param("train.divergence_factor", NAN,
                 "train.divergence_factor=nan must be 0 (off) or a finite number > 1", id="f=nan"),
    pytest.param("train.divergence_action", "stopp", "train.divergence_action='stopp' is not one "
                 "of ('warn', 'stop', 'off')", id="action=stopp"),
    pytest.param("mesh.fsdp", 0, "mesh.fsdp=0 must be an integer >= 1, or -1 (the devices left)",
                 id="mesh.fsdp=0"),
])
def test_validate_refuses_values_out_of_range(key, value, message):
  """Each refused before step 1, naming the key, its value and the allowed range (once accepted:
  a negative lr from step 22, clipping silently off, a later 'non-finite' stop naming no key,
  a ZeroDivisionError, a MemoryError)."""
  cfg = spamlang.get_config("smoke")
  set_key(cfg, key, value)
  with pytest.raises(ValueError) as e:
    experiment.validate(cfg)
  assert str(e.value) == message


@pytest.mark.parametrize("edit,message", [
    pytest.param({"rms_norm_eps": -1.0}, "model.norm_eps=-1.0 must be a finite number > 0",
                 id="rms_norm_eps"),
    pytest.param({"head_dim": 0}, "model.head_dim=0 must be an integer >= 1", id="head_dim"),
    pytest.param({"vocab_size": 2**31},
                 "model.vocab_size=2147483648 must be an integer in [2, 16777216]", id="vocab")])
def test_hf_config_values_out_of_range_are_refused(tmp_path, edit, message):
  """ModelConfig's own checks guard the HF import too."""
  shutil.copy(ROOT / "tests/fixtures/hf/llama/config.json", tmp_path / "config.json")
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(config | edit))
  with pytest.raises(ValueError) as e:
    hf.load_checkpoint(tmp_path)
  assert str(e.value) == f"{tmp_path / 'config.json'}: {message}"


def test_validate_accepts_the_range_edges():
  cfg = spamlang.get_config("smoke")
  cfg.seed = 2**32 - 1
  cfg.data.bos_id = cfg.model.vocab_size - 1
  cfg.optimizer.update(end_lr_fraction=1.0, clip_norm=0.0, weight_decay=0.0, b1=0.0, b2=0.0,
                       momentum=0.0)
  cfg.train.update(divergence_factor=0.0, divergence_patience=1, divergence_action="off")
  cfg.mesh.data = -1
  experiment.validate(cfg)
  cfg.model.vocab_size = 2**24
  cfg.train.divergence_factor = 1.01
  experiment.validate(cfg)


def test_validate_accepts_the_edges():
  cfg = spamlang.get_config("smoke")
  cfg.train.update(steps=1, eval_every=0, eval_batches=0, bottleneck_every=0, log_every=1)
  cfg.checkpoint.update(every=0, keep=1)
  experiment.validate(cfg)
  measuring = measurement.base_config()  # trains no model
  assert measuring.train.steps == 0
  experiment.validate(measuring)
  measuring.train.steps = -1
  with pytest.raises(ValueError, match="train.steps=-1"):
    experiment.validate(measuring)


def test_validate_checks_token_dirs(tmp_path):
  write_token_dir(tmp_path / "val", [np.arange(100)], vocab_size=128, tokenizer="none")
  cfg = rank_sweep.get_config("cpu")
  cfg.head.rank = 16  # one run of the sweep
  cfg.model.vocab_size = 128
  cfg.data.update(path=str(tmp_path / "val"), eval_path=str(tmp_path / "val"))
  experiment.validate(cfg)
  cfg.data.eval_path = str(tmp_path / "nope")
  needle = f"data.eval_path='{tmp_path}/nope' is not a token directory: token index " \
           f"{tmp_path}/nope/index.json does not exist"
  with pytest.raises(ValueError, match=re.escape(needle)):
    experiment.validate(cfg)
  cfg.data.eval_path = str(tmp_path / "val")
  cfg.model.vocab_size = 127  # the data holds ids up to 127
  with pytest.raises(ValueError, match=re.escape(
      f"data.path='{tmp_path}/val' holds ids of vocab_size=128, more than model.vocab_size=127")):
    experiment.validate(cfg)


def test_validate_experiment_checks_every_sweep_run():
  cfg = spamlang.get_config("demo")
  cfg.sweep = ({"model.d_model": (64, 8), "train.batch_size": (32, 0)},)
  with pytest.raises(ValueError, match=r"sweep run d_model=64\+batch_size=0: "
                                       r"train.batch_size=0 must be an integer >= 1"):
    experiment.validate_experiment(cfg)


def spamlang_cli(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.spamlang",
                         f"--config={ROOT}/experiments/spamlang.py:demo", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_print_config_prints_each_runs_resolved_config_and_exits(tmp_path):
  proc = spamlang_cli("--config.model.family=gpt2", "--config.model.bias=False",
                      "--print_config", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout)  # demo is a sweep: each run's config under its run name
  assert list(out) == [f"d_model={d}+learning_rate=0.1+name=sgd+seed=0"
                       for d in (64, 8)]
  for d, run in zip((64, 8), out.values()):
    assert run["model"]["d_model"] == d and run["model"]["bias"] is False
    # GPT-2: LayerNorm, tanh-approximated GELU, learned absolute positions.
    assert (run["model"]["norm"], run["model"]["mlp_act"], run["model"]["pos"]) == (
        "layer", "gelu_tanh", "learned")
    assert run["optimizer"]["name"] == "sgd" and run["train"]["steps"] == 1500
  assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args,needle", [
    (["--workdir="], "--workdir=DIR is required and must not be empty"),
    (["--workdir=   "], "--workdir=DIR is required and must not be empty"),
    ([], "--workdir=DIR is required and must not be empty"),
    (["--workdir=out", "--config.train.log_every=0"],
     "invalid config: sweep run d_model=64+learning_rate=0.1+name=sgd+seed=0:"
     " train.log_every=0 must be an integer >= 1")])
def test_cli_refuses_before_writing_anything(tmp_path, args, needle):
  proc = spamlang_cli(*args, cwd=tmp_path)
  assert proc.returncode != 0
  assert needle in proc.stderr
  assert list(tmp_path.iterdir()) == []


def test_changed_keys_ignores_keys_added_since_at_their_default():
  cfg = experiment.base_config()
  recorded = json.loads(experiment.resolved(cfg).to_json())
  del recorded["train"]["divergence_factor"]  # a config.json written before the key existed
  assert experiment.changed_keys(recorded, cfg) == {}
  cfg.train.divergence_factor = 5.0
  cfg.optimizer.learning_rate = 0.5
  assert experiment.changed_keys(recorded, cfg) == {
      "optimizer.learning_rate": (1e-3, 0.5), "train.divergence_factor": (None, 5.0)}


def test_a_model_vocab_above_the_datas_is_refused_unless_padding_is_asked_for(tmp_path):
  write_token_dir(tmp_path / "tok", [np.arange(600) % 512], vocab_size=512, tokenizer="t")
  cfg = experiment.base_config()
  cfg.data.update(kind="tokens", path=str(tmp_path / "tok"))
  cfg.model.vocab_size = 4096
  with pytest.raises(ValueError, match=r"model.vocab_size=4096 but data.path=.* vocab_size=512: "
                     r"3584 rows .*data.allow_vocab_padding=True"):
    experiment.validate(cfg)
  cfg.data.allow_vocab_padding = True
  experiment.validate(cfg)
  cfg.model.vocab_size = 512
  cfg.data.allow_vocab_padding = False
  experiment.validate(cfg)
