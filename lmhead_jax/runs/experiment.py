"""The experiment config: its schema (`base_config`, every key a run reads), what config.json holds
(`resolved`), the checks run before anything is built (`validate`, `validate_experiment`), and
`resolve`, the one place where it becomes the typed `Setup` that the layers below take."""

import dataclasses
import json
import math
import typing

import ml_collections

from lmhead_jax.core.config import HeadConfig, LossConfig, ModelConfig, check_range, from_mapping
from lmhead_jax.runs import divergence, grid
from lmhead_jax.training import setup
from lmhead_jax.training.optim import OptimizerConfig

WANDB_MODES = ("", "online", "offline", "disabled")


def _group(cls, skip: tuple[str, ...] = (), **defaults) -> ml_collections.ConfigDict:
  """A config group with one key per field of `cls` (less `skip`), defaulting to the field's
  default unless `defaults` gives one. An optional field keeps its type when set to None, so
  that `--config.<group>.<key>=...` can still override it."""
  group = {}
  for f in dataclasses.fields(cls):
    if f.name not in skip:
      value = defaults.pop(f.name, f.default)
      if type(None) in typing.get_args(f.type):
        kind = next(t for t in typing.get_args(f.type) if t is not type(None))
        value = ml_collections.FieldReference(value, field_type=typing.get_origin(kind) or kind)
      group[f.name] = value
  if defaults:
    raise ValueError(f"{cls.__name__} has no field(s) {sorted(defaults)}")
  return ml_collections.ConfigDict(group)


def base_config() -> ml_collections.ConfigDict:
  """Every key a training run reads, with its default; locked, so a preset or override that
  names an unknown key fails. Experiments add their own keys inside `cfg.unlocked()`."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = _group(ModelConfig, vocab_size=1024, d_model=64, n_layers=2, n_heads=4,
                   n_kv_heads=4, d_ff=256)
  # V and D come from `model`, data_vocab from the data (`resolve`)
  c.head = _group(HeadConfig, skip=("vocab_size", "d_model", "data_vocab"))
  c.loss = _group(LossConfig)
  c.data = ml_collections.ConfigDict(dict(
      kind="spamlang", seq_len=32, path="", eval_path="", shuffle=True, exclude_first=True,
      bos_id=0, window_mode="random",
      # a model vocab above the data's: its extra rows are left out of the softmax (resolve)
      allow_vocab_padding=False))
  c.train = ml_collections.ConfigDict(dict(
      steps=100, batch_size=32, log_every=10, eval_every=0, eval_batches=4,
      bottleneck_every=1, grad_accum=1, alignment_weight=0.0,
      # bottleneck/realized_cosine (a forward pass with tangents, ≈ 2/3 of a step's FLOPs) on
      # the metric steps that are multiples of this, and the last; 0: never
      realized_cosine_every=100,
      # lmhead_jax.runs.divergence: a loss above factor × its running minimum (0: not
      # checked), or pinned at ln V with no gradient, for `patience` steps: warn, stop or off.
      divergence_factor=3.0, divergence_patience=20, divergence_action="warn"))
  c.optimizer = _group(OptimizerConfig)
  c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=3))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.figures = ml_collections.ConfigDict(dict(format="png"))  # png, svg or pdf
  # W&B is on when wandb_project is set; wandb_mode "" is W&B's own default ($WANDB_MODE, else
  # online). Off a terminal, progress is a plain line every progress_every_s seconds.
  c.logging = ml_collections.ConfigDict(dict(
      wandb_project="", wandb_entity="", wandb_mode="", progress_every_s=30.0))
  c.sweep = ()  # grids of runs (lmhead_jax.runs.sweep); empty: one run
  c.lock()
  return c


def configs(cfg) -> tuple[ModelConfig, HeadConfig]:
  """The typed model and head configs of an experiment config."""
  model = ModelConfig.of(cfg.model)
  return model, HeadConfig.of(cfg.head, model)


def optimizer_config(cfg) -> OptimizerConfig:
  return from_mapping(OptimizerConfig, cfg.optimizer, "optimizer")


def resolve(cfg, mesh=None) -> setup.Setup:
  """The Setup of an experiment config (on `mesh`, if given): the config is read here, once.
  With data.allow_vocab_padding, the head's data_vocab is the token data's vocab_size."""
  model, head = configs(cfg)
  if cfg.data.kind == "tokens" and cfg.data.allow_vocab_padding and cfg.data.path:
    from lmhead_jax.data.tokens import read_index
    data_vocab = int(read_index(cfg.data.path)["vocab_size"])
    if data_vocab < head.vocab_size:
      head = dataclasses.replace(head, data_vocab=data_vocab)
  t = cfg.train
  return setup.build(model, head, optimizer_config(cfg), seed=int(cfg.seed), steps=int(t.steps),
                     batch_size=int(t.batch_size), grad_accum=int(t.grad_accum),
                     seq_len=int(cfg.data.seq_len), alignment_weight=float(t.alignment_weight),
                     loss=from_mapping(LossConfig, cfg.get("loss") or {}, "loss"), mesh=mesh)


def resolved(cfg) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose `model` and `head` groups hold what the run uses: the family flags
  filled in, `head.kind` 'tied' when the embeddings are tied. What config.json should hold."""
  model, head = configs(cfg)
  head = dataclasses.asdict(head)
  return ml_collections.ConfigDict(cfg.to_dict() | {
      "model": dataclasses.asdict(model), "head": {k: head[k] for k in cfg.head}})


