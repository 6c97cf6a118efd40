"""Training losses: next-token cross-entropy (SFT) and the preference losses, as transformers and TRL 1.16
compute them (DPO; the reference-free CPO and ORPO losses: `reference_free`).

Shape legend as in `anita_jax.model.llama`: B batch, T length, V vocab.

Alignment: `logits[:, t]` predicts `input_ids[:, t + 1]`, while a mask (`loss_mask`,
a DPO completion mask) marks the *target* token t. Per-token values here are
therefore indexed by the target: entry t belongs to token t, entry 0 is always 0,
and a mask multiplies them directly. Everything is reduced in fp32.

The functions are pure and jittable; string and float options (`loss_type`,
`beta`, ...) are static Python values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from anita_jax import files
from anita_jax.errors import UserError

Array = jax.Array
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop", "sigmoid_norm")
# TRL 1.16 loss types not offered, and why (one line each: the UserError's text).
DPO_REFUSED_LOSS_TYPES = {
    "aot": "TRL 1.16 sorts the policy and reference log-ratios across the batch, so a pair's loss depends on "
           "which pairs share its device's micro-batch, which the accumulated, sharded and packed steps here "
           "do not reproduce",
    "aot_unpaired": "TRL 1.16 sorts the chosen and rejected log-ratios across the batch, so a pair's loss depends "
                    "on which pairs share its device's micro-batch, which the accumulated, sharded and packed steps "
                    "here do not reproduce",
}
SFT_TERM = "sft"  # a member of a loss_type list: TRL's SFT term (`chosen_nll`), offered beside a DPO loss type
_SMOOTHED_LOSS_TYPES = ("robust", "exo_pair")  # the offered types that read label_smoothing


def to_target(x_bt: Array) -> Array:
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
  return to_target(target_bt.astype(jnp.float32) - (max_bt + jnp.log(sum_exp_bt)))


def token_stats(logits_btv: Array, input_ids_bt: Array) -> tuple[Array, Array]:
  """(token log-probs [B, T], mean over V of the logit predicting each token [B, T], no gradient),
  fp32 and indexed by the target token as `token_logprobs`."""
  mean_logit_bt = to_target(jnp.mean(jax.lax.stop_gradient(logits_btv), axis=-1, dtype=jnp.float32))
  return token_logprobs(logits_btv, input_ids_bt), mean_logit_bt


def sequence_targets(segment_ids: Array) -> Array:
  """[..., T] bool: the tokens predicted from a position of their own segment (every token of a sequence but its
  first; never padding). Over the last axis, for leaves of any leading shape."""
  same = jnp.concatenate([jnp.zeros_like(segment_ids[..., :1], bool),
                          segment_ids[..., 1:] == segment_ids[..., :-1]], axis=-1)
  return same & (segment_ids != 0)


def target_mask(batch: dict[str, Array]) -> Array:
  """`loss_mask` [B, T] bool, restricted to tokens whose predicting position lies in the same segment.

  A no-op for a well-formed batch; it keeps a packed row's first token of a new
  sequence (predicted from the previous sequence) and padding out of the loss.
  """
  return (batch["loss_mask"] > 0) & sequence_targets(batch["segment_ids"])


def nll_terms(logp_bt: Array, batch: dict[str, Array]) -> tuple[Array, Array]:
  """(sum of target-token NLL, number of target tokens), fp32 scalars, from target-indexed
  token log-probs [B, T] (`token_stats`) and the batch's `target_mask`.

  The SFT loss is their quotient (one token-level mean, as TRL's SFT). For an exact
  token-weighted mean over micro-batches (gradient accumulation), divide each
  micro-batch's sum by the token count of the whole step, as transformers does
  with `num_items_in_batch`.
  """
  mask_bt = target_mask(batch)
  sum_nll = -jnp.sum(jnp.where(mask_bt, logp_bt, 0.0))
  return sum_nll, jnp.sum(mask_bt, dtype=jnp.float32)


def completion_stats(logp_bt: Array, mean_logit_bt: Array,
                     completion_mask_bt: Array) -> tuple[Array, Array, Array]:
  """Per-sequence DPO statistics of the completion tokens, from `token_stats` [B, T]
  (the mask marks target tokens).

  Returns:
    logps_b: summed log-probs of the completion tokens, fp32.
    num_tokens_b: completion token counts, int32.
    mean_logit_b: mean over completion tokens of the mean over V of the raw
      logit predicting them (TRL's `logits/*`), fp32, no gradient.
  """
  mask_bt = completion_mask_bt > 0
  logps_b = jnp.sum(jnp.where(mask_bt, logp_bt, 0.0), axis=-1)
  num_tokens_b = jnp.sum(mask_bt, axis=-1, dtype=jnp.int32)
  logit_sum_b = jnp.sum(jnp.where(mask_bt, mean_logit_bt, 0.0), axis=-1)
  return logps_b, num_tokens_b, logit_sum_b / jnp.maximum(num_tokens_b, 1)


def pair_completion_stats(logp_bt: Array, mean_logit_bt: Array, batch: dict[str, Array],
                          pairs_per_row: int) -> dict[str, Array]:
  """Per-pair DPO statistics of packed pairs (`data.preference`, packing), from target-indexed
  `token_stats` [B, T] and the batch's loss_mask, segment_ids, branch_ids [B, T].

  Pair slot r * pairs_per_row + s - 1 holds row r's pair s (segment id s); a slot without a pair has
  no tokens. Returns [B * pairs_per_row, 2] arrays, column 0 the chosen and column 1 the rejected
  completion: `logps` (summed log-probs, fp32), `tokens` (completion token counts, fp32), `logit_sums`
  (sums over completion tokens of the mean logit, no gradient); and `present` [B * pairs_per_row] bool.
  """
  seg_bt, branch_bt = batch["segment_ids"], batch["branch_ids"]
  target_bt = batch["loss_mask"] > 0
  columns = []
  for branch in (1, 2):
    mask = target_bt & (branch_bt == branch)
    columns += [jnp.where(mask, logp_bt, 0.0), mask.astype(jnp.float32),
                jnp.where(mask, jax.lax.stop_gradient(mean_logit_bt), 0.0)]
  columns.append((seg_bt > 0).astype(jnp.float32))
  values_btk = jnp.stack(columns, axis=-1)
  # Slot s - 1 of the row; padding (segment 0) goes to slot `pairs_per_row`, out of range: dropped.
  slot_bt = jnp.where(seg_bt > 0, seg_bt - 1, pairs_per_row)
  sums = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=pairs_per_row))(values_btk, slot_bt)
  sums = sums.reshape(-1, values_btk.shape[-1])  # [B * pairs_per_row, 7]
  return {"logps": sums[:, 0::3][:, :2], "tokens": sums[:, 1::3][:, :2], "logit_sums": sums[:, 2::3][:, :2],
          "present": sums[:, 6] > 0}


def ld_weights(loss_mask_bt: Array, ld_alpha: float) -> Array:
  """LD-DPO's token weights [2B, T] fp32 of a padded batch (rows: B chosen, then their B rejected): ld_alpha on
  a completion's tokens past the pair's shorter completion length, 1 elsewhere (TRL 1.16's `ld_alpha`: the
  summed log-probs become shared part + ld_alpha x tail)."""
  mask_bt = loss_mask_bt > 0
  position_bt = jnp.cumsum(mask_bt, axis=-1)  # 1-based index of a completion token within its completion
  length_b = jnp.sum(mask_bt, axis=-1)
  shared_b = jnp.tile(jnp.minimum(*jnp.split(length_b, 2)), 2)
  return jnp.where(mask_bt & (position_bt > shared_b[:, None]), ld_alpha, 1.0).astype(jnp.float32)


def packed_ld_weights(batch: dict[str, Array], pairs_per_row: int, ld_alpha: float) -> Array:
  """`ld_weights` [B, T] of packed pairs (`pair_completion_stats`' layout): a completion token's index within
  its completion is its running count in the row less the tokens of that branch in the row's earlier pairs."""
  seg_bt, branch_bt = batch["segment_ids"], batch["branch_ids"]
  slot_bt = jnp.where(seg_bt > 0, seg_bt - 1, pairs_per_row)  # padding: an extra slot, counted nowhere
  per_slot = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=pairs_per_row + 1))
  gather = jax.vmap(lambda v, i: v[i])
  masks, positions, lengths = [], [], []
  for branch in (1, 2):
    mask_bt = (batch["loss_mask"] > 0) & (branch_bt == branch)
    length_bs = per_slot(mask_bt.astype(jnp.int32), slot_bt)  # [B, pairs_per_row + 1]
    before_bs = jnp.cumsum(length_bs, axis=-1) - length_bs
    masks.append(mask_bt)
    positions.append(jnp.cumsum(mask_bt, axis=-1) - gather(before_bs, slot_bt))
    lengths.append(length_bs)
  shared_bt = gather(jnp.minimum(*lengths), slot_bt)
  tail_bt = (masks[0] & (positions[0] > shared_bt)) | (masks[1] & (positions[1] > shared_bt))
  return jnp.where(tail_bt, ld_alpha, 1.0).astype(jnp.float32)


def dpo_loss_terms(loss_type: str | Sequence[str],
                   loss_weights: str | Sequence[str | float] | None = None) -> tuple[tuple[str, float], ...]:
  """((type, weight), ...) of a loss_type comma list and its loss_weights, as TRL 1.16's `loss_type` list and
  `loss_weights` (None or empty: every weight 1.0); UserError for a list TRL would reject or that cannot run here.

  Either value may be a comma-separated string (the config fields) or a sequence.
  """
  names = tuple(files.split_list(loss_type))
  if not names:
    raise UserError(f"dpo.loss_type: empty; expected one or a comma list of {DPO_LOSS_TYPES + (SFT_TERM,)}")
  for t in names:
    if t in DPO_REFUSED_LOSS_TYPES:
      raise UserError(f"dpo.loss_type: {t!r} is not offered: {DPO_REFUSED_LOSS_TYPES[t]}")
    if t not in DPO_LOSS_TYPES + (SFT_TERM,):
      raise UserError(f"dpo.loss_type: unknown DPO loss type {t!r}; expected one or a comma list of "
                      f"{DPO_LOSS_TYPES} (and {SFT_TERM!r} beside them)")
  if len(set(names)) != len(names):
    raise UserError(f"dpo.loss_type: {','.join(names)!r} lists a loss type twice; give each once, weighted "
                    f"with dpo.loss_weights")
  if names == (SFT_TERM,):
    raise UserError(f"dpo.loss_type: {SFT_TERM!r} alone is not a DPO loss; list it beside a DPO loss type "
                    f"(e.g. 'sigmoid,sft') or set dpo.sft_weight")
  weights = files.split_list("" if loss_weights is None else loss_weights)
  if not weights:
    return tuple((t, 1.0) for t in names)
  if len(weights) != len(names):
    raise UserError(f"dpo.loss_weights: {len(weights)} weights for {len(names)} loss types "
                    f"({','.join(names)}); give one per loss type, or none for all 1.0")
  try:
    values = tuple(float(w) for w in weights)
  except ValueError:
    raise UserError(f"dpo.loss_weights: {','.join(weights)!r} holds a value that is not a float") from None
  if not all(math.isfinite(w) for w in values):
    raise UserError(f"dpo.loss_weights: {','.join(weights)!r} holds a value that is not a finite float")
  return tuple(zip(names, values))


def check_dpo_options(loss_type: str | Sequence[str], label_smoothing: float, discopop_tau: float = 0.05,
                      loss_weights: str | Sequence[str | float] | None = None, sft_weight: float = 0.0) -> None:
  """Raises UserError for a loss type list or option TRL 1.16 would reject, ignore, or turn into NaN.

  The single-type rules hold for each member of a list; label_smoothing is refused only when no member reads it.
  """
  names = [t for t, _ in dpo_loss_terms(loss_type, loss_weights)]
  if SFT_TERM in names and sft_weight:
    raise UserError(f"dpo.sft_weight: {sft_weight} and an {SFT_TERM!r} entry in dpo.loss_type both set the SFT "
                    f"term; keep one (dpo.sft_weight=0, or drop {SFT_TERM!r} from the list)")
  if "robust" in names and not 0.0 <= label_smoothing < 0.5:
    raise UserError(f"dpo.label_smoothing: must lie in [0, 0.5) for the 'robust' loss, got {label_smoothing}")
  # TRL refuses 0 (its log(0) term); outside (0, 1) one of its logs is NaN.
  if "exo_pair" in names and not 0.0 < label_smoothing < 1.0:
    raise UserError(f"dpo.label_smoothing: must lie in (0, 1) for the 'exo_pair' loss (the EXO paper recommends "
                    f"1e-3), got {label_smoothing}")
  # The other types never read label_smoothing in TRL 1.16 (the sigmoid loss has no cDPO
  # term there). Refuse rather than silently ignore it.
  if not set(names) & set(_SMOOTHED_LOSS_TYPES) and label_smoothing != 0.0:
    raise UserError(f"dpo.label_smoothing: {label_smoothing} has no effect with loss_type {','.join(names)!r} "
                    f"(TRL 1.16 ignores it there); set it to 0 or use a loss_type of {_SMOOTHED_LOSS_TYPES}")
  if "discopop" in names and not discopop_tau > 0.0:
    raise UserError(f"dpo.discopop_tau: must be positive (the DiscoPOP paper recommends 0.05), got {discopop_tau}")


def dpo_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array, *,
             beta: float, loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: str | Sequence[str | float] | None = None, label_smoothing: float = 0.0,
             discopop_tau: float = 0.05, chosen_tokens: Array | None = None,
             rejected_tokens: Array | None = None) -> Array:
  """Per-pair DPO losses [B] fp32 from summed completion log-probs [B]; the step loss is their mean.

  Each type is TRL 1.16's `DPOTrainer._compute_loss` branch of that name (reverse-KL scores):
  every one offered is a function of its own pair alone, so the mean over micro-batches,
  devices or packed rows is the batch's. A comma list (`dpo_loss_terms`) gives the weighted sum
  of its members' losses, as TRL's `loss_type` list with `loss_weights`. An "sft" member is not
  per pair: the objective adds it as `chosen_nll` over the step's chosen tokens (`train.dpo`).
  chosen_tokens, rejected_tokens: completion token counts [B], needed by "ipo" and "sigmoid_norm"
    (which average the log-ratios per token).
  """
  check_dpo_options(loss_type, label_smoothing, discopop_tau, loss_weights)
  terms = dpo_loss_terms(loss_type, loss_weights)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  total_b = jnp.zeros(jnp.shape(policy_chosen), jnp.float32)
  for t, weight in terms:
    if t == SFT_TERM:
      raise ValueError(f"{SFT_TERM!r} is not a per-pair loss: add weight x chosen_nll over the step's chosen tokens")
    if t in ("ipo", "sigmoid_norm") and (chosen_tokens is None or rejected_tokens is None):
      raise ValueError(f"the {t!r} loss needs chosen_tokens and rejected_tokens")
    chosen_b = f32(policy_chosen) - f32(ref_chosen)
    rejected_b = f32(policy_rejected) - f32(ref_rejected)
    if t in ("ipo", "sigmoid_norm"):  # TRL's per-token averaging (counts clamped to >= 1)
      chosen_b = chosen_b / jnp.maximum(f32(chosen_tokens), 1.0)
      rejected_b = rejected_b / jnp.maximum(f32(rejected_tokens), 1.0)
    total_b = total_b + weight * _PAIR_LOSSES[t](chosen_b, rejected_b, beta, label_smoothing, discopop_tau)
  return total_b


