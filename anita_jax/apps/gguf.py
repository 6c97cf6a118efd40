"""Any model PATH (a training workdir and its stacked adapters included) to llama.cpp GGUF files and an
Ollama Modelfile: `scripts/export_gguf.py` and the recipe's `DIR/gguf/`."""

from __future__ import annotations

import os

import jax

from anita_jax import files
from anita_jax.convert import gguf_export, loading, modelfile
from anita_jax.model import lora
from anita_jax.train import workdir as W


def merged(path: str, merge_into: str = "dequantized"):
  """(config, params merged in float32 or as stored (kernels read one matrix at a time: `lora.merge_lazily`,
  `hf.StoredTensor`), tokenizer, scan_layers, generation defaults or None)."""
  path = W.model_path(path)
  if W.is_workdir(path):
    stage = W.load_trained(path)
    params = W.merged_params(stage, merge_into, "float32")
    return (stage.model_config, params, stage.tokenizer, stage.config.model.scan_layers,
            W.generation_defaults(stage.config))
  config, params, tokenizer, spec = loading.stored_model(path)  # read one matrix at a time
  if spec is not None:  # a PEFT directory: its adapter merged into the base
    params = lora.merge_lazily(params, spec)
  generation = modelfile.generation_config(path) if os.path.isdir(path) else None
  return config, params, tokenizer, True, generation


def export_gguf(path: str, outputs: dict[str, str], *, merge_into: str = "dequantized", modelfile_for: str | None = None,
                system: str | None = None, name: str = "", progress: bool = False) -> None:
  """Writes each `outputs` file (type -> .gguf path) of the model PATH, merged once; and, when
  `modelfile_for` names one of them, an Ollama `Modelfile` beside it. In a multi-host run every process
  loads the whole model (`load_trained` restores collectively onto each local device) and process 0 writes."""
  for type_ in outputs:  # before reading any weights
    gguf_export.check_type(type_)
  config, params, tokenizer, scan_layers, generation = merged(path, merge_into)
  if jax.process_index() != 0:
    return
  for type_, out in outputs.items():
    gguf_export.write_gguf(out, config, params, tokenizer, type=type_, scan_layers=scan_layers,
                           name=name, progress=progress)
  if modelfile_for is not None:
    out = outputs[modelfile_for]
    modelfile.write_modelfile(os.path.join(os.path.dirname(files.absolute(out)), "Modelfile"), out, tokenizer,
                              config, system=system, generation=generation)
