"""Export a training workdir to Hugging Face: the merged model (OUT/) and the PEFT adapter (OUT/adapter/)."""

from absl import flags

from anita_jax.apps import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (scripts/train.py).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The directory to write (replaced atomically).", required=True)
_MERGED = flags.DEFINE_bool("merged", True, "Write the merged model into OUT/.")
_ADAPTER = flags.DEFINE_bool("adapter", True, "Write the PEFT adapter into OUT/adapter/.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Dtype of the merged weights.")
_MERGE_INTO = flags.DEFINE_enum("merge_into", "dequantized", ["dequantized", "original"],
                                "Merge into the quantized base as trained (dequantized) or into the full-precision "
                                "base (original).")
cli.define_distributed_flags()


def main(argv):
  del argv
  from anita_jax.train import publish
  cli.initialize_distributed()
  publish.export_hf(_WORKDIR.value, _OUTPUT.value, merged=_MERGED.value, adapter=_ADAPTER.value,
                    dtype=_DTYPE.value, merge_into=_MERGE_INTO.value)


if __name__ == "__main__":
  cli.run(main)
