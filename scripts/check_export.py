"""Compare a merged HF export with its training workdir: the same chat prompt's logits, ours and transformers'."""

import json

from absl import flags

from anita_jax.apps import commands
from anita_jax.apps import cli
from anita_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir that was exported.", required=True)
_EXPORT = flags.DEFINE_string("export", None, "Its merged HF export (scripts/export_hf.py's OUT, DIR/hf).",
                              required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides.")
_PROMPT = flags.DEFINE_string("prompt", commands.DEFAULT_PROMPT, "The user turn, in the chat template.")
_RTOL = flags.DEFINE_float("rtol", None, "Fail (one error line, exit 2) when max |difference| / max |logit| exceeds this "
                           "(default: 1e-5 in float32, 0.1 in bfloat16).")


def main(argv):
  del argv
  result = commands.check_export(_WORKDIR.value, _EXPORT.value, dtype=_DTYPE.value, prompt=_PROMPT.value)
  print(json.dumps(result))
  rtol = _RTOL.value if _RTOL.value is not None else (1e-5 if _DTYPE.value == "float32" else 0.1)
  if result["relative"] > rtol:
    raise UserError(f"the export's logits differ from the workdir's by {result['relative']:.3g} of the "
                     f"largest logit, more than --rtol={rtol:g}")


if __name__ == "__main__":
  cli.run(main)
