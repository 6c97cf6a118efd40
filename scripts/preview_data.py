"""Print what the trainer consumes, one JSON line per example: input_ids, loss_mask, text (DPO: prompt_ids,
chosen_ids, rejected_ids, text; DPO with data.packing: one line per packed row of those examples, its pairs'
spans and texts, input_ids, segment_ids, branch_ids, positions, loss_mask, prev_index).
python scripts/preview_data.py --config=configs/FILE.py:STAGE [--num_examples=N]"""

from absl import flags
from ml_collections import config_flags

from anita_jax.apps import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "A stage config: configs/FILE.py:ARG.", lock_config=True)
_NUM = flags.DEFINE_integer("num_examples", 3, "Examples to print (in file order, before shuffling).")


def main(argv):
  del argv
  from anita_jax.apps import commands
  commands.preview(cli.single_stage(_CONFIG.value, "--config"), _NUM.value)


if __name__ == "__main__":
  cli.run(main)
