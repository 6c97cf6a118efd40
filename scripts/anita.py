"""The main job: the whole ANITA recipe (SFT, DPO, Italian LM), export to DIR/hf, and a report.

python scripts/anita.py --workdir=DIR [--config=configs/anita_demo.py] [--config.dpo.train.lr=...]
Re-running the same command skips finished stages and resumes the unfinished one.
"""

import os

from absl import flags
from ml_collections import config_flags

from anita_jax.apps import cli

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "anita_demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "A recipe config (no ARG): one stage config per "
                                          "sft, dpo, lm. Default: the embedded demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the stages, DIR/hf and the report go.", required=True)
cli.define_distributed_flags()


def main(argv):
  del argv
  from anita_jax.apps import recipe
  cli.initialize_distributed()
  recipe.run_recipe(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
