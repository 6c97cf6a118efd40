"""Training losses: next-token cross-entropy (SFT) and DPO, as transformers and TRL 1.16 compute them.

Shape legend as in `anita_jax.model`: B batch, T length, V vocab.

Alignment: `logits[:, t]` predicts `input_ids[:, t + 1]`, while a mask (`loss_mask`,
a DPO completion mask) marks the *target* token t. Per-token values here are
therefore indexed by the target: entry t belongs to token t, entry 0 is always 0,
and a mask multiplies them directly. Everything is reduced in fp32.

The functions are pure and jittable; string and float options (`loss_type`,
`beta`, ...) are static Python values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anita_jax.errors import UserError

Array = jax.Array
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _to_target(x_bt: Array) -> Array:
  """Moves a value of predicting position t-1 onto target token t; 0 at t = 0. [B, T] -> [B, T]."""
  return jnp.pad(x_bt[:, :-1], ((0, 0), (1, 0)))


def token_logprobs(logits_btv: Array, input_ids_bt: Array) -> Array:
  """log p(input_ids[:, t] | tokens < t) [B, T] fp32, 0 at t = 0.

  Gathered logit minus logsumexp: no fp32 log-softmax or one-hot of shape
  [B, T, V] is materialised (XLA fuses the fp32 cast into the reductions).
  """
  next_ids_bt = jnp.pad(input_ids_bt[:, 1:], ((0, 0), (0, 1)))
  # "clip": padding may hold ids outside the vocabulary (e.g. -100); masks drop those entries.
  target_bt = jnp.take_along_axis(logits_btv, next_ids_bt[..., None], axis=-1, mode="clip")[..., 0]
  # The max is taken in the input dtype (exact), so the fp32 cast feeds only the sum and can fuse into it.
  max_bt = jax.lax.stop_gradient(jnp.max(logits_btv, axis=-1)).astype(jnp.float32)
  sum_exp_bt = jnp.sum(jnp.exp(logits_btv.astype(jnp.float32) - max_bt[..., None]), axis=-1)
  return _to_target(target_bt.astype(jnp.float32) - (max_bt + jnp.log(sum_exp_bt)))


def target_mask(batch: dict[str, Array]) -> Array:
  """`loss_mask` [B, T] bool, restricted to tokens whose predicting position lies in the same segment.

  A no-op for a well-formed batch; it keeps a packed row's first token of a new
  sequence (predicted from the previous sequence) and padding out of the loss.
  """
  seg_bt = batch["segment_ids"]
  same_bt = jnp.pad(seg_bt[:, 1:] == seg_bt[:, :-1], ((0, 0), (1, 0)))
  return (batch["loss_mask"] > 0) & same_bt & (seg_bt != 0)


def sft_loss_terms(logits_btv: Array, batch: dict[str, Array]) -> tuple[Array, Array]:
  """(sum of target-token NLL, number of target tokens), fp32 scalars.

  For an exact token-weighted mean over micro-batches (gradient accumulation),
  divide each micro-batch's sum by the token count of the whole step, as
  transformers does with `num_items_in_batch`; see `cross_entropy_loss`.
  """
  mask_bt = target_mask(batch)
  logp_bt = token_logprobs(logits_btv, batch["input_ids"])
  sum_nll = -jnp.sum(jnp.where(mask_bt, logp_bt, 0.0))
  return sum_nll, jnp.sum(mask_bt, dtype=jnp.float32)


def cross_entropy_loss(logits_btv: Array, batch: dict[str, Array],
                       num_tokens: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """Mean NLL over the batch's target tokens (one token-level mean, as TRL's SFT).

  num_tokens: when given (the target count of the whole accumulated step), the
    sum is divided by it instead, so micro-batch losses add up to the step mean.
  Returns (loss, {"num_tokens": this batch's target count}).
  """
  sum_nll, count = sft_loss_terms(logits_btv, batch)
  denominator = jnp.maximum(count, 1.0) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
  return sum_nll / denominator, {"num_tokens": count}


def sequence_logps(logits_btv: Array, input_ids_bt: Array,
                   completion_mask_bt: Array) -> tuple[Array, Array, Array]:
  """Per-sequence DPO statistics of the completion tokens (the mask marks target tokens).

  Returns:
    logps_b: summed log-probs of the completion tokens, fp32.
    num_tokens_b: completion token counts, int32.
    mean_logit_b: mean over completion tokens of the mean over V of the raw
      logit predicting them (TRL's `logits/*`), fp32, no gradient.
  """
  mask_bt = completion_mask_bt > 0
  logps_b = jnp.sum(jnp.where(mask_bt, token_logprobs(logits_btv, input_ids_bt), 0.0), axis=-1)
  num_tokens_b = jnp.sum(mask_bt, axis=-1, dtype=jnp.int32)
  mean_logit_bt = _to_target(jnp.mean(jax.lax.stop_gradient(logits_btv), axis=-1, dtype=jnp.float32))
  logit_sum_b = jnp.sum(jnp.where(mask_bt, mean_logit_bt, 0.0), axis=-1)
  return logps_b, num_tokens_b, logit_sum_b / jnp.maximum(num_tokens_b, 1)


def check_dpo_options(loss_type: str, label_smoothing: float) -> None:
  """Raises UserError for a loss type or label smoothing TRL 1.16 would reject or ignore."""
  if loss_type not in DPO_LOSS_TYPES:
    raise UserError(f"loss_type: unknown DPO loss type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
  if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
    raise UserError(f"label_smoothing: must lie in [0, 0.5) for the 'robust' loss, got {label_smoothing}")
  # TRL 1.16 reads label_smoothing only in robust (and losses we do not offer): the
  # sigmoid loss has no cDPO term there. Refuse rather than silently ignore it.
  if loss_type in ("sigmoid", "hinge", "ipo") and label_smoothing != 0.0:
    raise UserError(f"label_smoothing: {label_smoothing} has no effect with loss_type {loss_type!r} "
                    "(TRL 1.16 ignores it there); set it to 0 or use loss_type 'robust'")


def dpo_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Array | None = None, rejected_tokens: Array | None = None,
             sft_weight: float = 0.0) -> Array:
  """Per-pair DPO losses [B] fp32 from summed completion log-probs [B]; the step loss is their mean.

  chosen_tokens, rejected_tokens: completion token counts [B], needed by "ipo"
    (which averages the log-ratios per token) and by the SFT term.
  sft_weight: adds sft_weight * (mean NLL over all chosen completion tokens of
    the batch) to every pair, as TRL's loss_type=[loss_type, "sft"] with
    loss_weights=[1, sft_weight] (TRL 1.16's replacement for `rpo_alpha`).
  """
  check_dpo_options(loss_type, label_smoothing)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_ratio_b = f32(policy_chosen) - f32(ref_chosen)
  rejected_ratio_b = f32(policy_rejected) - f32(ref_rejected)
  logits_b = beta * (chosen_ratio_b - rejected_ratio_b)
  if loss_type == "sigmoid":
    losses_b = -jax.nn.log_sigmoid(logits_b)
  elif loss_type == "robust":
    eps = label_smoothing
    losses_b = (-(1 - eps) * jax.nn.log_sigmoid(logits_b)
                + eps * jax.nn.log_sigmoid(-logits_b)) / (1 - 2 * eps)
  elif loss_type == "hinge":
    losses_b = jax.nn.relu(1 - logits_b)
  else:  # ipo, with TRL's per-token averaging (counts clamped to >= 1)
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("the 'ipo' loss needs chosen_tokens and rejected_tokens")
    delta_b = (chosen_ratio_b / jnp.maximum(f32(chosen_tokens), 1.0)
               - rejected_ratio_b / jnp.maximum(f32(rejected_tokens), 1.0))
    losses_b = (delta_b - 1 / (2 * beta)) ** 2
  if sft_weight:
    if chosen_tokens is None:
      raise ValueError("the SFT term needs chosen_tokens")
    sft_nll = -jnp.sum(f32(policy_chosen)) / jnp.maximum(jnp.sum(f32(chosen_tokens)), 1.0)
    losses_b = losses_b + sft_weight * sft_nll
  return losses_b


def dpo_metrics(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array, *,
                beta: float, chosen_tokens: Array, rejected_tokens: Array,
                chosen_mean_logit: Array, rejected_mean_logit: Array) -> dict[str, Array]:
  """TRL 1.16's DPO metrics for one batch, fp32 scalars under TRL's names.

  Rewards and logps are means over the batch's pairs; `logits/*` is a mean over
  all completion tokens of the batch (token-weighted, as TRL), 0 without tokens.
  """
  f32 = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  chosen_rewards_b = beta * (f32(policy_chosen) - f32(ref_chosen))
  rejected_rewards_b = beta * (f32(policy_rejected) - f32(ref_rejected))

  def token_mean(mean_logit_b, tokens_b):
    total = jnp.sum(f32(tokens_b))
    return jnp.where(total > 0, jnp.sum(f32(mean_logit_b) * f32(tokens_b)) / jnp.maximum(total, 1.0), 0.0)

  return {
      "rewards/chosen": jnp.mean(chosen_rewards_b),
      "rewards/rejected": jnp.mean(rejected_rewards_b),
      "rewards/accuracies": jnp.mean((chosen_rewards_b > rejected_rewards_b).astype(jnp.float32)),
      "rewards/margins": jnp.mean(chosen_rewards_b - rejected_rewards_b),
      "logps/chosen": jnp.mean(f32(policy_chosen)),
      "logps/rejected": jnp.mean(f32(policy_rejected)),
      "logits/chosen": token_mean(chosen_mean_logit, chosen_tokens),
      "logits/rejected": token_mean(rejected_mean_logit, rejected_tokens),
  }
