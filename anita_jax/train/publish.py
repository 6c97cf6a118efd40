"""A trained workdir (or any model PATH) published: a merged Hugging Face model with its PEFT adapter and model
card (`export_hf`), and llama.cpp GGUF files with an Ollama Modelfile (`export_gguf`).

Both read the merged weights one matrix at a time (`lora.merge_lazily`, `hf.StoredTensor`), so no merged
model is ever held whole in memory. In a multi-host run every process loads the model (`load_trained`
restores collectively onto each local device) and process 0 writes.
"""

from __future__ import annotations

import os

import jax

from anita_jax import files
from anita_jax.convert import export, gguf_export, loading, modelfile
from anita_jax.errors import UserError
from anita_jax.model import lora
from anita_jax.model import tree as PT
from anita_jax.train import workdir as W


def export_hf(workdir: str, out: str, *, merged: bool = True, adapter: bool = True, dtype: str = "bfloat16",
              merge_into: str = "dequantized") -> None:
  """scripts/export_hf.py: OUT/ (merged model) and OUT/adapter/ (PEFT), written atomically as one directory."""
  if merge_into not in ("dequantized", "original"):
    raise UserError(f"--merge_into={merge_into}: expected dequantized or original")
  if not (merged or adapter):
    raise UserError("nothing to export: --merged=false and --adapter=false")
  if not W.is_workdir(workdir):
    raise UserError(f"{workdir}: not a training workdir (no config.json and checkpoints/)")
  chain = W.stage_chain(workdir)
  stage = W.load_trained(workdir)
  c = stage.config
  stages = [{"name": s.stage, "data": s.data.train, "lora": {"rank": s.lora.rank, "alpha": s.lora.alpha,
                                                             "rslora": s.lora.rslora},
             "quant": s.quant.type, "lr": s.train.lr, "steps": s.train.steps, "batch_size": s.train.batch_size,
             "grad_accum": s.train.grad_accum} for s in chain]
  original = W.model_path(chain[0].model.path)
  card = export.model_card(original, stages, c.model.license)
  params = W.merged_params(stage, merge_into, "float32") if merged else None
  # One PEFT adapter over the stage's base: a stacked stage's earlier adapters and its own, folded.
  adapters, spec = stage.state["params"], stage.spec
  if spec.frozen_rank:
    adapters, spec = lora.fold(PT.combine(adapters, stage.frozen), spec)
  adapters = jax.device_get(adapters)
  if jax.process_index() == 0:
    with export.atomic_dir(out) as tmp:
      if merged:
        export.write_hf_model(tmp, stage.model_config, params, stage.tokenizer, dtype=dtype,
                              scan_layers=c.model.scan_layers, generation_config=W.generation_defaults(c),
                              model_card=card, atomic=False)
      if adapter:
        export.write_adapter(os.path.join(tmp, "adapter"), adapters, stage.model_config, spec,
                             base_model=stage.base_path, scan_layers=c.model.scan_layers, atomic=False)
  W.barrier(f"export {out}")


def _merged(path: str, merge_into: str = "dequantized"):
  """(config, params merged in float32 or as stored (kernels read one matrix at a time: `lora.merge_lazily`,
  `hf.StoredTensor`), tokenizer, scan_layers, generation defaults or None)."""
  path = W.model_path(path)
  if W.is_workdir(path):
    stage = W.load_trained(path)
    params = W.merged_params(stage, merge_into, "float32")
    return stage.model_config, params, stage.tokenizer, stage.config.model.scan_layers, W.generation_config(path)
  config, params, tokenizer, spec = loading.stored_model(path)  # read one matrix at a time
  if spec is not None:  # a PEFT directory: its adapter merged into the base
    params = lora.merge_lazily(params, spec)
  return config, params, tokenizer, True, W.generation_config(path)


def export_gguf(path: str, outputs: dict[str, str], *, merge_into: str = "dequantized", modelfile_for: str | None = None,
                system: str | None = None, name: str = "", progress: bool = False) -> None:
  """Writes each `outputs` file (type -> .gguf path) of the model PATH, merged once; and, when
  `modelfile_for` names one of them, an Ollama `Modelfile` beside it. In a multi-host run every process
  loads the whole model (`load_trained` restores collectively onto each local device) and process 0 writes."""
  for type_ in outputs:  # before reading any weights
    gguf_export.check_type(type_)
  config, params, tokenizer, scan_layers, generation = _merged(path, merge_into)
  if jax.process_index() != 0:
    return
  for type_, out in outputs.items():
    gguf_export.write_gguf(out, config, params, tokenizer, type=type_, scan_layers=scan_layers,
                           name=name, progress=progress)
  if modelfile_for is not None:
    out = outputs[modelfile_for]
    modelfile.write_modelfile(os.path.join(os.path.dirname(files.absolute(out)), "Modelfile"), out, tokenizer,
                              config, system=system, generation=generation)
