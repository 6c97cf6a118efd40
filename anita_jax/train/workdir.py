"""Training workdirs as models: the base a stage starts from, a trained stage loaded back, merged.

A stage's base is `model.path`, or with `init_from` either the previous stage's
own base with its adapters kept frozen beside it (`init_as=stacked`: they are
folded into one low-rank term, `frozen_adapters`) or the merged model of the
previous stage (`init_as=merged`): its base plus its adapter, merged once and
cached in that stage's workdir as a Hugging Face directory (`merged/`, or
`merged-original/` for `merge_into=original`), then re-quantized by the stage
that loads it. `load_model` opens any model PATH, a training workdir included;
`generation_config` gives any PATH's sampling settings. Exports: `train.publish`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from anita_jax import files
from anita_jax.convert import export
from anita_jax.convert import generation
from anita_jax.convert import loading
from anita_jax.errors import UserError
from anita_jax.model import lora
from anita_jax.model import tree as PT
from anita_jax.model import sharding as S
from anita_jax.model.llama import unstack_layers
from anita_jax.train import config as C
from anita_jax.train import state as ST
from anita_jax.train.checkpoint import Checkpoints


def model_path(path: str) -> str:
  return loading.embedded_default_path() if path in ("embedded", "", None) else path


def is_workdir(path: str) -> bool:
  return files.isfile(os.path.join(path, "config.json")) and files.isdir(os.path.join(path, "checkpoints"))


def base_model_path(c: C.StageConfig) -> str:
  """The model PATH whose weights are a stage's frozen base (see the module doc)."""
  if not c.init_from:
    return model_path(c.model.path)
  if c.init_as == "merged":
    return merged_model(c.init_from, c.merge_into)
  return base_model_path(C.read_config(c.init_from))


def check_stackable(c: C.StageConfig, prev: C.StageConfig) -> None:
  """A stacked stage computes exactly the previous stage's function at step 0 only over the same base."""
  where = f"init_from={c.init_from}"
  for field in ("quant.type", "quant.block_size", "quant.double_quant", "lora.targets", "model.scan_layers"):
    group, name = field.split(".")
    mine, theirs = getattr(getattr(c, group), name), getattr(getattr(prev, group), name)
    if field == "lora.targets":  # the same projections in any order
      mine, theirs = (",".join(sorted(files.split_list(x))) for x in (mine, theirs))
    if mine != theirs:
      raise UserError(f"config field '{field}'={mine!r}: init_as=stacked keeps the earlier stages' base and "
                      f"adapters, and {where} was trained with {theirs!r}; use the same value or init_as=merged")
  if C.trainable_groups(prev) != ("lora",):
    raise UserError(f"{where}: that stage was trained with train.trainable={prev.train.trainable!r}, not only its "
                    "adapters; a stacked stage keeps adapters only: use init_as=merged")


def frozen_adapters(c: C.StageConfig) -> tuple[int, dict] | None:
  """For a stacked stage: (rank, tree on the host) of every earlier stage's adapter folded into one
  (`lora.fold`, as `frozen_a`/`frozen_b` leaves); None otherwise."""
  if not c.init_from or c.init_as != "stacked":
    return None
  prev = C.read_config(c.init_from)
  check_stackable(c, prev)
  earlier = frozen_adapters(prev)
  mesh = S.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
  abstract = ST.abstract_stage(prev, loading.load_config(base_model_path(prev)), mesh, with_optimizer=False,
                               frozen_rank=earlier[0] if earlier else 0)
  checkpoints = Checkpoints(c.init_from, prev.checkpoint.keep)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise UserError(f"{c.init_from}: no checkpoint to start from (that stage has not finished a step)")
    adapters = jax.device_get(checkpoints.restore_params(step, abstract.state["params"]))
  finally:
    checkpoints.close()
  folded, spec = lora.fold(PT.combine(adapters, earlier[1] if earlier else {}), abstract.spec)
  return spec.rank, lora.as_frozen(jax.device_get(folded))


def load_trained(workdir: str, mesh=None, config: C.StageConfig | None = None) -> ST.Stage:
  """The stage of a workdir's latest checkpoint, for inference (no optimizer state), optionally with its
  config changed; its trained parameters are `stage.state["params"]`."""
  if not is_workdir(workdir):
    raise UserError(f"{workdir}: not a training workdir (no config.json and checkpoints/)")
  c = config or C.read_config(workdir)
  checkpoints = Checkpoints(workdir, c.checkpoint.keep)
  try:
    if checkpoints.latest_step() is None:
      raise UserError(f"{workdir}: no checkpoint to load (the stage has not finished a step)")
    return ST.trained_model(c, base_model_path(c), checkpoints, mesh, frozen_adapters(c))
  finally:
    checkpoints.close()


