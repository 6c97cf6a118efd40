"""The DPO objective: preference pairs, TRL's losses, its eval and metrics, and the reference log-probs.

A batch of B pairs is [2B, T] rows: the chosen completions, then the rejected
ones (`data.preference`). The reference is the same weights with the adapters
switched off (`dpo.reference=base`: computed in the step, no second copy of
the model) or those numbers computed once before training and cached in the
workdir (`dpo.reference=precomputed`: `reference_logps.npy`).

With `data.packing` a batch is B packed rows of 2 x max_length tokens, each pair
laid out once as [prompt][chosen][rejected] (`data.preference`): the prompt is
computed once, for both completions, by the policy and by the reference. Per-pair
sums go to B x (T // 2) pair slots (`losses.pair_completion_stats`); slots
without a pair count nowhere. An optimizer step's loss and metrics are means over
the pairs the step holds, whatever their split into micro-batches: each
micro-batch adds its pairs' sum over the step's pair count (`step_normalizer`).
The SFT term is then the token mean over the step's chosen completions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from anita_jax import files
from anita_jax.data import preference
from anita_jax.errors import UserError
from anita_jax.model import losses
from anita_jax.model import sharding as S
from anita_jax.train.objective import Objective, StepSpec, token_stats

REFERENCE_FILE = "reference_logps.npy"
REFERENCE_KEY_FILE = "reference_logps.json"  # what the file was computed from (`cached_reference`)


class Dpo(Objective):
  rows_per_example = 2  # unpacked; with data.packing train.batch_size counts rows (of 2 x max_length tokens)
  example_name = "pairs"

  def check(self, c):
    losses.check_dpo_options(c.dpo.loss_type, c.dpo.label_smoothing, c.dpo.discopop_tau, c.dpo.loss_weights,
                             c.dpo.sft_weight)
    if c.data.packing and c.model.attention == "splash":
      raise UserError("config field 'model.attention'=splash cannot mask packed DPO pairs (the rejected "
                      "completion sees the prompt but not the chosen one): set model.attention=dot, or "
                      "data.packing=false")

  def batch_shape(self, c):
    if c.data.packing:
      return c.train.batch_size, preference.packed_row_length(c.data.max_length)
    return super().batch_shape(c)

  def encode(self, c, rows, tokenizer, *, workers=1):
    return preference.encode_preferences(rows, tokenizer, max_length=c.data.max_length,
                                         max_prompt_length=c.data.max_prompt_length, workers=workers)

  def iterator(self, examples, c, *, batch_size, seed, pad_id, num_processes, process_index):
    return preference.PreferenceBatchIterator(examples, batch_size=batch_size, max_length=c.data.max_length,
                                              seed=seed, pad_id=pad_id, num_processes=num_processes,
                                              process_index=process_index, packing=c.data.packing)

  def reference_forward(self, c) -> bool:
    return c.dpo.reference == "base"

  def step_normalizer(self, batches):
    return pair_counts(batches) if "branch_ids" in batches else None

  def loss(self, model, trainable, frozen, batch, rng, spec: StepSpec, normalizer):
    if "branch_ids" in batch:
      return packed_loss(model, trainable, frozen, batch, rng, spec, normalizer)
    logp, mean_logit = token_stats(model, trainable, frozen, batch, rng, spec)
    logps, ntok, mean_logit = losses.completion_stats(logp, mean_logit, batch["loss_mask"])
    if "ref_logps" in batch:
      ref = batch["ref_logps"]
    else:  # the same weights with the adapters switched off: no second copy
      ref_stats = token_stats(model, jax.lax.stop_gradient(trainable), frozen, batch, rng, spec,
                              adapters_enabled=False, deterministic=True)
      ref = jax.lax.stop_gradient(losses.completion_stats(*ref_stats, batch["loss_mask"])[0])
    b = logps.shape[0] // 2
    per_pair = _pair_losses(spec, logps[:b], logps[b:], ref[:b], ref[b:], ntok[:b], ntok[b:])
    loss = jnp.mean(per_pair)
    if sft_weight := _sft_weight(spec):  # TRL's loss_type=[..., "sft"]
      loss = loss + sft_weight * losses.chosen_nll(logps[:b], ntok[:b])
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
    if "branch_ids" in batch:
      return packed_eval_sums(model, spec, params, frozen, batch)
    logp, mean_logit = token_stats(model, params, frozen, batch, None, spec)
    logps, ntok, _ = losses.completion_stats(logp, mean_logit, batch["loss_mask"])
    ref_stats = token_stats(model, params, frozen, batch, None, spec, adapters_enabled=False)
    ref = losses.completion_stats(*ref_stats, batch["loss_mask"])[0]
    b = logps.shape[0] // 2
    real = ntok[:b] > 0
    per_pair = _pair_losses(spec, logps[:b], logps[b:], ref[:b], ref[b:], ntok[:b], ntok[b:])
    if sft_weight := _sft_weight(spec):  # as in the training loss
      per_pair = per_pair + sft_weight * losses.chosen_nll(logps[:b], ntok[:b])
    return _eval_sums(spec, logps[:b], logps[b:], ref[:b], ref[b:], per_pair, real)

  def eval_metrics(self, totals):
    return {"eval_loss": totals["loss_sum"] / max(totals["weight"], 1.0),
            "eval_rewards/accuracies": totals["acc_sum"] / totals["weight"],
            "eval_rewards/margins": totals["margin_sum"] / totals["weight"]}

  def extra_inputs(self, c):
    out = {"branch_ids": (3, jnp.int32), "prev_index": (3, jnp.int32)} if c.data.packing else {}
    if c.dpo.reference == "precomputed":  # packing: a [rows, T] table of the pair slots' values
      out["ref_logps"] = (3 if c.data.packing else 2, jnp.float32)
    return out

  def prepare(self, stage, train_iter, workdir):
    if stage.config.dpo.reference != "precomputed":
      return None
    return cached_reference(stage, train_iter, workdir)

  def preview(self, c, examples, tokenizer):
    if not c.data.packing:
      return super().preview(c, examples, tokenizer)
    return preference.packed_preview(examples, preference.packed_row_length(c.data.max_length), tokenizer)

  def next_batch(self, it, prepared):
    rows = None
    if prepared is not None:
      rows = (_packed_reference_rows if it.pair_packing else _reference_rows)(it, prepared)
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


def reference_key(c, examples) -> str:
  """sha256 of what the reference log-probs are a function of: every pair's token ids, in order, and the fields
  that pick the reference model (its base, dtype, quantization, the earlier stages it stacks)."""
  h = hashlib.sha256(json.dumps([c.model.path, c.model.dtype, dataclasses.asdict(c.quant), c.init_from, c.init_as,
                                 c.merge_into]).encode())
  for ex in examples:
    for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids):
      ids = np.asarray(ids, np.int64)
      h.update(np.int64(ids.size).tobytes() + ids.tobytes())
  return h.hexdigest()


def cached_reference(stage, it, workdir: str) -> np.ndarray:
  """The reference log-probs of every training pair, from WORKDIR/reference_logps.npy or computed and saved.

  The file is used only when its sidecar (`REFERENCE_KEY_FILE`) holds this run's `reference_key` and the
  file's own sha256: other pairs (edited data, another max_length or tokenizer) or another reference model
  recompute it, and so does a file left without its sidecar by a run killed between the two writes."""
  path, key_path = os.path.join(workdir, REFERENCE_FILE), os.path.join(workdir, REFERENCE_KEY_FILE)
  c = stage.config
  key = reference_key(c, it.examples)
  if files.isfile(path):
    data = files.read_bytes(path)
    saved = json.loads(files.read_bytes(key_path)) if files.isfile(key_path) else {}
    if saved == {"pairs": key, "file_sha256": hashlib.sha256(data).hexdigest()}:
      return np.load(io.BytesIO(data), allow_pickle=False)
    if jax.process_index() == 0:
      print(f"{path}: computed for other pairs or another reference model; computing it again", file=sys.stderr,
            flush=True)
  ref = reference_logps(stage, it.examples, c.train.batch_size, c.data.max_length, it.pad_id)
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.save(buffer, ref, allow_pickle=False)
    files.atomic_write(path, lambda tmp: _write_bytes(tmp, buffer.getvalue()))
    files.write_json(key_path, {"pairs": key, "file_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()})
  return ref


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def _reference_rows(it, ref: np.ndarray) -> np.ndarray:
  """This process's rows of the next batch's reference log-probs ([2B] global rows: chosen, then rejected)."""
  b = it.batch_size
  pairs = [g[0] for g in it.next_groups()]
  share = 2 * b // it.num_processes
  rows = range(it.process_index * share, (it.process_index + 1) * share)
  return np.asarray([ref[pairs[r % b], 0 if r < b else 1] for r in rows], np.float32)


def _pair_losses(spec: StepSpec, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens):
  """`losses.dpo_loss` [N] of the step's DPO loss types, weighted: the padded and packed layouts share this one
  call. The SFT term (`_sft_weight`) is the callers': a mean over the step's chosen tokens, not per pair."""
  terms = [(t, w) for t, w in losses.dpo_loss_terms(spec.loss_type, spec.loss_weights) if t != losses.SFT_TERM]
  return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=spec.beta,
                         loss_type=tuple(t for t, _ in terms), loss_weights=tuple(w for _, w in terms),
                         label_smoothing=spec.label_smoothing, discopop_tau=spec.discopop_tau,
                         chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)


def _sft_weight(spec: StepSpec) -> float:
  """The SFT term's weight: dpo.sft_weight, or the "sft" entry's in dpo.loss_type (`Dpo.check` refuses both)."""
  terms = losses.dpo_loss_terms(spec.loss_type, spec.loss_weights)
  return spec.sft_weight + sum(w for t, w in terms if t == losses.SFT_TERM)


# ----------------------------------------------------------------------------------------------
# Packed pairs (data.packing)


def pair_counts(batches) -> dict:
  """The step's real pairs and completion tokens, fp32 scalars, from token leaves of any leading shape."""
  seg, branch, target = batches["segment_ids"], batches["branch_ids"], batches["loss_mask"] > 0
  return {"pairs": jnp.sum(jnp.max(seg, axis=-1), dtype=jnp.float32),
          "chosen_tokens": jnp.sum(target & (branch == 1), dtype=jnp.float32),
          "rejected_tokens": jnp.sum(target & (branch == 2), dtype=jnp.float32)}


