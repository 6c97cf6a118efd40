"""The DPO objective: preference pairs, TRL's losses, its eval and metrics, and the reference log-probs.

A batch of B pairs is [2B, T] rows: the chosen completions, then the rejected
ones (`data.preference`). The reference is the same weights with the adapters
switched off (`dpo.reference=base`: computed in the step, no second copy of
the model) or those numbers computed once before training and cached in the
workdir (`dpo.reference=precomputed`: `reference_logps.npy`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from anita_jax import files
from anita_jax.data import preference
from anita_jax.model import losses
from anita_jax.model import sharding as S
from anita_jax.train.objective import Objective, StepSpec, token_stats

REFERENCE_FILE = "reference_logps.npy"


class Dpo(Objective):
  rows_per_example = 2
  example_name = "pairs"

  def check(self, c):
    losses.check_dpo_options(c.dpo.loss_type, c.dpo.label_smoothing)

  def encode(self, c, rows, tokenizer):
    return preference.encode_preferences(rows, tokenizer, max_length=c.data.max_length,
                                         max_prompt_length=c.data.max_prompt_length)

  def iterator(self, examples, c, *, batch_size, seed, pad_id, num_processes, process_index):
    return preference.PreferenceBatchIterator(examples, batch_size=batch_size, max_length=c.data.max_length,
                                              seed=seed, pad_id=pad_id, num_processes=num_processes,
                                              process_index=process_index)

  def reference_forward(self, c) -> bool:
    return c.dpo.reference == "base"

  def loss(self, model, trainable, frozen, batch, rng, spec: StepSpec, normalizer):
    logp, mean_logit = token_stats(model, trainable, frozen, batch, rng, spec)
    logps, ntok, mean_logit = losses.completion_stats(logp, mean_logit, batch["loss_mask"])
    if "ref_logps" in batch:
      ref = batch["ref_logps"]
    else:  # the same weights with the adapters switched off: no second copy
      ref_stats = token_stats(model, jax.lax.stop_gradient(trainable), frozen, batch, rng, spec,
                              adapters_enabled=False, deterministic=True)
      ref = jax.lax.stop_gradient(losses.completion_stats(*ref_stats, batch["loss_mask"])[0])
    b = logps.shape[0] // 2
    per_pair = losses.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=spec.beta, loss_type=spec.loss_type,
                               label_smoothing=spec.label_smoothing, chosen_tokens=ntok[:b],
                               rejected_tokens=ntok[b:])
    loss = jnp.mean(per_pair)
    if spec.sft_weight:  # TRL's loss_type=["sigmoid", "sft"]: the chosen completions' token-mean NLL
      chosen = {k: v[:b] for k, v in batch.items() if k != "ref_logps"}
      sum_nll, count = losses.nll_terms(logp[:b], chosen)
      loss = loss + spec.sft_weight * sum_nll / jnp.maximum(count, 1.0)
    loss = loss / spec.grad_accum
    metrics = losses.dpo_metrics(logps[:b], logps[b:], ref[:b], ref[b:], beta=spec.beta, chosen_tokens=ntok[:b],
                                 rejected_tokens=ntok[b:], chosen_mean_logit=mean_logit[:b],
                                 rejected_mean_logit=mean_logit[b:])
    metrics = {k: v / spec.grad_accum for k, v in metrics.items()}
    return loss, {"loss": loss, "tokens": jnp.sum(ntok, dtype=jnp.float32), **metrics}

  def eval_sums(self, model, spec, params, frozen, batch):
    """Per-pair sums over the batch's real pairs (an empty pair, the padding of the last eval batch, has
    no completion tokens and counts nowhere)."""
    model = model.clone(deterministic=True)
    logp, mean_logit = token_stats(model, params, frozen, batch, None, spec)
    logps, ntok, _ = losses.completion_stats(logp, mean_logit, batch["loss_mask"])
    ref_stats = token_stats(model, params, frozen, batch, None, spec, adapters_enabled=False)
    ref = losses.completion_stats(*ref_stats, batch["loss_mask"])[0]
    b = logps.shape[0] // 2
    real = ntok[:b] > 0
    per_pair = losses.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=spec.beta, loss_type=spec.loss_type,
                               label_smoothing=spec.label_smoothing, chosen_tokens=ntok[:b],
                               rejected_tokens=ntok[b:])
    if spec.sft_weight:  # the chosen completions' token-mean NLL, as in the training loss
      sum_nll, count = losses.nll_terms(logp[:b], {k: v[:b] for k, v in batch.items()})
      per_pair = per_pair + spec.sft_weight * sum_nll / jnp.maximum(count, 1.0)
    margin = spec.beta * ((logps[:b] - ref[:b]) - (logps[b:] - ref[b:]))
    count = lambda x: jnp.sum(jnp.where(real, x, 0.0))  # noqa: E731
    return {"loss_sum": count(per_pair), "weight": count(1.0), "acc_sum": count((margin > 0).astype(jnp.float32)),
            "margin_sum": count(margin)}

  def eval_metrics(self, totals):
    return {"eval_loss": totals["loss_sum"] / max(totals["weight"], 1.0),
            "eval_rewards/accuracies": totals["acc_sum"] / totals["weight"],
            "eval_rewards/margins": totals["margin_sum"] / totals["weight"]}

  def extra_inputs(self, c):
    return {"ref_logps": (2, jnp.float32)} if c.dpo.reference == "precomputed" else {}

  def prepare(self, stage, train_iter, workdir):
    if stage.config.dpo.reference != "precomputed":
      return None
    return cached_reference(stage, train_iter, workdir)

  def next_batch(self, it, prepared):
    rows = None if prepared is None else _reference_rows(it, prepared)
    batch = next(it)
    if rows is not None:
      batch["ref_logps"] = rows
    return batch


def reference_logps(stage, examples, batch_size: int, max_length: int, pad_id: int) -> np.ndarray:
  """[N, 2] summed completion log-probs (chosen, rejected) of every pair under the reference
  (the base, adapters disabled), in one pass; the same numbers `dpo.reference=base` computes."""

  @functools.partial(S.in_mesh, stage.mesh)
  @jax.jit
  def logps(frozen, params, batch):
    stats = token_stats(stage.model, params, frozen, batch, None, stage.step_spec, adapters_enabled=False,
                        deterministic=True)
    return losses.completion_stats(*stats, batch["loss_mask"])[0]

  out = np.zeros((len(examples), 2), np.float32)
  sharding = S.batch_sharding(stage.mesh)
  for start in range(0, len(examples), batch_size):
    pairs = list(range(start, min(start + batch_size, len(examples))))
    pairs += [pairs[-1]] * (batch_size - len(pairs))  # a fixed shape: one compile
    local = preference.build_batch(examples, pairs, 0, 2 * batch_size, max_length, pad_id)
    batch = {k: S.place(v, sharding) for k, v in local.items()}
    values = np.asarray(jax.device_get(logps(stage.frozen, stage.state["params"], batch)))
    out[pairs, 0], out[pairs, 1] = values[:batch_size], values[batch_size:]
  return out


def cached_reference(stage, it, workdir: str) -> np.ndarray:
  """The reference log-probs of every training pair, from WORKDIR/reference_logps.npy or computed and saved."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if os.path.isfile(path):
    ref = np.load(path, allow_pickle=False)
    if ref.shape == (len(it.examples), 2):
      return ref
  c = stage.config
  ref = reference_logps(stage, it.examples, c.train.batch_size, c.data.max_length, it.pad_id)
  if jax.process_index() == 0:
    files.atomic_write(path, lambda tmp: np.save(tmp, ref, allow_pickle=False))
  return ref


def _reference_rows(it, ref: np.ndarray) -> np.ndarray:
  """This process's rows of the next batch's reference log-probs ([2B] global rows: chosen, then rejected)."""
  epoch, index = it.state()
  while index >= it.steps_in_epoch(epoch):
    epoch, index = epoch + 1, 0
  b = it.batch_size
  pairs = [g[0] for g in it.groups(epoch)[index * b:(index + 1) * b]]
  share = 2 * b // it.num_processes
  rows = range(it.process_index * share, (it.process_index + 1) * share)
  return np.asarray([ref[pairs[r % b], 0 if r < b else 1] for r in rows], np.float32)
