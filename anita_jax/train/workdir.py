"""Training workdirs as models: the base a stage starts from, and a trained stage loaded back.

A stage's base is `model.path`, or with `init_from` the merged model of the
previous stage: its base plus its adapter, merged once and cached in that
stage's workdir as a Hugging Face directory (`merged/`, or `merged-original/`
for `merge_into=original`), then re-quantized by the stage that loads it.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from anita_jax.convert import loading
from anita_jax.errors import UserError


def model_path(path: str) -> str:
  return loading.embedded_default_path() if path in ("embedded", "", None) else path


def is_workdir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "checkpoints"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  from anita_jax.train import config as stage_config
  path = os.path.join(workdir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not a readable workdir config ({e})") from None
  c = stage_config.stage_config(saved.get("stage", "sft"))
  c.update_from_flattened_dict({k: v for k, v in _flatten(saved).items()})
  return c


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def base_model_path(c: ml_collections.ConfigDict) -> str:
  """The model PATH a stage trains on (see the module doc)."""
  if c.init_from:
    return merged_model(c.init_from, c.merge_into)
  return model_path(c.model.path)


def load_trained(workdir: str, mesh=None, config: ml_collections.ConfigDict | None = None):
  """(Stage, restored state) of a workdir's latest checkpoint (optionally with its config changed)."""
  from anita_jax.train import checkpoint as ckpt
  from anita_jax.train import loop as train
  if not is_workdir(workdir):
    raise UserError(f"{workdir}: not a training workdir (no config.json and checkpoints/)")
  c = config or read_config(workdir)
  stage = train.build_stage(c, mesh)
  checkpoints = ckpt.Checkpoints(workdir, c.checkpoint.keep)
  try:
    if checkpoints.latest_step() is None:
      raise UserError(f"{workdir}: no checkpoint to load (the stage has not finished a step)")
    state, _ = train.restore_latest(stage, checkpoints)
  finally:
    checkpoints.close()
  return stage, state


def merged_params(stage, state, merge_into: str = "dequantized", dtype: str = "float32") -> dict:
  """A trained stage's base plus its adapter as plain arrays on the host (see `lora.merge`)."""
  import jax.numpy as jnp

  from anita_jax.model import lora
  params = lora.combine(state["params"], stage.frozen)
  if merge_into == "original":
    # The previous base in full precision plus this stage's delta, as the ANITA scripts merged.
    _, original = loading.load_weights(stage.base_path, scan_layers=stage.config.model.scan_layers,
                                       transform=loading.leaf_transform(None, "float32"))
    adapters = {p: v for p, v in lora.flatten(params).items() if p[-1] in lora.LORA_LEAVES}
    params = lora.combine(original, lora.unflatten(adapters))
  return jax.device_get(lora.merge(params, stage.spec, jnp.dtype(dtype)))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def stage_chain(workdir: str) -> list[ml_collections.ConfigDict]:
  """The configs of every stage that led to `workdir`, first stage first (via init_from)."""
  chain = [read_config(workdir)]
  while chain[0].init_from:
    chain.insert(0, read_config(chain[0].init_from))
  return chain


def generation_defaults(c: ml_collections.ConfigDict) -> dict:
  g = c.generation
  out = {"max_new_tokens": int(g.max_new_tokens)}
  if g.temperature > 0:
    out.update(do_sample=True, temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k))
  return out


def export_workdir(workdir: str, out: str, *, merged: bool = True, adapter: bool = True, dtype: str = "bfloat16",
                   merge_into: str = "dequantized") -> None:
  """scripts/export_hf.py: OUT/ (merged model) and OUT/adapter/ (PEFT), written atomically as one directory."""
  from anita_jax.convert import export
  if merge_into not in ("dequantized", "original"):
    raise UserError(f"--merge_into={merge_into}: expected dequantized or original")
  if not (merged or adapter):
    raise UserError("nothing to export: --merged=false and --adapter=false")
  if not is_workdir(workdir):
    raise UserError(f"{workdir}: not a training workdir (no config.json and checkpoints/)")
  chain = stage_chain(workdir)
  stage, state = load_trained(workdir)
  c = stage.config
  stages = [{"name": s.stage, "data": s.data.train, "lora": {"rank": s.lora.rank, "alpha": s.lora.alpha,
                                                             "rslora": s.lora.rslora},
             "quant": s.quant.type, "lr": s.train.lr, "steps": s.train.steps, "batch_size": s.train.batch_size,
             "grad_accum": s.train.grad_accum} for s in chain]
  original = model_path(chain[0].model.path)
  card = export.model_card(original, stages, c.model.license)
  params = merged_params(stage, state, merge_into, "float32") if merged else None
  if jax.process_index() == 0:
    with export.atomic_dir(out) as tmp:
      if merged:
        export.write_hf_model(tmp, stage.model_config, params, stage.tokenizer, dtype=dtype,
                              scan_layers=c.model.scan_layers, generation_config=generation_defaults(c),
                              model_card=card, atomic=False)
      if adapter:
        adapters = jax.device_get(state["params"])
        export.write_adapter(os.path.join(tmp, "adapter"), adapters, stage.model_config, stage.spec,
                             base_model=stage.base_path, scan_layers=c.model.scan_layers, atomic=False)
  _barrier(f"export {out}")


def merged_model(workdir: str, merge_into: str = "dequantized") -> str:
  """The cached merged model of a finished stage, written on first use."""
  from anita_jax.convert import export
  out = os.path.join(os.path.abspath(workdir), "merged" if merge_into == "dequantized" else "merged-original")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  stage, state = load_trained(workdir)
  params = merged_params(stage, state, merge_into, "float32")
  if jax.process_index() == 0:
    export.write_hf_model(out, stage.model_config, params, stage.tokenizer, dtype="float32",
                          scan_layers=stage.config.model.scan_layers)
  _barrier(f"merged {out}")
  return out
