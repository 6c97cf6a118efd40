"""The losses against torch, transformers' causal-LM loss and TRL 1.16's own DPO code."""

import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

from anita_jax.model import head as HD
from anita_jax.model import losses
from anita_jax.model import sharding as S
from anita_jax.errors import UserError

RTOL = 1e-6


def lm_batch(seed, b=3, t=9, v=50, scale=4.0):
  """Random logits and a right-padded batch with a masked prompt of varying length."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((b, t, v))).astype(np.float32)
  ids = rng.integers(0, v, (b, t)).astype(np.int32)
  lengths, prompts = [t, t - 3, 5][:b], [2, 1, 3][:b]
  seg = np.array([[1] * n + [0] * (t - n) for n in lengths], np.int32)
  mask = np.array([[int(p <= i < n) for i in range(t)] for n, p in zip(lengths, prompts)], np.int32)
  ids = np.where(seg > 0, ids, -100).astype(np.int32)  # out-of-vocabulary padding must be harmless
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  return logits, {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def torch_labels(batch):
  return torch.from_numpy(np.where(batch["loss_mask"] > 0, batch["input_ids"], -100).astype(np.int64))


def sft_loss(logits, batch, num_tokens=None):
  """(loss, target count): nll_terms over the logits path's token log-probs, divided as the sft
  objective divides them (by the batch's own count, or by the whole step's for accumulation)."""
  sum_nll, count = losses.nll_terms(losses.token_stats(logits, batch["input_ids"])[0], batch)
  return sum_nll / (jnp.maximum(count, 1.0) if num_tokens is None else num_tokens), count


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_matches_torch_log_softmax(dtype):
  logits, batch = lm_batch(0)
  logits_j = jnp.asarray(logits, dtype)
  got = np.asarray(jax.jit(losses.token_logprobs)(logits_j, batch["input_ids"]))
  ref_logits = torch.from_numpy(np.array(logits_j.astype(jnp.float32)))
  log_softmax = F.log_softmax(ref_logits[:, :-1], dim=-1)
  ids = torch.from_numpy(batch["input_ids"][:, 1:]).long()
  valid = ids >= 0
  want = torch.gather(log_softmax, -1, ids.clamp(min=0)[..., None])[..., 0].numpy()
  assert got.dtype == np.float32 and got.shape == batch["input_ids"].shape
  assert np.all(got[:, 0] == 0)
  np.testing.assert_allclose(got[:, 1:][valid.numpy()], want[valid.numpy()], rtol=RTOL)


def test_cross_entropy_matches_transformers_causal_lm_loss():
  logits, batch = lm_batch(1)
  loss, count = jax.jit(sft_loss)(jnp.asarray(logits), batch)
  labels = torch_labels(batch)
  want = ForCausalLMLoss(torch.from_numpy(logits), labels, vocab_size=logits.shape[-1])
  direct = F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)
  np.testing.assert_allclose(float(loss), want.item(), rtol=RTOL)
  np.testing.assert_allclose(float(loss), direct.item(), rtol=RTOL)
  assert float(count) == (labels[:, 1:] != -100).sum().item() == batch["loss_mask"].sum()


def test_cross_entropy_gradient_matches_torch_autograd():
  logits, batch = lm_batch(4)
  grad = jax.jit(jax.grad(lambda lg: sft_loss(lg, batch)[0]))(jnp.asarray(logits))
  ref_logits = torch.from_numpy(logits).requires_grad_()
  ForCausalLMLoss(ref_logits, torch_labels(batch), vocab_size=logits.shape[-1]).backward()
  np.testing.assert_allclose(np.asarray(grad), ref_logits.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_micro_batches_add_up_to_the_token_weighted_step_mean():
  logits, batch = lm_batch(2)
  labels = torch_labels(batch)
  full = ForCausalLMLoss(torch.from_numpy(logits), labels, vocab_size=logits.shape[-1]).item()
  split = [slice(0, 2), slice(2, 3)]  # 12 and 2 target tokens
  micro = [(jnp.asarray(logits[s]), {k: v[s] for k, v in batch.items()}) for s in split]
  total = sum(float(sft_loss(lg, mb)[1]) for lg, mb in micro)
  accumulated = 0.0
  for s, (lg, mb) in zip(split, micro):
    part = float(sft_loss(lg, mb, num_tokens=total)[0])
    want = ForCausalLMLoss(torch.from_numpy(logits[s]), labels[s], vocab_size=logits.shape[-1],
                           num_items_in_batch=torch.tensor(total)).item()
    np.testing.assert_allclose(part, want, rtol=RTOL)
    accumulated += part
  np.testing.assert_allclose(accumulated, full, rtol=RTOL)
  # A plain mean of per-micro-batch means would not be the step mean here.
  naive = np.mean([float(sft_loss(lg, mb)[0]) for lg, mb in micro])
  assert abs(naive - full) > 1e-3


def test_packed_sequence_start_and_padding_are_never_targets():
  logits, batch = lm_batch(3, b=1, t=10)
  batch["segment_ids"] = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32)
  batch["input_ids"] = np.abs(batch["input_ids"])
  bad_mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], np.int32)  # flags segment 2's first token and a pad
  good_mask = np.array([[0, 1, 1, 1, 0, 1, 1, 1, 0, 0]], np.int32)
  loss, count = sft_loss(jnp.asarray(logits), dict(batch, loss_mask=bad_mask))
  want = ForCausalLMLoss(torch.from_numpy(logits), torch_labels(dict(batch, loss_mask=good_mask)),
                         vocab_size=logits.shape[-1])
  np.testing.assert_allclose(float(loss), want.item(), rtol=RTOL)
  assert float(count) == 6


# ---- DPO against TRL 1.16's DPOTrainer._compute_loss ----------------------------------------------
# TRL 1.16 computes the DPO loss inline in DPOTrainer._compute_loss (there is no standalone dpo_loss).
# We call that method unbound, on a namespace holding the attributes it reads, with precomputed
# reference log-probs, and a model that is either a stub returning given per-token log-probs or a
# tiny LlamaForCausalLM carrying TRL's fused LM head. The stub hands TRL our fp32 log-probs widened
# to float64, so TRL's formulas run without rounding of their own (robust divides by 1 - 2 eps, which
# magnifies fp32 rounding tenfold at eps = 0.45) and our fp32 result is held to 1e-6 of them.


class _Accelerator:
  device = torch.device("cpu")
  gather = gather_for_metrics = staticmethod(lambda x: x)


def trl_dpo(model, inputs, ref_chosen, ref_rejected, *, beta, loss_types, loss_weights=None,
            label_smoothing=0.0, discopop_tau=0.05):
  trainer = types.SimpleNamespace(
      args=types.SimpleNamespace(discopop_tau=discopop_tau),
      model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
      precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
      loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
      use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _tp_size=1,
      _total_train_tokens=0)
  inputs = dict(inputs, ref_chosen_logps=torch.as_tensor(ref_chosen, dtype=torch.float64),
                ref_rejected_logps=torch.as_tensor(ref_rejected, dtype=torch.float64))
  with torch.no_grad():
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
  return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


class _LogprobStub:
  """Stands in for a model with TRL's fused head: returns the given per-token log-probs [2B, T]."""

  training = False

  def __init__(self, token_logps):
    self.token_logps = torch.as_tensor(token_logps, dtype=torch.float64)

  def __call__(self, input_ids, labels, fused_lm_head, **kwargs):
    mask = labels[:, 1:] != -100
    log_probs = self.token_logps[:, 1:] * mask
    zeros = torch.zeros_like(log_probs)
    return FusedCausalLMOutput(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(mask), label_mask=mask)