# Ranges of the numeric keys besides model.* and head.* (ModelConfig and HeadConfig check
# those): key -> (low, high, check_range options). A missing group (measure.*, spectrum.*) is
# skipped.
def flat(d: dict, prefix: str = "") -> dict:
  """A nested dict (a config as JSON) as {dotted key: value}."""
  out = {}
  for k, v in d.items():
    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def changed_keys(recorded: dict, cfg) -> dict:
  """{dotted key: (recorded, now)} where a recorded resolved config (config.json without its
  `history`) differs from `cfg` resolved. A key the record lacks (added to the schema since)
  counts as changed only when `cfg` sets it away from its default."""
  old, new = flat(recorded), flat(json.loads(resolved(cfg).to_json()))
  defaults = flat(base_config().to_dict())
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k, defaults.get(k)) != new.get(k)}


RANGES = {
    "seed": (0, 2**32 - 1, dict(integer=True)),  # grain's seed range
    **{key: (1, math.inf, dict(integer=True)) for key in (
        "train.batch_size", "train.log_every", "train.grad_accum", "train.divergence_patience",
        "data.seq_len", "checkpoint.keep", "measure.batch_size", "measure.num_sequences")},
    **{key: (0, math.inf, dict(integer=True)) for key in (
        "train.eval_every", "train.eval_batches", "train.bottleneck_every", "checkpoint.every",
        "optimizer.warmup_steps", "train.realized_cosine_every")},
    "train.alignment_weight": (0, math.inf, {}),
    "optimizer.learning_rate": (0, math.inf, dict(low_open=True)),
    "optimizer.end_lr_fraction": (0, 1, {}),
    "optimizer.weight_decay": (0, math.inf, {}),
    "optimizer.clip_norm": (0, math.inf, {}),  # 0: no clipping
    "optimizer.b1": (0, 1, dict(high_open=True)),
    "optimizer.b2": (0, 1, dict(high_open=True)),
    "optimizer.eps": (0, math.inf, dict(low_open=True)),
    "optimizer.momentum": (0, 1, dict(high_open=True)),  # 0: plain SGD
    "spectrum.gram_max_gib": (0, math.inf, dict(low_open=True)),
    "spectrum.host_max_gib": (0, math.inf, {}),  # 0: half the host's memory
    "spectrum.rank_k": (0, math.inf, dict(integer=True)),
    "spectrum.power_iters": (0, math.inf, dict(integer=True)),
}


def _check(cfg, key: str, low: float, high: float = math.inf, **options) -> None:
  """check_range on the dotted `key` of `cfg`; skipped when its group is absent."""
  group, _, name = key.rpartition(".")
  if not group or group in cfg:
    check_range(key, (cfg[group] if group else cfg)[name], low, high, **options)


