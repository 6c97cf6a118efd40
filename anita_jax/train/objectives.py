"""The objective registry: `config.stage` -> its `Objective`.

The step, eval, AOT, the data pipeline and the preview dispatch here and never branch on the stage name; a
new kind of stage is one `Objective` subclass and one entry below.
"""

from __future__ import annotations

from anita_jax.train.dpo import Dpo
from anita_jax.train.objective import Nll, Objective

OBJECTIVES: dict[str, Objective] = {"sft": Nll(), "lm": Nll(text=True), "dpo": Dpo()}


def objective(stage: str) -> Objective:
  return OBJECTIVES[stage]