def pair_batch(seed, pairs=4, t=12):
  """[chosen; rejected] rows: per-token log-probs, completion masks, and reference log-probs."""
  rng = np.random.default_rng(seed)
  token_logps = -rng.gamma(2.0, 1.0, (2 * pairs, t)).astype(np.float32)
  prompt = rng.integers(1, 5, 2 * pairs)
  end = np.minimum(prompt + rng.integers(1, t - 4, 2 * pairs), t)
  mask = np.array([[int(p <= i < e) for i in range(t)] for p, e in zip(prompt, end)], np.int32)
  policy = (token_logps * mask).sum(axis=1)
  ref = (policy + rng.normal(0.0, 3.0, 2 * pairs)).astype(np.float32)
  inputs = {"input_ids": torch.zeros((2 * pairs, t), dtype=torch.long),
            "attention_mask": torch.ones((2 * pairs, t), dtype=torch.long),
            "completion_mask": torch.from_numpy(mask).long()}
  return token_logps, mask, ref, inputs


def ours_from_token_logps(token_logps, mask):
  policy_b = jnp.sum(jnp.where(mask > 0, token_logps, 0.0), axis=1)
  tokens_b = jnp.sum(mask, axis=1)
  pairs = len(mask) // 2
  return policy_b[:pairs], policy_b[pairs:], tokens_b[:pairs], tokens_b[pairs:]