def validate(cfg) -> None:
  """Checks a run's config before anything is built or compiled; errors name the key, its value
  and what it may be. Every numeric key of base_config has a range (RANGES and the checks below;
  model.* and head.* in ModelConfig and HeadConfig): NaN fails them all, inf all but
  logging.progress_every_s (inf: a progress line at the last step only).

  A measurement config (one with a `measure` group) may have train.steps=0: it trains no model.
  """
  from lmhead_jax.data import pipeline  # lazy: grain is slow to import
  from lmhead_jax.data.tokens import read_index

  model, head = configs(cfg)
  _check(cfg, "train.steps", 0 if "measure" in cfg else 1, integer=True)
  for key, (low, high, options) in RANGES.items():
    _check(cfg, key, low, high, **options)
  _check(cfg, "data.bos_id", 0, model.vocab_size - 1, integer=True)
  for axis, size in cfg.mesh.items():
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
      raise ValueError(f"mesh.{axis}={size!r} must be an integer >= 1, or -1 (the devices left)")
  t = cfg.train
  if t.alignment_weight > 0 and (head.kind == "mos" or head.chunk_size is not None):
    raise ValueError(f"train.alignment_weight={t.alignment_weight} needs G and one matrix W: "
                     f"not with head.kind={head.kind!r}, head.chunk_size={head.chunk_size}")
  if t.eval_every > 0 and t.eval_batches < 1:
    raise ValueError(f"train.eval_batches={t.eval_batches} must be >= 1 when evals are on "
                     f"(train.eval_every={t.eval_every}); set train.eval_every=0 for none")
  if not (t.divergence_factor == 0 or 1 < t.divergence_factor < math.inf):
    raise ValueError(f"train.divergence_factor={t.divergence_factor!r} must be 0 (off) or a "
                     "finite number > 1")
  if t.divergence_action not in divergence.ACTIONS:
    raise ValueError(f"train.divergence_action={t.divergence_action!r} is not one of "
                     f"{divergence.ACTIONS}")
  optimizer_config(cfg)
  from_mapping(LossConfig, cfg.loss, "loss")
  mode, project = cfg.logging.wandb_mode, cfg.logging.wandb_project
  if mode not in WANDB_MODES:
    raise ValueError(f"logging.wandb_mode={mode!r} is not one of {WANDB_MODES}")
  if project and mode != "disabled":
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ValueError(f"logging.wandb_project={project!r} needs the wandb package: "
                       'pip install -e ".[wandb]"') from None
  if not cfg.logging.progress_every_s >= 0:
    raise ValueError(f"logging.progress_every_s={cfg.logging.progress_every_s!r} must be >= 0")
  if cfg.data.kind not in pipeline.KINDS:
    raise ValueError(f"data.kind={cfg.data.kind!r} is not one of {pipeline.KINDS}")
  for key in ("path", "eval_path"):
    if cfg.data.kind == "tokens" and cfg.data[key]:
      try:
        data_vocab = int(read_index(cfg.data[key])["vocab_size"])
      except (OSError, ValueError) as e:
        raise ValueError(f"data.{key}={cfg.data[key]!r} is not a token directory: {e}") from e
      if "measure" in cfg:  # measuring: V comes from the model
        continue
      if data_vocab > cfg.model.vocab_size:
        raise ValueError(f"data.{key}={cfg.data[key]!r} holds ids of vocab_size={data_vocab}, "
                         f"more than model.vocab_size={cfg.model.vocab_size}")
      if data_vocab < cfg.model.vocab_size and not cfg.data.allow_vocab_padding:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} but data.{key}={cfg.data[key]!r} holds "
            f"ids of vocab_size={data_vocab}: {cfg.model.vocab_size - data_vocab} rows of the "
            "head would never be a target. Set "
            f"model.vocab_size={data_vocab}, or data.allow_vocab_padding=True to pad on purpose "
            "(the padding rows are then left out of the softmax and the bottleneck metrics)")


def validate_experiment(cfg) -> None:
  """`validate` on every run of `cfg.sweep` (or on `cfg`), before the first one starts."""
  for overrides in grid.expand(cfg.get("sweep") or ({},)):
    try:
      validate(grid.configure(cfg, overrides))
    except ValueError as e:
      if overrides:
        raise ValueError(f"sweep run {grid.run_name(overrides)}: {e}") from e
      raise
