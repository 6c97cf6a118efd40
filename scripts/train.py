"""Run (or resume) one training stage: python scripts/train.py --config=configs/FILE.py:STAGE --workdir=DIR."""

from absl import flags
from ml_collections import config_flags

from anita_jax.apps import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "A stage config: configs/FILE.py:ARG.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go.", required=True)
cli.define_distributed_flags()


def main(argv):
  del argv
  from anita_jax.train import loop as train
  cli.initialize_distributed()
  train.train_and_evaluate(cli.single_stage(_CONFIG.value, "--config"), _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
