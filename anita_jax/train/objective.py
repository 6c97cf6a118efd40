"""What a stage optimizes: its data, its loss, its eval sums and metrics. One `Objective` per stage kind.

`Nll` is the SFT and language-modelling objective (token-mean negative
log-likelihood of the target tokens); `dpo.Dpo` the preference one. The
registry (`objectives.OBJECTIVES`) maps `config.stage` to its objective: the
training step, eval, AOT and the data preview never branch on the stage name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from anita_jax import files
from anita_jax.data import batching
from anita_jax.data import encode
from anita_jax.infer import score
from anita_jax.model import tree as PT
from anita_jax.model import losses
from anita_jax.train import config as C


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the jitted step needs to know, as static values."""

  stage: str
  grad_accum: int
  head_chunk: int = 16  # positions per chunk of the fused head and log-softmax (`head.head_token_stats`)
  objective: str = C.DpoFields.objective  # dpo | cpo | orpo (the preference stage's loss family)
  beta: float = C.DpoFields.beta
  loss_type: tuple[str, ...] = (C.DpoFields.loss_type,)  # dpo.loss_type's items; "sft" among them is the SFT term
  loss_weights: tuple[str, ...] = ()  # dpo.loss_weights' items, unparsed (`losses.dpo_loss_terms`); (): all 1.0
  label_smoothing: float = C.DpoFields.label_smoothing
  discopop_tau: float = C.DpoFields.discopop_tau
  sft_weight: float = C.DpoFields.sft_weight
  ld_alpha: float = C.DpoFields.ld_alpha
  cpo_alpha: float = C.DpoFields.cpo_alpha
  simpo_gamma: float = C.DpoFields.simpo_gamma
  alpha: float = C.DpoFields.alpha
  has_dropout: bool = False


def dpo_options(d: C.DpoFields) -> dict:
  """The `StepSpec` fields of the dpo.* config fields (the loss options the jitted step reads)."""
  return {"objective": d.objective, "beta": d.beta, "loss_type": tuple(files.split_list(d.loss_type)),
          "loss_weights": tuple(files.split_list(d.loss_weights)), "label_smoothing": d.label_smoothing,
          "discopop_tau": d.discopop_tau, "sft_weight": d.sft_weight, "ld_alpha": d.ld_alpha,
          "cpo_alpha": d.cpo_alpha, "simpo_gamma": d.simpo_gamma, "alpha": d.alpha}


def token_stats(model, trainable, frozen, batch, rng, spec: StepSpec, **model_kwargs):
  """`score.token_stats` of the model on `batch`, the trainable and frozen leaves combined."""
  head_name = "embed_tokens" if model.config.tie_word_embeddings else "lm_head"
  rngs = {"dropout": rng} if spec.has_dropout else None
  return score.token_stats(model, PT.combine(trainable, frozen), batch, head_trainable=head_name in trainable,
                           chunk=spec.head_chunk, rngs=rngs, **model_kwargs)


class Objective:
  """The interface; see `Nll` and `dpo.Dpo`."""

  rows_per_example = 1  # batch rows one example takes (a DPO pair: chosen and rejected)
  example_name = "rows"  # what train.batch_size counts, in messages

  def check(self, c: C.StageConfig) -> None:
    """Raises UserError for options this objective cannot run."""

  def batch_shape(self, c: C.StageConfig) -> tuple[int, int]:
    """(rows, tokens per row) of one micro-batch."""
    return c.train.batch_size * self.rows_per_example, c.data.max_length

  def reference_forward(self, c: C.StageConfig) -> bool:
    """Whether the step also runs the model with the adapters off."""
    return False

  def encode(self, c: C.StageConfig, rows, tokenizer, *, workers: int = 1):
    """(examples, stats) of loaded rows; workers > 1 encodes them in that many processes, the same result."""
    raise NotImplementedError

  def iterator(self, examples, c: C.StageConfig, *, batch_size: int, seed: int, pad_id: int, num_processes: int,
               process_index: int):
    raise NotImplementedError

  def step_normalizer(self, batches):
    """A value the whole optimizer step shares (e.g. its target-token count), or None."""
    return None

  def loss(self, model, trainable, frozen, batch, rng, spec: StepSpec, normalizer):
    """(this micro-batch's share of the step's loss, metric sums)."""
    raise NotImplementedError

  def eval_sums(self, model, spec: StepSpec, params, frozen, batch) -> dict:
    """Sums over one eval batch, added up over the eval set by the loop."""
    raise NotImplementedError

  def eval_metrics(self, totals: dict) -> dict:
    return {"eval_loss": totals["loss_sum"] / max(totals["weight"], 1.0)}

  def extra_inputs(self, c: C.StageConfig) -> dict:
    """Extra batch leaves beyond the token arrays: {name: (rank without the accumulation axis, dtype)}."""
    return {}

  def prepare(self, stage, train_iter, workdir: str):
    """Something `next_batch` needs (e.g. a reference cache), computed once before the loop; or None."""
    return None

  def next_batch(self, it, prepared) -> dict:
    return next(it)

  def preview(self, c: C.StageConfig, examples, tokenizer) -> list[dict]:
    """What the trainer consumes of `examples`, as JSON-ready records (scripts/preview_data.py)."""
    return [ex.preview(tokenizer) for ex in examples]


class Nll(Objective):
  """SFT (chat rows) and LM (plain text): the token-mean NLL over the optimizer step's target tokens."""

  def __init__(self, text: bool = False):
    self.text = text  # format "auto" means plain text rows

  def encode(self, c, rows, tokenizer, *, workers=1):
    fmt = "text" if self.text and c.data.format == "auto" else None
    return encode.encode_dataset(rows, tokenizer, max_length=c.data.max_length, mask=c.data.mask,
                                 truncation=c.data.truncation, fmt=fmt, workers=workers)

  def iterator(self, examples, c, *, batch_size, seed, pad_id, num_processes, process_index):
    return batching.BatchIterator(examples, batch_size=batch_size, max_length=c.data.max_length, seed=seed,
                                  packing=c.data.packing, pad_id=pad_id, num_processes=num_processes,
                                  process_index=process_index)

  def step_normalizer(self, batches):
    # The whole step's target count: the micro-batch losses then add up to its mean.
    return jnp.sum(jax.vmap(losses.target_mask)(batches), dtype=jnp.float32)

  def loss(self, model, trainable, frozen, batch, rng, spec, normalizer):
    logp, _ = token_stats(model, trainable, frozen, batch, rng, spec)
    sum_nll, count = losses.nll_terms(logp, batch)
    denominator = jnp.maximum(count, 1.0) if normalizer is None else normalizer
    loss = sum_nll / denominator
    return loss, {"loss": loss, "tokens": count}

  def eval_sums(self, model, spec, params, frozen, batch):
    logp, _ = token_stats(model, params, frozen, batch, None, spec, deterministic=True)
    sum_nll, count = losses.nll_terms(logp, batch)
    return {"loss_sum": sum_nll, "weight": count}