def _pair_stats(model, trainable, frozen, batch, rng, spec, **model_kwargs) -> dict:
  stats = token_stats(model, trainable, frozen, batch, rng, spec, prev_index=batch["prev_index"], **model_kwargs)
  return losses.pair_completion_stats(*stats, batch, preference.max_pairs_per_row(batch["input_ids"].shape[-1]))


def _packed_terms(model, trainable, frozen, batch, rng, spec, reference_in_batch: bool):
  """(policy pair stats, reference log-probs [N, 2], per-pair DPO losses [N]) of a packed micro-batch."""
  pol = _pair_stats(model, trainable, frozen, batch, rng, spec)
  if reference_in_batch:  # columns 2k, 2k + 1 of each row: its pair k's (chosen, rejected)
    table = batch["ref_logps"]
    ref = table[:, :2 * preference.max_pairs_per_row(table.shape[-1])].reshape(-1, 2)
  else:
    ref = _pair_stats(model, jax.lax.stop_gradient(trainable), frozen, batch, rng, spec, adapters_enabled=False,
                      deterministic=True)["logps"]
  ref = jax.lax.stop_gradient(ref)
  logps, ntok = pol["logps"], pol["tokens"]
  per_pair = _pair_losses(spec, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], ntok[:, 0], ntok[:, 1])
  return pol, ref, jnp.where(pol["present"], per_pair, 0.0)


