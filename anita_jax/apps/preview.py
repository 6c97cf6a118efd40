"""scripts/preview_data.py: the first examples of data.train as the trainer encodes them, as JSON lines."""

from __future__ import annotations

import json
import sys

from anita_jax import files
from anita_jax.convert import loading
from anita_jax.data import rows as D
from anita_jax.train import config as C
from anita_jax.train import step as STEP
from anita_jax.train import workdir as W


def main(c, num_examples: int) -> None:
  c = C.freeze(c)
  C.validate(c)
  tokenizer = loading.load_tokenizer(c.model.tokenizer or W.model_path(c.model.path))
  rows = D.load_rows(files.split_list(c.data.train), split=c.data.split, config_name=c.data.config_name,
                     fmt=c.data.format,
                     max_rows=num_examples if c.data.max_rows is None else min(num_examples, c.data.max_rows))
  examples, stats = STEP.objective(c.stage).encode(c, rows, tokenizer)
  # Packed DPO pairs: one record per packed row of these examples (its pairs, branches and masks).
  for record in STEP.objective(c.stage).preview(c, examples[:num_examples], tokenizer):
    print(json.dumps(record, ensure_ascii=False))
  print(f"{stats}", file=sys.stderr)