LOSS_CASES = [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 0.0), ("robust", 0.1, 0.0, 0.0),
              ("robust", 0.1, 0.2, 0.0), ("robust", 0.3, 0.45, 0.0), ("hinge", 0.1, 0.0, 0.0),
              ("hinge", 0.5, 0.0, 0.0), ("ipo", 0.1, 0.0, 0.0), ("ipo", 1.0, 0.0, 0.0),
              ("sigmoid", 0.1, 0.0, 0.7), ("ipo", 0.5, 0.0, 1.0), ("robust", 0.2, 0.1, 0.3)]


# The other loss types TRL 1.16 computes per pair: (loss_type, beta, label_smoothing, discopop_tau).
MORE_LOSS_CASES = [("exo_pair", 0.1, 1e-3, 0.05), ("exo_pair", 0.5, 0.2, 0.05), ("nca_pair", 0.1, 0.0, 0.05),
                   ("nca_pair", 1.0, 0.0, 0.05), ("bco_pair", 0.1, 0.0, 0.05), ("bco_pair", 0.5, 0.0, 0.05),
                   ("sppo_hard", 0.1, 0.0, 0.05), ("sppo_hard", 1.0, 0.0, 0.05), ("apo_zero", 0.1, 0.0, 0.05),
                   ("apo_zero", 0.5, 0.0, 0.05), ("apo_down", 0.1, 0.0, 0.05), ("apo_down", 0.5, 0.0, 0.05),
                   ("discopop", 0.1, 0.0, 0.05), ("discopop", 0.3, 0.0, 0.5), ("sigmoid_norm", 0.1, 0.0, 0.05),
                   ("sigmoid_norm", 1.0, 0.0, 0.05)]