def packed_loss(model, trainable, frozen, batch, rng, spec: StepSpec, normalizer):
  """This micro-batch's share of the step's mean over its pairs (and metrics likewise)."""
  counts = pair_counts(batch) if normalizer is None else normalizer
  pol, ref, per_pair = _packed_terms(model, trainable, frozen, batch, rng, spec, "ref_logps" in batch)
  logps = pol["logps"]
  loss = jnp.sum(per_pair) / jnp.maximum(counts["pairs"], 1.0)
  if sft_weight := _sft_weight(spec):  # over the step's chosen completions
    chosen = jnp.where(pol["present"], logps[:, 0], 0.0)
    loss = loss + sft_weight * losses.chosen_nll(chosen, counts["chosen_tokens"])
  sums = losses.dpo_metric_sums(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=spec.beta,
                                present=pol["present"])
  metrics = {k: v / jnp.maximum(counts["pairs"], 1.0) for k, v in sums.items()}
  for column, name in enumerate(("chosen", "rejected")):
    metrics[f"logits/{name}"] = (jnp.sum(pol["logit_sums"][:, column])
                                 / jnp.maximum(counts[f"{name}_tokens"], 1.0))
  return loss, {"loss": loss, "tokens": jnp.sum(pol["tokens"]), **metrics}


def packed_eval_sums(model, spec, params, frozen, batch) -> dict:
  """`Dpo.eval_sums` of a packed batch: sums over its pairs (padding rows have none)."""
  pol, ref, per_pair = _packed_terms(model, params, frozen, batch, None, spec, False)
  logps, present = pol["logps"], pol["present"]
  if sft_weight := _sft_weight(spec):  # over the batch's chosen completions, as the unpacked eval
    per_pair = per_pair + sft_weight * losses.chosen_nll(jnp.where(present, logps[:, 0], 0.0),
                                                         pol["tokens"][:, 0])
  return _eval_sums(spec, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], per_pair, present)


def _eval_sums(spec, chosen, rejected, ref_chosen, ref_rejected, per_pair, real) -> dict:
  """Sums over the real pairs of the eval loss, reward accuracy and margin (`Dpo.eval_metrics` divides)."""
  margin = spec.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
  count = lambda x: jnp.sum(jnp.where(real, x, 0.0))  # noqa: E731
  return {"loss_sum": count(per_pair), "weight": count(1.0), "acc_sum": count((margin > 0).astype(jnp.float32)),
          "margin_sum": count(margin)}


def _packed_reference_rows(it, ref: np.ndarray) -> np.ndarray:
  """This process's rows of the next packed batch's reference table [rows, T]: columns 2k, 2k + 1 hold the
  reference log-probs (chosen, rejected) of the row's pair k (`_packed_terms`)."""
  share = it.batch_size // it.num_processes
  groups = it.next_groups()[it.process_index * share:(it.process_index + 1) * share]
  table = np.zeros((share, it.max_length), np.float32)
  for r, group in enumerate(groups):
    for k, pair in enumerate(group):
      table[r, 2 * k:2 * k + 2] = ref[pair]
  return table
