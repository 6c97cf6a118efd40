"""The ConfigDict of one training stage: every field, its default, and validation.

Recipe configs (`configs/*.py`) start from `stage_config(stage)` and change
fields; `--config.FIELD=VALUE` overrides any of them. Only the training entry
point reads a ConfigDict; it turns the fields into plain arguments.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from anita_jax.errors import UserError
from anita_jax.model.config import ATTENTION_KINDS, PROJECTIONS, REMAT_POLICIES

STAGES = ("sft", "dpo", "lm")


def stage_config(stage: str = "sft") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.init_from = config_dict.placeholder(str)  # a previous stage's workdir
  c.merge_into = "dequantized"  # | "original"

  c.model = ml_collections.ConfigDict()
  c.model.path = "embedded"  # a model PATH; "embedded" = the SmolLM2-135M-Instruct GGUF
  c.model.tokenizer = config_dict.placeholder(str)  # default: model.path
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.scan_layers = True
  c.model.remat = "none"  # none | full | dots | dots_no_batch
  # Training/eval attention: dot (plain, materialises the [T, T] scores) | splash (blockwise Pallas TPU
  # kernel, skips the masked tiles; for long sequences on TPU, interpreted and slow elsewhere).
  # Decoding with a KV cache always uses dot.
  c.model.attention = "dot"
  c.model.license = "apache-2.0"  # of the base model, for exported model cards

  # Sampling defaults written into exported generation_config.json (temperature 0: greedy).
  c.generation = ml_collections.ConfigDict({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 256})

  c.quant = ml_collections.ConfigDict({"type": "nf4", "block_size": 64, "double_quant": True})

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 8.0
  c.lora.dropout = 0.0
  c.lora.rslora = False
  c.lora.targets = ",".join(PROJECTIONS)

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # a file, directory or hub id; several separated by commas
  c.data.eval = ""
  c.data.config_name = config_dict.placeholder(str)
  c.data.split = "train"
  c.data.eval_split = "train"
  c.data.format = "auto"
  c.data.max_length = 512
  c.data.max_prompt_length = config_dict.placeholder(int)  # dpo
  c.data.packing = False
  c.data.mask = "all"  # all (ANITA) | assistant
  c.data.truncation = "truncate"  # truncate | drop
  c.data.max_rows = config_dict.placeholder(int)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 0  # 0: derived from train.epochs
  c.train.epochs = 1
  c.train.batch_size = 8
  c.train.grad_accum = 1
  c.train.lr = 2e-4
  c.train.schedule = "linear"  # linear | cosine | constant
  c.train.warmup_steps = 0
  c.train.warmup_ratio = 0.0
  c.train.weight_decay = 0.01
  c.train.max_grad_norm = 1.0
  c.train.seed = 0
  c.train.log_every = 10
  c.train.eval_every = 0  # 0: only at the end
  c.train.eval_on_start = False  # also evaluate the untrained model (logged as step 0), as HF's eval_on_start
  c.train.trainable = "lora"  # comma list of: lora, embed_tokens, lm_head, norms
  c.train.on_nonfinite = "stop"  # stop | skip

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.dpo.label_smoothing = 0.0
  c.dpo.sft_weight = 0.0
  c.dpo.reference = "base"  # base (adapters disabled) | precomputed

  c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 2})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  return c


def _choice(value, field: str, choices) -> None:
  if value not in choices:
    raise UserError(f"config field '{field}'={value!r}: expected one of {', '.join(map(str, choices))}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first field whose value cannot work."""
  _choice(c.stage, "stage", STAGES)
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
  if not c.data.train:
    raise UserError("config field 'data.train' is empty: give a dataset file, directory or hub id")
  for field, value, low in (("train.batch_size", c.train.batch_size, 1), ("train.grad_accum", c.train.grad_accum, 1),
                            ("data.max_length", c.data.max_length, 2), ("train.log_every", c.train.log_every, 1),
                            ("checkpoint.every", c.checkpoint.every, 1), ("checkpoint.keep", c.checkpoint.keep, 1),
                            ("train.steps", c.train.steps, 0), ("train.epochs", c.train.epochs, 1)):
    if value < low:
      raise UserError(f"config field '{field}'={value}: must be >= {low}")
  if not 0 <= c.train.warmup_ratio < 1:
    raise UserError(f"config field 'train.warmup_ratio'={c.train.warmup_ratio}: must be in [0, 1)")
  if c.train.lr <= 0:
    raise UserError(f"config field 'train.lr'={c.train.lr}: must be positive")
