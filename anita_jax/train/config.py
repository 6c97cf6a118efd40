"""One training stage's configuration: every field, its default, validation, and the ConfigDict boundary.

The frozen dataclasses below are the one list of fields. Recipe configs
(`configs/*.py`) start from `stage_config(stage)`, a ConfigDict built from
them, and change fields; `--config.FIELD=VALUE` overrides any of them.
`freeze` turns that ConfigDict into a `StageConfig`, validated: below the
entry points (apps/ and the scripts, which also hold ConfigDicts) this is the
only module that imports ml_collections; everything else reads plain frozen
dataclasses. Importable without JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from anita_jax import files
from anita_jax.errors import UserError
from anita_jax.model.config import ATTENTION_KINDS, PROJECTIONS, REMAT_POLICIES

STAGES = ("sft", "dpo", "lm")
_frozen = dataclasses.dataclass(frozen=True)


@_frozen
class ModelFields:
  path: str = "embedded"  # a model PATH; "embedded" = the SmolLM2-135M-Instruct GGUF
  tokenizer: str | None = None  # default: model.path
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots | dots_no_batch
  # Training/eval attention: dot (plain, materialises the [T, T] scores) | splash (blockwise Pallas TPU
  # kernel, skips the masked tiles; for long sequences on TPU). Decoding with a KV cache always uses dot.
  attention: str = "dot"
  license: str = "apache-2.0"  # of the base model, for exported model cards


@_frozen
class GenerationFields:
  """Sampling defaults written into exported generation_config.json (temperature 0: greedy)."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 256


@_frozen
class QuantFields:
  type: str = "nf4"  # none | nf4 | int4
  block_size: int = 64
  double_quant: bool = True


@_frozen
class LoraFields:
  rank: int = 16
  alpha: float = 8.0
  dropout: float = 0.0
  rslora: bool = False
  targets: str = ",".join(PROJECTIONS)


@_frozen
class DataFields:
  train: str = ""  # a file, directory or hub id; several separated by commas
  eval: str = ""
  config_name: str | None = None
  split: str = "train"
  eval_split: str = "train"
  format: str = "auto"
  max_length: int = 512
  max_prompt_length: int | None = None  # dpo
  packing: bool = False
  mask: str = "all"  # all (ANITA) | assistant
  truncation: str = "truncate"  # truncate | drop
  max_rows: int | None = None


@_frozen
class TrainFields:
  steps: int = 0  # 0: derived from train.epochs
  epochs: int = 1
  batch_size: int = 8
  grad_accum: int = 1
  lr: float = 2e-4
  schedule: str = "linear"  # linear | cosine | constant
  warmup_steps: int = 0
  warmup_ratio: float = 0.0
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: only at the end
  eval_on_start: bool = False  # also evaluate the untrained model (logged as step 0), as HF's eval_on_start
  trainable: str = "lora"  # comma list of: lora, embed_tokens, lm_head, norms
  on_nonfinite: str = "stop"  # stop | skip


DPO_OBJECTIVES = ("dpo", "cpo", "orpo")  # dpo.objective: TRL's DPOTrainer, CPOTrainer, ORPOTrainer


@_frozen
class DpoFields:
  # dpo (a reference model) | cpo, orpo (reference-free: TRL's CPO/SimPO/AlphaPO and ORPO; no reference pass)
  objective: str = "dpo"
  beta: float = 0.1  # for orpo: the odds-ratio term's weight, ORPO's lambda (TRL's ORPOConfig.beta)
  loss_type: str = "sigmoid"  # one type or a comma list (TRL's weighted sum), "sft" in it being the SFT term
  loss_weights: str = ""  # comma list of floats, one per loss_type entry; empty: all 1.0
  label_smoothing: float = 0.0
  discopop_tau: float = 0.05  # read by loss_type discopop only
  sft_weight: float = 0.0  # the SFT term's weight, as an "sft" entry in loss_type (set one of the two)
  reference: str = "base"  # base (adapters disabled) | precomputed
  # With reference=precomputed and objective=dpo: a model PATH (HF directory, .gguf, hub id, gs://) whose log-probs
  # are the reference, TRL's ref_model; computed once before training, that model loaded dense in model.dtype
  # (quant.* is the policy's), without adapters, then freed. Its vocabulary must be the policy's. "": none.
  reference_model: str = ""
  # LD-DPO's alpha, in [0, 1]: each completion's tokens past the shorter one's length count with this weight in
  # the policy and reference log-probs. 1.0 weights every token alike: exactly TRL's ld_alpha=None (its off).
  ld_alpha: float = 1.0
  # objective=cpo (TRL's CPOConfig names and defaults)
  cpo_alpha: float = 1.0  # the weight of the NLL of the chosen completions (loss_type alphapo: 0, as TRL sets it)
  simpo_gamma: float = 0.5  # SimPO's target reward margin (loss_type simpo, alphapo)
  alpha: float = 0.0  # AlphaPO's reward shape r = (1 - p^-alpha) / alpha; 0: the log-prob itself