def test_every_offered_loss_type_is_checked_against_trl():
  assert {case[0] for case in LOSS_CASES + MORE_LOSS_CASES} == set(losses.DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type,beta,eps,sft_weight", LOSS_CASES)
def test_dpo_loss_matches_trl(loss_type, beta, eps, sft_weight):
  _check_against_trl(LOSS_CASES.index((loss_type, beta, eps, sft_weight)), loss_type, beta, eps, sft_weight)


@pytest.mark.parametrize("loss_type,beta,eps,tau", MORE_LOSS_CASES)
def test_more_dpo_loss_types_match_trl(loss_type, beta, eps, tau):
  _check_against_trl(100 + MORE_LOSS_CASES.index((loss_type, beta, eps, tau)), loss_type, beta, eps, 0.0, tau)


def _check_against_trl(seed, loss_type, beta, eps, sft_weight, tau=0.05):
  """Our per-pair losses' mean against TRL's loss of the batch, then each pair's against TRL's of that pair."""
  token_logps, mask, ref, inputs = pair_batch(seed)
  pairs = len(mask) // 2
  chosen, rejected, n_chosen, n_rejected = ours_from_token_logps(token_logps, mask)
  ours_b = jax.jit(lambda *a: losses.dpo_loss(
      *a, beta=beta, loss_type=loss_type, label_smoothing=eps, discopop_tau=tau, chosen_tokens=n_chosen,
      rejected_tokens=n_rejected))(chosen, rejected, ref[:pairs], ref[pairs:])
  margins = (np.asarray(chosen) - ref[:pairs]) - (np.asarray(rejected) - ref[pairs:])
  assert np.abs(margins).min() > 1e-2  # a reference apart from the policy
  ours = float(jnp.mean(ours_b) + sft_weight * losses.chosen_nll(chosen, n_chosen))
  trl_types, weights = ([loss_type, "sft"], [1.0, sft_weight]) if sft_weight else ([loss_type], None)
  want, _ = trl_dpo(_LogprobStub(token_logps), inputs, ref[:pairs], ref[pairs:], beta=beta,
                    loss_types=trl_types, loss_weights=weights, label_smoothing=eps, discopop_tau=tau)
  np.testing.assert_allclose(ours, want, rtol=RTOL, atol=RTOL)
  if sft_weight:
    return
  rows = np.arange(2 * pairs).reshape(2, pairs)
  for i in range(pairs):  # every pair on its own, so each per-pair loss is checked
    one = {k: v[rows[:, i]] for k, v in inputs.items()}
    want_i, _ = trl_dpo(_LogprobStub(token_logps[rows[:, i]]), one, ref[i:i + 1], ref[pairs + i:pairs + i + 1],
                        beta=beta, loss_types=[loss_type], label_smoothing=eps, discopop_tau=tau)
    np.testing.assert_allclose(float(ours_b[i]), want_i, rtol=RTOL, atol=RTOL)


# TRL 1.16's loss_type lists: (loss_type, loss_weights, beta, label_smoothing, discopop_tau).
COMBINED_CASES = [("sigmoid,sft", "", 0.1, 0.0, 0.05), ("sigmoid,bco_pair", "1,0.5", 0.1, 0.0, 0.05),
                  ("ipo,exo_pair,sft", "", 0.5, 1e-3, 0.05), ("sigmoid,sft", "1, 0.3", 0.2, 0.0, 0.05),
                  ("robust,hinge,sft", "0.3,2,0.7", 0.2, 0.1, 0.05),
                  ("discopop,sigmoid_norm,apo_zero", "1,-0.5,0.25", 0.3, 0.0, 0.3),
                  ("sft,nca_pair,sppo_hard,apo_down", "0.5,1,0.1,2", 0.1, 0.0, 0.05)]


@pytest.mark.parametrize("loss_type,weights,beta,eps,tau", COMBINED_CASES)
def test_combined_dpo_loss_types_match_trl(loss_type, weights, beta, eps, tau):
  """A loss_type list with its loss_weights against TRL's own loss of the same lists, as the step computes it:
  `dpo._pair_losses` of the DPO members plus `_sft_weight` x `chosen_nll`."""
  from anita_jax.train import dpo
  from anita_jax.train.objective import StepSpec
  token_logps, mask, ref, inputs = pair_batch(200 + COMBINED_CASES.index((loss_type, weights, beta, eps, tau)))
  pairs = len(mask) // 2
  chosen, rejected, n_chosen, n_rejected = ours_from_token_logps(token_logps, mask)
  names = loss_type.split(",")
  trl_weights = [float(w) for w in weights.split(",")] if weights else None
  want, _ = trl_dpo(_LogprobStub(token_logps), inputs, ref[:pairs], ref[pairs:], beta=beta, loss_types=names,
                    loss_weights=trl_weights, label_smoothing=eps, discopop_tau=tau)
  spec = StepSpec(stage="dpo", grad_accum=1, beta=beta, loss_type=tuple(names),
                  loss_weights=tuple(w.strip() for w in weights.split(",") if w.strip()), label_smoothing=eps,
                  discopop_tau=tau)
  per_pair = dpo._pair_losses(spec, chosen, rejected, ref[:pairs], ref[pairs:], n_chosen, n_rejected)
  step = jnp.mean(per_pair) + dpo._sft_weight(spec) * losses.chosen_nll(chosen, n_chosen)
  np.testing.assert_allclose(float(step), want, rtol=RTOL, atol=RTOL)
  hash(spec)  # static: the jitted step's cache key


LIST_REFUSALS = [  # (loss_type, loss_weights, label_smoothing, sft_weight, the field the one error line names)
    ("sigmoid,bco_pair", "1", 0.0, 0.0, "dpo.loss_weights"), ("sigmoid", "1,1", 0.0, 0.0, "dpo.loss_weights"),
    ("sigmoid,bco_pair", "1,half", 0.0, 0.0, "dpo.loss_weights"),
    ("sigmoid,bco_pair", "1,nan", 0.0, 0.0, "dpo.loss_weights"),
    ("sigmoid,sigmoid", "", 0.0, 0.0, "dpo.loss_type"), ("sigmoid,sft,sft", "", 0.0, 0.0, "dpo.loss_type"),
    ("sigmoid,aot", "", 0.0, 0.0, "dpo.loss_type"), ("", "", 0.0, 0.0, "dpo.loss_type"),
    ("sft", "2", 0.0, 0.0, "dpo.loss_type"), ("sigmoid,sft", "", 0.0, 0.5, "dpo.sft_weight"),
    ("sigmoid,bco_pair,sft", "", 0.1, 0.0, "dpo.label_smoothing"),
    ("robust,sigmoid", "", 0.5, 0.0, "dpo.label_smoothing"), ("sigmoid,exo_pair", "", 0.0, 0.0, "dpo.label_smoothing")]


@pytest.mark.parametrize("loss_type,weights,eps,sft_weight,field", LIST_REFUSALS)
def test_loss_type_list_refusals_are_one_line_naming_the_field(loss_type, weights, eps, sft_weight, field):
  with pytest.raises(UserError) as e:
    losses.check_dpo_options(loss_type, eps, 0.05, weights, sft_weight)
  message = str(e.value)
  assert message.startswith(f"{field}: ") and "\n" not in message, message


def test_label_smoothing_of_a_list_is_read_when_one_member_reads_it():
  losses.check_dpo_options("sigmoid,robust,sft", 0.2)
  losses.check_dpo_options("exo_pair,bco_pair", 1e-3, 0.05, "1, 2")


def test_sigmoid_label_smoothing_is_refused_because_trl_ignores_it():
  token_logps, mask, ref, inputs = pair_batch(7)
  pairs = len(mask) // 2
  stub = _LogprobStub(token_logps)
  smoothed, _ = trl_dpo(stub, inputs, ref[:pairs], ref[pairs:], beta=0.1, loss_types=["sigmoid"],
                        label_smoothing=0.2)
  plain, _ = trl_dpo(stub, inputs, ref[:pairs], ref[pairs:], beta=0.1, loss_types=["sigmoid"])
  assert smoothed == plain
  chosen, rejected, _, _ = ours_from_token_logps(token_logps, mask)
  with pytest.raises(UserError, match="label_smoothing"):
    losses.dpo_loss(chosen, rejected, ref[:pairs], ref[pairs:], beta=0.1, label_smoothing=0.2)
  with pytest.raises(UserError, match="label_smoothing"):
    losses.dpo_loss(chosen, rejected, ref[:pairs], ref[pairs:], beta=0.1, loss_type="robust", label_smoothing=0.5)
  with pytest.raises(UserError, match="loss_type"):
    losses.dpo_loss(chosen, rejected, ref[:pairs], ref[pairs:], beta=0.1, loss_type="kto")


REFUSALS = [  # (loss_type, label_smoothing, discopop_tau, the field the one error line names)
    ("aot", 0.0, 0.05, "dpo.loss_type"), ("aot_unpaired", 0.0, 0.05, "dpo.loss_type"),
    ("sft", 0.0, 0.05, "dpo.loss_type"), ("kto", 0.0, 0.05, "dpo.loss_type"),
    ("sigmoid,kto", 0.0, 0.05, "dpo.loss_type"), ("exo_pair", 0.0, 0.05, "dpo.label_smoothing"),
    ("exo_pair", 1.0, 0.05, "dpo.label_smoothing"), ("exo_pair", -0.1, 0.05, "dpo.label_smoothing"),
    ("nca_pair", 0.1, 0.05, "dpo.label_smoothing"), ("discopop", 0.1, 0.05, "dpo.label_smoothing"),
    ("sigmoid_norm", 0.1, 0.05, "dpo.label_smoothing"), ("discopop", 0.0, 0.0, "dpo.discopop_tau"),
    ("discopop", 0.0, -0.05, "dpo.discopop_tau")]


@pytest.mark.parametrize("loss_type,eps,tau,field", REFUSALS)
def test_dpo_option_refusals_are_one_line_naming_the_field(loss_type, eps, tau, field):
  with pytest.raises(UserError) as e:
    losses.check_dpo_options(loss_type, eps, tau)
  message = str(e.value)
  assert message.startswith(f"{field}: ") and "\n" not in message, message
  if loss_type in ("kto", "sigmoid,kto"):  # unknown: the full list of the offered types
    assert str(losses.DPO_LOSS_TYPES) in message


def test_aot_is_refused_because_trl_sorts_across_the_batch():
  """TRL's aot losses of one batch are not the mean of its halves': a pair's loss depends on its batch-mates,
  so micro-batches, devices or packed rows would change it."""
  token_logps, mask, ref, inputs = pair_batch(11, pairs=4)
  for loss_type in ("aot", "aot_unpaired"):
    whole, _ = trl_dpo(_LogprobStub(token_logps), inputs, ref[:4], ref[4:], beta=0.1, loss_types=[loss_type])
    halves = []
    for rows in ([0, 1, 4, 5], [2, 3, 6, 7]):
      part = {k: v[rows] for k, v in inputs.items()}
      halves.append(trl_dpo(_LogprobStub(token_logps[rows]), part, ref[rows[:2]], ref[rows[2:]], beta=0.1,
                            loss_types=[loss_type])[0])
    assert abs(whole - np.mean(halves)) > 1e-4, (loss_type, whole, halves)  # TRL in float64 here
    with pytest.raises(UserError, match="dpo.loss_type.*sorts"):
      losses.dpo_loss(jnp.zeros(4), jnp.zeros(4), ref[:4], ref[4:], beta=0.1, loss_type=loss_type)


def test_stage_config_accepts_new_loss_types_and_checks_discopop_tau(demo_config):
  from anita_jax.train import config as C
  from anita_jax.train.dpo import Dpo
  c = C.freeze(demo_config("dpo"))
  for loss_type in losses.DPO_LOSS_TYPES:
    Dpo().check(C.replace(c, **{"dpo.loss_type": loss_type,
                                "dpo.label_smoothing": 1e-3 if loss_type == "exo_pair" else 0.0}))
  with pytest.raises(UserError, match="^dpo.discopop_tau: "):
    Dpo().check(C.replace(c, **{"dpo.loss_type": "discopop", "dpo.discopop_tau": 0.0}))
  with pytest.raises(UserError, match="^dpo.loss_type: unknown"):
    Dpo().check(C.replace(c, **{"dpo.loss_type": "sigmoid,kto"}))
  Dpo().check(C.replace(c, **{"dpo.loss_type": "sigmoid,bco_pair,sft", "dpo.loss_weights": "1, 0.5, 0.2"}))
  with pytest.raises(UserError, match="^dpo.sft_weight: "):
    Dpo().check(C.replace(c, **{"dpo.loss_type": "sigmoid,sft", "dpo.sft_weight": 0.5}))
  with pytest.raises(UserError, match="^dpo.loss_weights: "):
    Dpo().check(C.replace(c, **{"dpo.loss_type": "sigmoid,sft", "dpo.loss_weights": "1"}))


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
  logps = jnp.array([-12.5, -3.0, -40.25])
  other = jnp.array([-7.0, -9.5, -1.0])
  loss_b = losses.dpo_loss(logps, other, logps, other, beta=0.1)
  np.testing.assert_allclose(np.asarray(loss_b), math.log(2), rtol=RTOL)
  m = losses.dpo_pair_metrics(logps, other, logps, other, beta=0.1)
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert np.all(np.asarray(m[name]) == 0.0)  # accuracies: ties do not count (strict >)


def test_dpo_metrics_match_numpy_float64():
  rng = np.random.default_rng(5)
  pc, pr, rc, rr = (-rng.gamma(5.0, 4.0, 6) for _ in range(4))
  pc[0], rc[0], pr[0], rr[0] = -5.0, -5.0, -8.0, -8.0  # a tie: not an accurate pair
  nc, nr = rng.integers(1, 20, 6), rng.integers(0, 20, 6)
  lc, lr = rng.normal(0, 2, 6), rng.normal(0, 2, 6)
  beta = 0.25

  def metrics(pc, pr, rc, rr, logit_sums, nc, nr):  # as the step reduces them: pair means, token means
    per_pair = losses.dpo_pair_metrics(pc, pr, rc, rr, beta=beta)
    return {**{k: jnp.mean(v) for k, v in per_pair.items()}, **losses.logit_metrics(logit_sums, nc, nr)}

  got = jax.jit(metrics)(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                         jnp.asarray(np.stack([lc * nc, lr * nr], -1), jnp.float32), nc.sum(), nr.sum())
  c, r = beta * (pc - rc), beta * (pr - rr)
  want = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracies": (c > r).mean(),
          "rewards/margins": (c - r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
          "logits/chosen": (lc * nc).sum() / nc.sum(), "logits/rejected": (lr * nr).sum() / nr.sum()}
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(float(got[name]), value, rtol=2e-6, atol=1e-6, err_msg=name)
  empty = losses.logit_metrics(np.stack([lc * 0, lr * nr], -1), 0, nr.sum())
  assert float(empty["logits/chosen"]) == 0.0


def test_dpo_from_logits_matches_trl_with_its_fused_head():
  """End to end: a tiny LlamaForCausalLM's logits through token_stats, completion_stats, loss and metrics."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
  rng = np.random.default_rng(11)
  pairs, t = 3, 14
  prompt = np.repeat(rng.integers(2, 6, pairs), 2).reshape(pairs, 2).T.reshape(-1)  # shared per pair
  end = np.minimum(prompt + rng.integers(2, 9, 2 * pairs), t)
  attention = np.array([[int(i < e) for i in range(t)] for e in end], np.int64)
  completion = np.array([[int(p <= i < e) for i in range(t)] for p, e in zip(prompt, end)], np.int64)
  ids = rng.integers(1, 64, (2 * pairs, t)) * attention
  ref = rng.normal(-40.0, 5.0, 2 * pairs).astype(np.float32)
  inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
            "completion_mask": torch.from_numpy(completion)}
  beta = 0.1
  want_loss, want_metrics = trl_dpo(model, inputs, ref[:pairs], ref[pairs:], beta=beta, loss_types=["sigmoid"])

  with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.numpy()
  logps_b, tokens_b, mean_logit_b = jax.jit(lambda lg, i, m: losses.completion_stats(*losses.token_stats(lg, i), m))(
      jnp.asarray(logits), jnp.asarray(ids, jnp.int32), jnp.asarray(completion, jnp.int32))
  halves = lambda x: (x[:pairs], x[pairs:])
  (pc, pr), (nc, nr), (lc, lr) = halves(logps_b), halves(tokens_b), halves(mean_logit_b)
  loss = jnp.mean(losses.dpo_loss(pc, pr, ref[:pairs], ref[pairs:], beta=beta))
  metrics = {k: jnp.mean(v) for k, v in losses.dpo_pair_metrics(pc, pr, ref[:pairs], ref[pairs:], beta=beta).items()}
  metrics.update(losses.logit_metrics(jnp.stack([lc * nc, lr * nr], -1), jnp.sum(nc), jnp.sum(nr)))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert np.all(np.asarray(nc) == completion[:pairs].sum(1))
  for name, value in metrics.items():
    np.testing.assert_allclose(float(value), want_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_head_equals_the_logits_path(vocab_major, dtype):
  """head_token_stats (chunked, hand-written backward) against token_stats of the full logits:
  values and the gradient through the hidden states, chunks that do not divide T, -100 padding.
  fp32 to 1e-5; bf16 to 2e-2, the tests' bf16 tolerance (rounding of the logits)."""
  _, batch = lm_batch(3, t=11, v=64)
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.standard_normal((3, 11, 16)), dtype)
  head = jnp.asarray(rng.standard_normal((64, 16) if vocab_major else (16, 64)), dtype)
  weights = jnp.asarray(rng.standard_normal((3, 11)), jnp.float32)
  mask = jnp.asarray(batch["loss_mask"] > 0)

  def objective(fused, h):
    if fused:
      logp, mean_logit = HD.head_token_stats(h, head, batch["input_ids"], vocab_major=vocab_major, chunk=4)
    else:
      logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, head)
      logp, mean_logit = losses.token_stats(logits, batch["input_ids"])
    return jnp.sum(jnp.where(mask, weights * logp, 0.0)), (logp, mean_logit)

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  (_, (lp_f, ml_f)), g_f = jax.jit(jax.value_and_grad(lambda h: objective(True, h), has_aux=True))(hidden)
  (_, (lp_p, ml_p)), g_p = jax.jit(jax.value_and_grad(lambda h: objective(False, h), has_aux=True))(hidden)
  valid = np.asarray(batch["input_ids"] >= 0)
  np.testing.assert_allclose(np.asarray(lp_f)[valid], np.asarray(lp_p)[valid], rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(ml_f), np.asarray(ml_p), rtol=tol, atol=tol)
  g_f, g_p = np.asarray(g_f, np.float32), np.asarray(g_p, np.float32)
  assert np.abs(g_f - g_p).max() <= tol * np.abs(g_p).max()


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (1, 8, 1), (4, 1, 2)], ids=str)
def test_vocab_parallel_head_equals_the_logits_path(shape, vocab_major):
  """The fused head under a (data, fsdp, tensor) mesh (vocabulary split over fsdp x tensor, rows gathered
  over fsdp; (1, 8, 1): 4 rows cannot be split 8 ways, so each device scores all of them) against
  token_stats of the full logits on one device: values and the gradient through the hidden states, fp32."""
  data, fsdp, tensor = shape
  rng = np.random.default_rng(5)
  b, t, d, v = 4, 10, 16, 64
  ids = rng.integers(0, v, (b, t)).astype(np.int32)
  ids[1, 7:] = -100  # out-of-vocabulary padding must stay harmless
  hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((v, d) if vocab_major else (d, v)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)

  def objective(fused, h):
    if fused:
      logp, mean_logit = HD.head_token_stats(h, head, ids, vocab_major=vocab_major, chunk=4)
    else:
      logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, head)
      logp, mean_logit = losses.token_stats(logits, ids)
    return jnp.sum(weights * jnp.where(ids >= 0, logp, 0.0)), (logp, mean_logit)

  (_, (lp_p, ml_p)), g_p = jax.jit(jax.value_and_grad(lambda h: objective(False, h), has_aux=True))(hidden)
  with jax.set_mesh(S.make_mesh(data=data, fsdp=fsdp, tensor=tensor)):
    (_, (lp_f, ml_f)), g_f = jax.jit(jax.value_and_grad(lambda h: objective(True, h), has_aux=True))(hidden)
  valid = ids >= 0
  np.testing.assert_allclose(np.asarray(lp_f)[valid], np.asarray(lp_p)[valid], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ml_f), np.asarray(ml_p), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_f), np.asarray(g_p), rtol=1e-5, atol=1e-5 * float(np.abs(g_p).max()))


def test_vocab_parallel_head_never_holds_the_whole_head():
  """Compiled on a (1, 4, 2) mesh, the fused head's program holds no [D, V] or [V, D] array: each device
  keeps its vocabulary slice (8 of the 64 tokens), while the hidden states' chunks are gathered."""
  b, t, d, v = 4, 8, 16, 64
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  head = jax.ShapeDtypeStruct((d, v), jnp.float32)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  fn = lambda h, w, i: jax.grad(lambda h: jnp.sum(HD.head_token_stats(h, w, i, vocab_major=False, chunk=4)[0]))(h)
  with jax.set_mesh(S.make_mesh(data=1, fsdp=4, tensor=2)):
    hlo = jax.jit(fn).lower(hidden, head, ids).compile().as_text()
  assert "f32[16,64]" not in hlo and "f32[64,16]" not in hlo
  assert "f32[16,8]" in hlo
