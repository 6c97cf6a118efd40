"""Export any model PATH (a training workdir included) to a llama.cpp GGUF file and an Ollama Modelfile."""

import os

from absl import flags

from anita_jax.apps import cli

_MODEL = flags.DEFINE_string("model", None, "Model PATH: training workdir, HF directory, .gguf, PEFT directory, "
                             "hub id; 'embedded' = the SmolLM2-135M-Instruct GGUF.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The .gguf file to write (replaced atomically); the Modelfile goes "
                              "beside it.", required=True)
_TYPE = flags.DEFINE_string("type", "f16", "f32 | f16 | bf16 | q8_0 | q4_0. K-quants (q4_k_m, q2_k, ...) are "
                            "llama.cpp's llama-quantize: the command is printed.")
_SYSTEM = flags.DEFINE_string("system", None, "The Modelfile's SYSTEM prompt (default: the chat template's own "
                              "default system prompt, if it has one).")
_MODELFILE = flags.DEFINE_bool("modelfile", True, "Write an Ollama Modelfile beside the GGUF file.")
_NAME = flags.DEFINE_string("name", None, "general.name of the file (default: the file name).")
_MERGE_INTO = flags.DEFINE_enum("merge_into", "dequantized", ["dequantized", "original"],
                                "For a training workdir: merge into the quantized base as trained (dequantized) "
                                "or into the full-precision base (original).")


def _load(path: str, merge_into: str):
  """(config, merged params, tokenizer, scan_layers, generation config or None) of a model PATH."""
  from anita_jax.convert import loading, modelfile
  from anita_jax.model import lora
  from anita_jax.train import workdir
  path = workdir.model_path(path)
  if workdir.is_workdir(path):
    stage = workdir.load_trained(path)
    params = workdir.merged_params(stage, merge_into, "float32")
    return (stage.model_config, params, stage.tokenizer, stage.config.model.scan_layers,
            workdir.generation_defaults(stage.config))
  model, params, tokenizer, config = loading.load_model(path, dtype="float32", quant="none", scan_layers=False)
  if model.lora is not None:  # a PEFT directory: its adapter merged into the base
    params = lora.merge(params, model.lora)
  generation = modelfile.generation_config(path) if os.path.isdir(path) else None
  return config, params, tokenizer, False, generation


def main(argv):
  del argv
  from anita_jax.convert import gguf_export, modelfile
  gguf_export.check_type(_TYPE.value)  # before reading any weights
  config, params, tokenizer, scan_layers, generation = _load(_MODEL.value, _MERGE_INTO.value)
  gguf_export.write_gguf(_OUTPUT.value, config, params, tokenizer, type=_TYPE.value, scan_layers=scan_layers,
                         name=_NAME.value or "", progress=True)
  if _MODELFILE.value:
    modelfile.write_modelfile(os.path.join(os.path.dirname(os.path.abspath(_OUTPUT.value)), "Modelfile"),
                              _OUTPUT.value, tokenizer, config, system=_SYSTEM.value, generation=generation)


if __name__ == "__main__":
  cli.run(main)