@_frozen
class CheckpointFields:
  every: int = 100
  keep: int = 2


@_frozen
class MeshFields:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@_frozen
class StageConfig:
  stage: str = "sft"
  init_from: str | None = None  # a previous stage's workdir
  # How a stage with init_from starts. stacked: the first stage's quantized base plus every earlier stage's
  # adapter, kept frozen (exactly the previous stage's function; DPO's reference). merged: the previous
  # stage's merged model (merge_into: its dequantized or original base), re-quantized per this stage's quant.
  init_as: str = "stacked"
  merge_into: str = "dequantized"  # | "original"
  model: ModelFields = ModelFields()
  generation: GenerationFields = GenerationFields()
  quant: QuantFields = QuantFields()
  lora: LoraFields = LoraFields()
  data: DataFields = DataFields()
  train: TrainFields = TrainFields()
  dpo: DpoFields = DpoFields()
  checkpoint: CheckpointFields = CheckpointFields()
  mesh: MeshFields = MeshFields()


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _to_config_dict(obj) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict()
  hints = _hints(type(obj))
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      out[f.name] = _to_config_dict(value)
    elif value is None:  # an optional field: typed, so --config.FIELD=VALUE parses
      kind = next(t for t in typing.get_args(hints[f.name]) if t is not type(None))
      out[f.name] = config_dict.placeholder(kind)
    else:
      out[f.name] = value
  return out


def stage_config(stage: str = "sft") -> ml_collections.ConfigDict:
  """The ConfigDict of a stage with every field at its default, for configs/*.py and --config flags."""
  return _to_config_dict(StageConfig(stage=stage))


