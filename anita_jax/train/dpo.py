"""The preference objective: pairs, TRL's DPO and reference-free losses, their eval and metrics, the reference.

`dpo.objective` picks the loss family: dpo (TRL's DPOTrainer: a reference model), cpo (CPOTrainer: CPO, SimPO,
AlphaPO) or orpo (ORPOTrainer); the last two are reference-free, so their step runs no reference pass. Each
pair's loss and metrics come from one function (`_pair_terms`) for the padded, packed and eval layouts; the NLL
term (DPO's SFT term, CPO's cpo_alpha x NLL, ORPO's NLL of the chosen sequences) is a token mean (below).

A batch of B pairs is [2B, T] rows: the chosen completions, then the rejected ones (`data.preference`). The
reference is the same weights with the adapters switched off (`dpo.reference=base`: computed in the step, no second
copy of the model) or those numbers computed once before training and cached in the workdir
(`dpo.reference=precomputed`: `reference_logps.npy`), from the base or from another model (`dpo.reference_model`,
TRL's ref_model, loaded for that pass only).

With `data.packing` a batch is B packed rows of 2 x max_length tokens, each pair laid out once as
[prompt][chosen][rejected] (`data.preference`): the prompt is computed once, for both completions, by the policy
and by the reference. Per-pair sums go to B x (T // 2) pair slots (`losses.pair_completion_stats`); slots without
a pair count nowhere. An optimizer step's loss and metrics are means over the pairs the step holds, whatever their
split into micro-batches: each micro-batch adds its pairs' sum over the step's pair count (`step_normalizer`).
The NLL term is then the token mean over the step's chosen completions (or sequences). Padded, each micro-batch
has its own token mean, averaged over the step's micro-batches, as TRL's gradient accumulation averages them.
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
from jax.experimental import multihost_utils

from anita_jax import files
from anita_jax.convert import loading
from anita_jax.data import preference
from anita_jax.errors import UserError
from anita_jax.model import losses
from anita_jax.model import reference_free
from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train.objective import Objective, StepSpec, token_stats

REFERENCE_FILE = "reference_logps.npy"
REFERENCE_KEY_FILE = "reference_logps.json"  # what the file was computed from (`cached_reference`)


class Dpo(Objective):
  rows_per_example = 2  # unpacked; with data.packing train.batch_size counts rows (of 2 x max_length tokens)
  example_name = "pairs"

  def check(self, c):
    d = c.dpo
    if d.objective == "dpo":
      losses.check_dpo_options(d.loss_type, d.label_smoothing, d.discopop_tau, d.loss_weights, d.sft_weight)
    else:
      _check_reference_free(d)
    for field, readers in _OBJECTIVE_FIELDS.items():
      value, default = getattr(d, field), getattr(C.DpoFields, field)
      if d.objective not in readers and value != default:
        raise UserError(f"config field 'dpo.{field}'={value}: read by dpo.objective={'|'.join(readers)} only; "
                        f"leave it at {default} with dpo.objective={d.objective}")
    if not 0.0 <= d.ld_alpha <= 1.0:
      raise UserError(f"config field 'dpo.ld_alpha'={d.ld_alpha}: must lie in [0, 1] (the weight of the tokens "
                      f"past the shorter completion's length; 1 weights every token alike)")
    if c.data.packing and c.model.attention == "splash":
      raise UserError("config field 'model.attention'=splash cannot mask packed DPO pairs (the rejected "
                      "completion sees the prompt but not the chosen one): set model.attention=flash or dot, or "
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
    return c.dpo.objective == "dpo" and c.dpo.reference == "base"

  def step_normalizer(self, batches):
    return pair_counts(batches) if "branch_ids" in batches else None

  def loss(self, model, trainable, frozen, batch, rng, spec: StepSpec, normalizer):
    if "branch_ids" in batch:
      return packed_loss(model, trainable, frozen, batch, rng, spec, normalizer)
    logp, mean_logit = token_stats(model, trainable, frozen, batch, rng, spec)
    pol = _padded_stats(logp, mean_logit, batch, spec, present=True)
    ref = _padded_reference(model, trainable, frozen, batch, rng, spec) if spec.objective == "dpo" else None
    tokens = jnp.sum(pol["tokens"], axis=0)
    nll_mask = _nll_mask(spec, batch)
    counts = {"pairs": pol["present"].shape[0], "chosen_tokens": tokens[0], "rejected_tokens": tokens[1],
              "nll_tokens": jnp.sum(nll_mask, dtype=jnp.float32)}
    loss, metrics = _step_terms(spec, pol, ref, _masked_sum(logp, nll_mask), counts)
    metrics = {k: v / spec.grad_accum for k, v in metrics.items()}
    return loss / spec.grad_accum, {**metrics, "tokens": jnp.sum(tokens)}

  def eval_sums(self, model, spec, params, frozen, batch):
    """Per-pair sums over the batch's real pairs (an empty pair, the padding of the last eval batch, has
    no completion tokens and counts nowhere)."""
    model = model.clone(deterministic=True)
    if "branch_ids" in batch:
      return packed_eval_sums(model, spec, params, frozen, batch)
    logp, mean_logit = token_stats(model, params, frozen, batch, None, spec)
    pol = _padded_stats(logp, mean_logit, batch, spec, present=False)
    ref = None
    if spec.objective == "dpo":
      ref_stats = token_stats(model, params, frozen, batch, None, spec, adapters_enabled=False)
      ref = _padded_stats(*ref_stats, batch, spec, present=False)["logps"]
    nll_mask = _nll_mask(spec, batch)
    return _eval_sums(spec, pol, ref, _masked_sum(logp, nll_mask), jnp.sum(nll_mask, dtype=jnp.float32))

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


# dpo.* fields only some objectives read: {field: those objectives}. Another objective refuses a changed value.
_OBJECTIVE_FIELDS = {"ld_alpha": ("dpo",), "cpo_alpha": ("cpo",), "simpo_gamma": ("cpo",), "alpha": ("cpo",)}


def _check_reference_free(d: C.DpoFields) -> None:
  """Raises UserError for a dpo.* value that dpo.objective cpo or orpo cannot run (TRL's CPOTrainer and
  ORPOTrainer: one loss, no reference model, no loss lists, weights or SFT term beside their own NLL)."""
  if d.reference != "base":
    raise UserError(f"config field 'dpo.reference'={d.reference}: dpo.objective={d.objective} is reference-free "
                    f"(no reference log-probs to compute); leave it at base")
  if d.loss_weights:
    raise UserError(f"config field 'dpo.loss_weights'={d.loss_weights!r}: dpo.objective={d.objective} takes one "
                    f"loss type, with no weights (TRL's {d.objective.upper()}Trainer has no loss lists)")
  if d.sft_weight:
    term = "dpo.cpo_alpha weights its NLL term" if d.objective == "cpo" else "its NLL term has weight 1"
    raise UserError(f"config field 'dpo.sft_weight'={d.sft_weight}: not read by dpo.objective={d.objective} "
                    f"({term}); set it to 0")
  if d.objective == "cpo":
    reference_free.check_cpo_options(d.loss_type, d.label_smoothing, d.simpo_gamma, d.alpha)
    if d.loss_type == "alphapo" and d.cpo_alpha not in (0.0, C.DpoFields.cpo_alpha):
      raise UserError(f"config field 'dpo.cpo_alpha'={d.cpo_alpha}: loss_type alphapo sets it to 0 (TRL's "
                      f"alphapo is simpo with cpo_alpha 0); for an NLL term use loss_type=simpo with dpo.alpha")
    return
  if d.loss_type != C.DpoFields.loss_type:
    raise UserError(f"config field 'dpo.loss_type'={d.loss_type!r}: dpo.objective=orpo has one loss, the odds "
                    f"ratio; leave it at {C.DpoFields.loss_type}")
  if d.label_smoothing:
    raise UserError(f"config field 'dpo.label_smoothing'={d.label_smoothing}: not read by dpo.objective=orpo; "
                    f"set it to 0")


def _nll_term(spec: StepSpec) -> tuple[float, str]:
  """(weight, tokens) of the objective's NLL term: dpo's SFT term and cpo's cpo_alpha x NLL over the chosen
  completions, orpo's NLL (weight 1) over the chosen sequences, prompt included, as TRL's ORPOTrainer."""
  if spec.objective == "orpo":
    return 1.0, "sequence"
  if spec.objective == "cpo":
    return (0.0 if spec.loss_type == ("alphapo",) else spec.cpo_alpha), "completion"
  return _sft_weight(spec), "completion"


def _nll_mask(spec: StepSpec, batch) -> jax.Array:
  """[rows, T] bool: the chosen tokens the NLL term reads (`_nll_term`), in either layout."""
  sequence = _nll_term(spec)[1] == "sequence"
  if "branch_ids" in batch:  # packed: prompt (branch 0) and chosen (branch 1) tokens of each pair
    branch = batch["branch_ids"]
    if sequence:
      return losses.sequence_targets(batch["segment_ids"]) & (branch != 2)
    return (batch["loss_mask"] > 0) & (branch == 1)
  mask = losses.sequence_targets(batch["segment_ids"]) if sequence else batch["loss_mask"] > 0
  rows = jnp.arange(mask.shape[0])[:, None]
  return mask & (rows < mask.shape[0] // 2)  # the chosen rows


def _masked_sum(logp_bt, mask_bt) -> jax.Array:
  return jnp.sum(jnp.where(mask_bt, logp_bt, 0.0))


def _padded_stats(logp, mean_logit, batch, spec: StepSpec, *, present: bool) -> dict:
  """`losses.pair_completion_stats`' dict of a padded batch ([2B, T] -> [B, 2] arrays); the log-probs LD-DPO
  weighted. present: every pair is real (training), else those with chosen tokens (eval padding has none)."""
  if spec.ld_alpha != 1.0:
    logp = logp * losses.ld_weights(batch["loss_mask"], spec.ld_alpha)
  logps, tokens, mean_logit = losses.completion_stats(logp, mean_logit, batch["loss_mask"])
  tokens = tokens.astype(jnp.float32)
  pair = lambda x: jnp.stack(jnp.split(x, 2), axis=-1)  # noqa: E731
  stats = {"logps": pair(logps), "tokens": pair(tokens), "logit_sums": pair(mean_logit * tokens)}
  stats["present"] = jnp.ones(stats["logps"].shape[:1], bool) if present else stats["tokens"][:, 0] > 0
  return stats


def _padded_reference(model, trainable, frozen, batch, rng, spec: StepSpec) -> jax.Array:
  """The reference log-probs [B, 2] of a padded batch: precomputed ([2B] rows in the batch), or the same weights
  with the adapters switched off (no second copy)."""
  if "ref_logps" in batch:
    return jnp.stack(jnp.split(batch["ref_logps"], 2), axis=-1)
  stats = token_stats(model, jax.lax.stop_gradient(trainable), frozen, batch, rng, spec, adapters_enabled=False,
                      deterministic=True)
  return jax.lax.stop_gradient(_padded_stats(*stats, batch, spec, present=True)["logps"])


def _pair_terms(spec: StepSpec, pol: dict, ref) -> tuple[jax.Array, dict]:
  """(losses [N], metrics {TRL's name: [N]}) of each pair of `pol` (pair stats), by objective; ref: the
  reference log-probs [N, 2] (dpo) or None. The padded, packed and eval layouts share this one call."""
  # A slot without a pair gets placeholder log-probs: its values are masked out later, but a NaN there (ORPO's
  # log(1 - p) at p = 1) would pass the mask's gradient.
  present = pol["present"][:, None]
  logps, tokens = jnp.where(present, pol["logps"], -1.0), jnp.where(present, pol["tokens"], 1.0)
  args = (logps[:, 0], logps[:, 1], tokens[:, 0], tokens[:, 1])
  if spec.objective == "cpo":
    return reference_free.cpo_loss(*args, beta=spec.beta, loss_type=spec.loss_type[0],
                                   label_smoothing=spec.label_smoothing, simpo_gamma=spec.simpo_gamma,
                                   alpha=spec.alpha)
  if spec.objective == "orpo":
    return reference_free.orpo_loss(*args, beta=spec.beta)
  per_pair = _pair_losses(spec, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1])
  return per_pair, losses.dpo_pair_metrics(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=spec.beta)


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


def _step_terms(spec: StepSpec, pol: dict, ref, nll_logps, counts: dict) -> tuple[jax.Array, dict]:
  """(loss, metrics) of one micro-batch: its pairs' sums over the step's pair count, and the NLL term, its
  log-prob sum over the step's NLL tokens (counts: pairs, chosen_tokens, rejected_tokens, nll_tokens)."""
  per_pair, pair_metrics = _pair_terms(spec, pol, ref)
  pairs = jnp.maximum(jnp.asarray(counts["pairs"], jnp.float32), 1.0)
  total = lambda x: jnp.sum(jnp.where(pol["present"], x, 0.0))  # noqa: E731
  loss = total(per_pair) / pairs
  metrics = {k: total(v) / pairs for k, v in pair_metrics.items()}
  metrics.update(losses.logit_metrics(pol["logit_sums"], counts["chosen_tokens"], counts["rejected_tokens"]))
  weight, _ = _nll_term(spec)
  if weight:
    nll = losses.chosen_nll(nll_logps, counts["nll_tokens"])
    loss = loss + weight * nll
    if spec.objective != "dpo":  # TRL's CPO and ORPO trainers log it
      metrics["nll_loss"] = jax.lax.stop_gradient(nll)
  return loss, {"loss": loss, **metrics}


def _eval_sums(spec: StepSpec, pol: dict, ref, nll_logps, nll_tokens) -> dict:
  """Sums over the real pairs of the eval loss (the batch's NLL term added to each), reward accuracy and margin
  (`Dpo.eval_metrics` divides)."""
  per_pair, metrics = _pair_terms(spec, pol, ref)
  weight, _ = _nll_term(spec)
  if weight:
    per_pair = per_pair + weight * losses.chosen_nll(nll_logps, nll_tokens)
  count = lambda x: jnp.sum(jnp.where(pol["present"], x, 0.0))  # noqa: E731
  return {"loss_sum": count(per_pair), "weight": count(1.0), "acc_sum": count(metrics["rewards/accuracies"]),
          "margin_sum": count(metrics["rewards/margins"])}


def reference_logps(stage, examples, batch_size: int, max_length: int, pad_id: int) -> np.ndarray:
  """[N, 2] summed completion log-probs (chosen, rejected) of every pair under the reference, in one pass:
  `dpo.reference_model` (TRL's ref_model: loaded here, freed on return), else the base with the adapters
  disabled (the same numbers `dpo.reference=base` computes). LD-DPO weighted alike."""
  model, frozen, params = stage.model, stage.frozen, stage.state["params"]
  if stage.config.dpo.reference_model:
    (model, frozen), params = stage.reference_model(), {}

  @functools.partial(S.in_mesh, stage.mesh)
  @jax.jit
  def logps(frozen, params, batch):
    stats = token_stats(model, params, frozen, batch, None, stage.step_spec, adapters_enabled=False,
                        deterministic=True)
    return _padded_stats(*stats, batch, stage.step_spec, present=True)["logps"]

  out = np.zeros((len(examples), 2), np.float32)
  sharding = S.batch_sharding(stage.mesh)
  for start in range(0, len(examples), batch_size):
    pairs = list(range(start, min(start + batch_size, len(examples))))
    pairs += [pairs[-1]] * (batch_size - len(pairs))  # a fixed shape: one compile
    local = preference.build_batch(examples, pairs, 0, 2 * batch_size, max_length, pad_id)
    batch = {k: S.place(v, sharding) for k, v in local.items()}
    out[pairs] = np.asarray(jax.device_get(logps(frozen, params, batch)))
  return out


def reference_key(c, examples) -> str:
  """sha256 of what the reference log-probs are a function of: every pair's token ids, in order, the fields
  that pick the reference model (its base, dtype, quantization, the earlier stages it stacks; or
  `dpo.reference_model` and its files' fingerprint, so the same PATH rewritten recomputes) and LD-DPO's
  weight of the completions' tails."""
  if c.dpo.reference_model:
    source = [c.dpo.reference_model, loading.weights_fingerprint(c.dpo.reference_model), c.model.dtype]
  else:
    source = [c.model.path, c.model.dtype, dataclasses.asdict(c.quant), c.init_from, c.init_as, c.merge_into]
  h = hashlib.sha256(json.dumps([*source, c.dpo.ld_alpha]).encode())
  for ex in examples:
    for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids):
      ids = np.asarray(ids, np.int64)
      h.update(np.int64(ids.size).tobytes() + ids.tobytes())
  return h.hexdigest()


def cached_reference(stage, it, workdir: str) -> np.ndarray:
  """The reference log-probs of every training pair, from WORKDIR/reference_logps.npy or computed and saved.

  The file is used only when its sidecar (`REFERENCE_KEY_FILE`) holds this run's `reference_key` and the
  file's own sha256: other pairs (edited data, another max_length or tokenizer) or another reference model
  recompute it, and so does a file left without its sidecar by a run killed between the two writes.
  Process 0 decides for all: a reference model's fingerprint (its files' times) may differ between hosts."""
  path, key_path = os.path.join(workdir, REFERENCE_FILE), os.path.join(workdir, REFERENCE_KEY_FILE)
  c = stage.config
  key = reference_key(c, it.examples)
  data = files.read_bytes(path) if files.isfile(path) else None
  saved = json.loads(files.read_bytes(key_path)) if data is not None and files.isfile(key_path) else {}
  fresh = data is not None and saved == {"pairs": key, "file_sha256": hashlib.sha256(data).hexdigest()}
  if multihost_utils.broadcast_one_to_all(np.int32(fresh)):
    return np.load(io.BytesIO(data), allow_pickle=False)
  if data is not None and jax.process_index() == 0:
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


# ----------------------------------------------------------------------------------------------
# Packed pairs (data.packing)


def pair_counts(batches) -> dict:
  """The step's real pairs and completion tokens, and the chosen sequences' target tokens (ORPO's NLL), fp32
  scalars, from token leaves of any leading shape."""
  seg, branch, target = batches["segment_ids"], batches["branch_ids"], batches["loss_mask"] > 0
  return {"pairs": jnp.sum(jnp.max(seg, axis=-1), dtype=jnp.float32),
          "chosen_tokens": jnp.sum(target & (branch == 1), dtype=jnp.float32),
          "rejected_tokens": jnp.sum(target & (branch == 2), dtype=jnp.float32),
          "chosen_sequence_tokens": jnp.sum(losses.sequence_targets(seg) & (branch != 2), dtype=jnp.float32)}


def _packed_stats(logp, mean_logit, batch, spec: StepSpec) -> dict:
  """`losses.pair_completion_stats` of a packed micro-batch, the log-probs LD-DPO weighted."""
  slots = preference.max_pairs_per_row(batch["input_ids"].shape[-1])
  if spec.ld_alpha != 1.0:
    logp = logp * losses.packed_ld_weights(batch, slots, spec.ld_alpha)
  return losses.pair_completion_stats(logp, mean_logit, batch, slots)


def _packed_terms(model, trainable, frozen, batch, rng, spec: StepSpec, reference_in_batch: bool):
  """(policy pair stats, reference log-probs [N, 2] or None (reference-free), the NLL term's log-prob sum and
  token count) of a packed micro-batch."""
  logp, mean_logit = token_stats(model, trainable, frozen, batch, rng, spec, prev_index=batch["prev_index"])
  pol = _packed_stats(logp, mean_logit, batch, spec)
  nll_mask = _nll_mask(spec, batch)
  nll = (_masked_sum(logp, nll_mask), jnp.sum(nll_mask, dtype=jnp.float32))
  if spec.objective != "dpo":
    return pol, None, nll
  if reference_in_batch:  # columns 2k, 2k + 1 of each row: its pair k's (chosen, rejected)
    table = batch["ref_logps"]
    ref = table[:, :2 * preference.max_pairs_per_row(table.shape[-1])].reshape(-1, 2)
  else:
    ref_stats = token_stats(model, jax.lax.stop_gradient(trainable), frozen, batch, rng, spec,
                            prev_index=batch["prev_index"], adapters_enabled=False, deterministic=True)
    ref = _packed_stats(*ref_stats, batch, spec)["logps"]
  return pol, jax.lax.stop_gradient(ref), nll


def packed_loss(model, trainable, frozen, batch, rng, spec: StepSpec, normalizer):
  """This micro-batch's share of the step's mean over its pairs (and metrics likewise)."""
  counts = pair_counts(batch) if normalizer is None else normalizer
  pol, ref, (nll_logps, _) = _packed_terms(model, trainable, frozen, batch, rng, spec, "ref_logps" in batch)
  nll_tokens = counts["chosen_sequence_tokens" if _nll_term(spec)[1] == "sequence" else "chosen_tokens"]
  loss, metrics = _step_terms(spec, pol, ref, nll_logps, {**counts, "nll_tokens": nll_tokens})
  return loss, {**metrics, "tokens": jnp.sum(pol["tokens"])}


def packed_eval_sums(model, spec, params, frozen, batch) -> dict:
  """`Dpo.eval_sums` of a packed batch: sums over its pairs (padding rows have none)."""
  pol, ref, nll = _packed_terms(model, params, frozen, batch, None, spec, False)
  return _eval_sums(spec, pol, ref, *nll)


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
