"""Export any model PATH (a training workdir included) to a llama.cpp GGUF file and an Ollama Modelfile."""

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


def main(argv):
  del argv
  from anita_jax.train import publish
  publish.export_gguf(_MODEL.value, {_TYPE.value: _OUTPUT.value}, merge_into=_MERGE_INTO.value,
                   modelfile_for=_TYPE.value if _MODELFILE.value else None, system=_SYSTEM.value,
                   name=_NAME.value or "", progress=True)


if __name__ == "__main__":
  cli.run(main)