def merged_params(stage: ST.Stage, merge_into: str = "dequantized", dtype: str = "float32") -> dict:
  """A trained stage's base plus its adapters, merged as the exporters read it: each adapted kernel a
  `lora.MergedKernel`, computed one layer's matrix at a time (never the whole merged model in memory)."""
  params = PT.combine(stage.state["params"], stage.frozen)
  if merge_into == "original":
    # The previous base as stored (full precision, read one matrix at a time) plus this stage's delta, as
    # the ANITA scripts merged.
    _, original, _, _ = loading.stored_model(stage.base_path, scan_layers=stage.config.model.scan_layers)
    adapters = {p: v for p, v in PT.flatten(params).items() if p[-1] in lora.LORA_LEAVES + lora.FROZEN_LEAVES}
    params = PT.combine(original, PT.unflatten(adapters))
  return lora.merge_lazily(params, stage.spec, jnp.dtype(dtype))


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def stage_chain(workdir: str) -> list[C.StageConfig]:
  """The configs of every stage that led to `workdir`, first stage first (via init_from)."""
  chain = [C.read_config(workdir)]
  while chain[0].init_from:
    chain.insert(0, C.read_config(chain[0].init_from))
  return chain


def generation_defaults(c: C.StageConfig) -> dict:
  """The sampling fields of the generation_config.json a stage's merged export writes (`generation.*`)."""
  g = c.generation
  out = {"max_new_tokens": int(g.max_new_tokens)}
  if g.temperature > 0:
    out.update(do_sample=True, temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k))
  return out


def generation_config(path: str) -> dict | None:
  """The generation config of any model PATH: a training workdir's is what its merged export writes (so
  `scripts/generate.py` samples alike from the workdir, its export and their gs:// copies), any other PATH's
  is `convert.generation.generation_config`. None: the model has none (greedy)."""
  path = model_path(path)
  if is_workdir(path):
    return generation_defaults(C.read_config(path))
  return generation.generation_config(path)


def merged_model(workdir: str, merge_into: str = "dequantized") -> str:
  """The cached merged model of a finished stage, written on first use."""
  out = os.path.join(files.absolute(workdir), "merged" if merge_into == "dequantized" else "merged-original")
  if files.isfile(os.path.join(out, "config.json")):
    return out
  stage = load_trained(workdir)
  params = merged_params(stage, merge_into, "float32")
  if jax.process_index() == 0:
    export.write_hf_model(out, stage.model_config, params, stage.tokenizer, dtype="float32",
                          scan_layers=stage.config.model.scan_layers)
  barrier(f"merged {out}")
  return out


def load_model(path: str, *, dtype: str | None = None, quant=None, scan_layers: bool | None = True,
               adapters: bool = True):
  """(Llama module, params on the default device, tokenizer, config) for any model PATH.

  A training workdir comes with its trained adapter (and, unless overridden, its own dtype and
  quantization) and no optimizer state; other paths as `loading.load_pretrained`. `adapters=False` runs a
  workdir without its own trained adapter (earlier stages' frozen adapters stay on): the weights the stage
  started from, on the base it imported (within an open `state.BaseCache`: no second import).
  """
  if not is_workdir(path):
    return loading.load_pretrained(path, dtype=dtype, quant=quant, scan_layers=scan_layers)
  if dtype is not None and dtype not in loading.DTYPES:
    raise UserError(f"--dtype={dtype}: expected one of {', '.join(loading.DTYPES)}")
  c = C.read_config(path)
  changes = {"lora.dropout": 0.0}
  if dtype is not None:
    changes["model.dtype"] = dtype
  if quant is not None:
    quant = loading.quant_spec(quant)
    changes.update({"quant.type": quant.type, "quant.block_size": quant.block_size,
                    "quant.double_quant": quant.double_quant})
  stage = load_trained(path, mesh=_one_device_mesh(), config=C.replace(c, **changes))
  params = PT.combine(stage.state["params"], stage.frozen)
  model = stage.model.clone(deterministic=True, adapters_enabled=adapters)
  if scan_layers is None:
    scan_layers = loading.decode_scan(stage.config.quant.type)
  if not scan_layers and model.scan_layers:
    params, model = unstack_layers(params, stage.model_config.num_layers), model.clone(scan_layers=False)
  return model, params, stage.tokenizer, stage.model_config


def _one_device_mesh():
  return S.make_mesh(1, 1, 1)