def recipe_config(stage, arg: str | None, source: str, recipes: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """A recipe config file's `get_config(arg)`: `stage(name)` for ARG sft, dpo or lm; without ARG the whole
  recipe (scripts/anita.py): one stage config per stage, `export.gguf` (a comma list of GGUF types written to
  DIR/gguf; "" for none) and `report` (greedy answers of at most max_new_tokens; max_rows > 0 cuts each
  held-out file to its first rows). `recipes`: the file's other ARGs (whole recipes), named in the error."""
  if arg:
    if arg not in STAGES:
      more = "".join(f", :{name} (a whole recipe)" for name in recipes)
      raise ValueError(f"unknown stage '{arg}': {source} has {', '.join(STAGES)} (and, without :ARG, the whole "
                       f"recipe, for scripts/anita.py{more})")
    return stage(arg)
  recipe = ml_collections.ConfigDict({name: stage(name) for name in STAGES})
  recipe.export = ml_collections.ConfigDict({"gguf": "f16"})
  recipe.report = ml_collections.ConfigDict({"max_new_tokens": 64, "max_rows": 0})
  return recipe


def _build(cls, values: dict, prefix: str = ""):
  known = {f.name: f for f in dataclasses.fields(cls)}
  for key in values:
    if key not in known:
      raise UserError(f"config field '{prefix}{key}' does not exist")
  kwargs = {}
  for name, f in known.items():
    if name not in values:
      continue
    value, default = values[name], getattr(cls(), name)
    if dataclasses.is_dataclass(default):
      if not isinstance(value, dict):
        raise UserError(f"config field '{prefix}{name}' must be a group of fields, not {value!r}")
      value = _build(type(default), value, f"{prefix}{name}.")
    kwargs[name] = value
  return cls(**kwargs)


def from_dict(values: dict) -> StageConfig:
  """A StageConfig of nested dicts (missing fields: defaults; unknown fields: an error)."""
  return _build(StageConfig, values)


def freeze(c) -> StageConfig:
  """The StageConfig of a stage's ConfigDict (a StageConfig is returned as is). Not validated: see `validate`."""
  return c if isinstance(c, StageConfig) else from_dict(c.to_dict())


def to_dict(c: StageConfig) -> dict:
  return dataclasses.asdict(c)


def replace(c: StageConfig, **fields) -> StageConfig:
  """c with dotted fields changed: replace(c, **{"train.batch_size": 4})."""
  changes: dict = {}
  for dotted, value in fields.items():
    *groups, name = dotted.split(".")
    node = changes
    for g in groups:
      node = node.setdefault(g, {})
    node[name] = value

  def apply(obj, delta):
    kwargs = {k: apply(getattr(obj, k), v) if isinstance(v, dict) else v for k, v in delta.items()}
    return dataclasses.replace(obj, **kwargs)

  return apply(c, changes)


def check_batch_split(c: StageConfig, shards: int) -> None:
  """Raises UserError unless train.batch_size splits evenly over the `shards` (mesh.data x mesh.fsdp) devices."""
  if c.train.batch_size % shards:
    raise UserError(f"config field 'train.batch_size'={c.train.batch_size}: not divisible by mesh.data x mesh.fsdp "
                    f"= {shards}, the devices the batch is split over")


def trainable_groups(c: StageConfig) -> tuple[str, ...]:
  return tuple(files.split_list(c.train.trainable))


def read_config(workdir: str) -> StageConfig:
  """The StageConfig a training workdir was made with (its config.json)."""
  path = os.path.join(workdir, "config.json")
  try:
    saved = json.loads(files.read_bytes(path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not a readable workdir config ({e})") from None
  try:
    return from_dict(saved)
  except UserError as e:
    raise UserError(f"{path}: {e}") from None


def _choice(value, field: str, choices) -> None:
  if value not in choices:
    raise UserError(f"config field '{field}'={value!r}: expected one of {', '.join(map(str, choices))}")


def validate(c: StageConfig) -> None:
  """Raises UserError naming the first field whose value cannot work."""
  _choice(c.stage, "stage", STAGES)
  _choice(c.init_as, "init_as", ("stacked", "merged"))
  _choice(c.merge_into, "merge_into", ("dequantized", "original"))
  _choice(c.model.dtype, "model.dtype", ("float32", "bfloat16"))
  _choice(c.model.remat, "model.remat", REMAT_POLICIES)
  _choice(c.model.attention, "model.attention", ATTENTION_KINDS)
  _choice(c.quant.type, "quant.type", ("none", "nf4", "int4"))
  _choice(c.data.mask, "data.mask", ("all", "assistant"))
  _choice(c.data.truncation, "data.truncation", ("truncate", "drop"))
  _choice(c.train.schedule, "train.schedule", ("linear", "cosine", "constant"))
  _choice(c.train.on_nonfinite, "train.on_nonfinite", ("stop", "skip"))
  _choice(c.dpo.reference, "dpo.reference", ("base", "precomputed"))
  _choice(c.dpo.objective, "dpo.objective", DPO_OBJECTIVES)
  if c.dpo.reference_model:
    _check_reference_model(c)
  if not c.data.train:
    raise UserError("config field 'data.train' is empty: give a dataset file, directory or hub id")
  for field, value, low in (("train.batch_size", c.train.batch_size, 1), ("train.grad_accum", c.train.grad_accum, 1),
                            ("data.max_length", c.data.max_length, 2), ("train.log_every", c.train.log_every, 1),
                            ("checkpoint.every", c.checkpoint.every, 1), ("checkpoint.keep", c.checkpoint.keep, 1),
                            ("train.steps", c.train.steps, 0), ("train.epochs", c.train.epochs, 1),
                            ("train.eval_every", c.train.eval_every, 0)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise UserError(f"config field '{field}'={value!r}: must be an integer >= {low}")
    if value < low:
      raise UserError(f"config field '{field}'={value}: must be >= {low}")
  if not 0 <= c.train.warmup_ratio < 1:
    raise UserError(f"config field 'train.warmup_ratio'={c.train.warmup_ratio}: must be in [0, 1)")
  if c.train.lr <= 0:
    raise UserError(f"config field 'train.lr'={c.train.lr}: must be positive")


def _check_reference_model(c: StageConfig) -> None:
  """Raises UserError where `dpo.reference_model` cannot be the reference: it is read once, before training."""
  field = f"config field 'dpo.reference_model'={c.dpo.reference_model}"
  if c.dpo.objective != "dpo":
    raise UserError(f"{field}: dpo.objective={c.dpo.objective} is reference-free (no reference log-probs); "
                    "leave it empty")
  if c.dpo.reference != "precomputed":
    raise UserError(f"{field}: needs dpo.reference=precomputed (its log-probs are computed once before "
                    f"training; no second model is ever held in the step), not {c.dpo.reference}")
  if c.data.eval:
    raise UserError(f"{field}: the eval pass scores its pairs against the base (adapters off), not against this "
                    "model; leave data.eval empty")