def _robust(chosen_b, rejected_b, beta, eps, _):
  logits_b = beta * (chosen_b - rejected_b)
  return (-(1 - eps) * jax.nn.log_sigmoid(logits_b) + eps * jax.nn.log_sigmoid(-logits_b)) / (1 - 2 * eps)


def _exo_pair(chosen_b, rejected_b, beta, eps, _):
  """EXO-pref: KL of softmax(beta * log-ratios) over {chosen, rejected} from [1 - eps, eps]."""
  logits_b = beta * (chosen_b - rejected_b)
  return (jax.nn.sigmoid(logits_b) * (jax.nn.log_sigmoid(logits_b) - jnp.log1p(-eps))
          + jax.nn.sigmoid(-logits_b) * (jax.nn.log_sigmoid(-logits_b) - math.log(eps)))


def _discopop(chosen_b, rejected_b, beta, _, tau):
  """A blend of the logistic and exponential losses, mixed by sigmoid(logits / tau)."""
  logits_b = (chosen_b - rejected_b) * beta
  mix_b = jax.nn.sigmoid(logits_b / tau)
  return -jax.nn.log_sigmoid(logits_b) * (1 - mix_b) + jnp.exp(-logits_b) * mix_b


_ls, _sg = jax.nn.log_sigmoid, jax.nn.sigmoid
# (log-ratio of the chosen [B], of the rejected [B], beta, label_smoothing, discopop_tau) -> losses [B], in
# TRL's order of operations; the log-ratios are per token for ipo and sigmoid_norm.
_PAIR_LOSSES = {
    "sigmoid": lambda c, r, beta, *_: -_ls(beta * (c - r)),
    "sigmoid_norm": lambda c, r, beta, *_: -_ls(beta * (c - r)),
    "robust": _robust,
    "hinge": lambda c, r, beta, *_: jax.nn.relu(1 - beta * (c - r)),
    "ipo": lambda c, r, beta, *_: (c - r - 1 / (2 * beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda c, r, beta, *_: -_ls(beta * c) - 0.5 * _ls(-beta * c) - 0.5 * _ls(-beta * r),
    "bco_pair": lambda c, r, beta, *_: -_ls(beta * c) - _ls(-beta * r),
    "sppo_hard": lambda c, r, beta, *_: (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
    "apo_zero": lambda c, r, beta, *_: (1 - _sg(beta * c)) + _sg(beta * r),
    "apo_down": lambda c, r, beta, *_: _sg(beta * c) + (1 - _sg(beta * (c - r))),
    "discopop": _discopop,
}


def chosen_nll(chosen_logps: Array, chosen_tokens: Array) -> Array:
  """The SFT term of TRL's loss_type=[..., "sft"]: the token-mean NLL of the chosen completions.

  chosen_logps: their summed log-probs (zero for absent pairs); chosen_tokens: the tokens
  the mean runs over (per-pair counts or one total: summed either way). With gradient
  accumulation the total is the step's, so the micro-batches' terms add up to the step's mean.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return -jnp.sum(f32(chosen_logps)) / jnp.maximum(jnp.sum(f32(chosen_tokens)), 1.0)


def reward_metrics(chosen_rewards: Array, rejected_rewards: Array, chosen_logps: Array,
                   rejected_logps: Array) -> dict[str, Array]:
  """The per-pair values [N] behind TRL's rewards/* and logps/* metrics, fp32, no gradient: a step logs their
  means over its pairs (DPO, CPO and ORPO alike; what a reward is differs)."""
  f32 = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))  # noqa: E731
  chosen, rejected = f32(chosen_rewards), f32(rejected_rewards)
  return {"rewards/chosen": chosen, "rewards/rejected": rejected,
          "rewards/accuracies": (chosen > rejected).astype(jnp.float32), "rewards/margins": chosen - rejected,
          "logps/chosen": f32(chosen_logps), "logps/rejected": f32(rejected_logps)}


def dpo_pair_metrics(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array, *,
                     beta: float) -> dict[str, Array]:
  """TRL 1.16's DPO metrics of each pair [N] (`reward_metrics`): rewards beta x (policy - reference)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return reward_metrics(beta * (f32(policy_chosen) - f32(ref_chosen)),
                        beta * (f32(policy_rejected) - f32(ref_rejected)), policy_chosen, policy_rejected)


def logit_metrics(logit_sums: Array, chosen_tokens: Array, rejected_tokens: Array) -> dict[str, Array]:
  """TRL 1.16 DPO's `logits/*`: the mean over completion tokens of the mean logit predicting them, 0 without
  tokens. logit_sums: [N, 2] (chosen, rejected) sums over each completion's tokens; *_tokens: the token counts
  the means run over (one total each)."""
  sums = jax.lax.stop_gradient(jnp.asarray(logit_sums, jnp.float32))
  return {"logits/chosen": jnp.sum(sums[:, 0]) / jnp.maximum(jnp.asarray(chosen_tokens, jnp.float32), 1.0),
          "logits/rejected": jnp.sum(sums[:, 1]) / jnp.maximum(jnp.asarray(rejected_tokens, jnp.float32), 1.0)}
