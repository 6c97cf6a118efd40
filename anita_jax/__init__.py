"""anita-jax: LLaMAntino-3-ANITA's QLoRA recipe (SFT, DPO, language adaptation) in JAX.

Layers, each importing only itself and the layers below it (checked by import-linter):
  apps      the recipe, its report, the scripts' commands
  train     the training config (the one ConfigDict reader), objectives, step, state, loop, workdirs, AOT
  infer     the token scorer, generation, the lm-eval backend
  data      rows and validation, tokenization, preference pairs, batching
  convert   files <-> parameter trees: HF, GGUF, PEFT, export, model loading
  model     pure JAX: config and presets, LLaMA, splash attention, quantization, LoRA, sharding, losses
  files, errors

The public entry points below are imported on first use, so `import anita_jax` (and the
configs, which need only `anita_jax.train.config`) stays free of JAX.
"""

import importlib

_EXPORTS = {
    "stage_config": "anita_jax.train.config",
    "StageConfig": "anita_jax.train.config",
    "train_and_evaluate": "anita_jax.train.loop",
    "load_model": "anita_jax.train.workdir",
    "export_hf": "anita_jax.train.publish",
    "export_gguf": "anita_jax.train.publish",
    "compile_report": "anita_jax.train.aot",
    "run_recipe": "anita_jax.apps.recipe",
    "Generator": "anita_jax.infer.generate",
    "SamplingSpec": "anita_jax.infer.generate",
    "JaxLM": "anita_jax.infer.evaluate",
    "Llama": "anita_jax.model.llama",
    "ModelConfig": "anita_jax.model.config",
    "PRESETS": "anita_jax.model.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'anita_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
