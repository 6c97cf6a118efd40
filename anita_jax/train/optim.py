"""The optimizer of every stage: global-norm clipping, then AdamW with warmup and a decay schedule.

Both follow transformers' Trainer (ANITA trained with TRL on it): the learning
rate of update k (k = 0, 1, ...) is `get_{linear,cosine,constant}_schedule_with_warmup`'s
at step k, and weight decay skips biases and norm weights by name
(`Trainer.get_decay_parameter_names`).
"""

from __future__ import annotations

import math
import re

import jax
import optax

# transformers' Trainer.get_decay_parameter_names: parameters whose dotted, lower-cased name matches
# one of these get no weight decay.
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                  r"_norm(?:$|\.)"))


def _dotted(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path).lower()


def decays(name: str) -> bool:
  """Whether the parameter at dotted path `name` (e.g. 'layers.input_layernorm.scale') gets weight decay."""
  return not any(p.search(name.lower()) for p in NO_DECAY_PATTERNS)


def decay_mask(params):
  """A bool tree over `params`: True where AdamW applies weight decay. By name, not by rank: a scanned
  norm scale [L, D] is still a norm weight."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(_dotted(path)), params)


def warmup_steps(t, total_steps: int) -> int:
  """train.warmup_steps, else ceil(train.warmup_ratio x total_steps) (TrainingArguments.get_warmup_steps)."""
  return int(t.warmup_steps) if t.warmup_steps else int(math.ceil(t.warmup_ratio * total_steps))


def make_schedule(t, total_steps: int):
  """The learning rate of update k (counted from 0), as transformers' schedules at step k: a linear warmup
  from 0 over the warmup steps (which may outlast the run), then linear to 0 at `total_steps`, a half
  cosine to 0 at `total_steps`, or constant."""
  warmup = warmup_steps(t, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  after = {"linear": optax.linear_schedule(t.lr, 0.0, decay_steps),
           "cosine": optax.cosine_decay_schedule(t.lr, decay_steps),
           "constant": optax.constant_schedule(t.lr)}[t.schedule]
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warmup), after], [warmup])


def make_optimizer(t, total_steps: int):
  """(optax transformation, schedule) for the `train` config section `t`: global-norm clipping, then AdamW
  (betas 0.9, 0.999, eps 1e-8, decoupled weight decay on `decay_mask`) with `make_schedule`."""
  schedule = make_schedule(t, total_steps)
  tx = optax.chain(optax.clip_by_global_norm(t.max_grad_norm) if t.max_grad_norm > 0 else optax.identity(),
                   optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule
