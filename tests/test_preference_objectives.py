"""The reference-free objectives (dpo.objective cpo: CPO, SimPO, AlphaPO; orpo) and LD-DPO's dpo.ld_alpha against
TRL 1.16's own CPOTrainer, ORPOTrainer and DPOTrainer code; packed = padded; no reference pass in their step."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_dpo import dpo_config, metrics_of, pairs_file, rel  # noqa: F401 - pairs_file is a fixture
from test_dpo_packing import _examples, _layouts, _stage, many_pairs_file  # noqa: F401 - a fixture
from test_train_reference import peft_model_with_our_adapters
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from anita_jax.data import preference as PR
from anita_jax.data import rows as D
from anita_jax.errors import UserError
from anita_jax.model import losses
from anita_jax.model import reference_free
from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train import dpo
from anita_jax.train import loop as T
from anita_jax.train import state as ST
from anita_jax.train import step as STEP
from anita_jax.train import workdir as W
from anita_jax.train.dpo import Dpo
from anita_jax.train.objective import StepSpec, token_stats
from anita_jax.train.optim import make_optimizer

RTOL = 1e-6


class _Accelerator:
  device = torch.device("cpu")
  gather = gather_for_metrics = staticmethod(lambda x: x)


def trl_trainer(objective, tmp_path, **options):
  """TRL's CPOTrainer or ORPOTrainer (made with object.__new__), its loss options set as its __init__ sets them
  from its config (CPOConfig maps loss_type alphapo to simpo with cpo_alpha 0)."""
  if objective == "orpo":
    args = ORPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **options)
    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(beta=args.beta, padding_value=0)
  else:
    args = CPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **options)
    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
                            cpo_alpha=args.cpo_alpha, simpo_gamma=args.simpo_gamma, alpha=args.alpha, pad_token_id=0)
  trainer.__dict__.update(is_encoder_decoder=False, aux_loss_enabled=False, accelerator=_Accelerator())
  return trainer


def trl_batch(rows_ids, prompt_lengths, pairs):
  """TRL's chosen_/rejected_ input_ids, attention_mask and labels (-100 on prompt and padding) of [2B] token
  rows (the B chosen, then the B rejected)."""
  t = max(len(r) for r in rows_ids)
  ids, attention, labels = (np.full((len(rows_ids), t), v, np.int64) for v in (0, 0, -100))
  for i, (row, p) in enumerate(zip(rows_ids, prompt_lengths)):
    ids[i, :len(row)], attention[i, :len(row)], labels[i, p:len(row)] = row, 1, row[p:]
  out = {}
  for name, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
    for key, value in (("input_ids", ids), ("attention_mask", attention), ("labels", labels)):
      out[f"{name}_{key}"] = torch.from_numpy(value[rows])
  return out


class _LogitsStub:
  """A model returning the given logits [2B, T, V] (float64, so TRL's formulas add no rounding of their own)."""

  def __init__(self, logits):
    self.logits = torch.as_tensor(logits, dtype=torch.float64)

  def __call__(self, input_ids, attention_mask, use_cache):
    return types.SimpleNamespace(logits=self.logits[:, :input_ids.shape[1]])


def random_pairs(seed, pairs=4, t=12, v=40):
  """Random fp32 logits and [2B, T] rows: a prompt shared by each pair, completions of different lengths."""
  rng = np.random.default_rng(seed)
  logits = (2.0 * rng.standard_normal((2 * pairs, t, v))).astype(np.float32)
  prompt = np.tile(rng.integers(2, 5, pairs), 2)
  end = np.minimum(prompt + rng.integers(1, t - 4, 2 * pairs), t)
  ids = rng.integers(1, v, (2 * pairs, t)).astype(np.int32)
  ids[pairs:, :prompt.max()] = ids[:pairs, :prompt.max()]
  seg = np.array([[int(i < e) for i in range(t)] for e in end], np.int32)
  mask = np.array([[int(p <= i < e) for i in range(t)] for p, e in zip(prompt, end)], np.int32)
  batch = {"input_ids": ids * seg, "loss_mask": mask, "segment_ids": seg,
           "positions": np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)}
  return logits, batch, [batch["input_ids"][i, :e] for i, e in enumerate(end)], prompt


def ours_from_logits(spec, logits, batch):
  """The padded step's loss and metrics (dpo._padded_stats, dpo._step_terms) from logits, one micro-batch."""
  logp, mean_logit = losses.token_stats(jnp.asarray(logits), batch["input_ids"])
  pol = dpo._padded_stats(logp, mean_logit, batch, spec, present=True)
  tokens = jnp.sum(pol["tokens"], axis=0)
  mask = dpo._nll_mask(spec, batch)
  counts = {"pairs": pol["present"].shape[0], "chosen_tokens": tokens[0], "rejected_tokens": tokens[1],
            "nll_tokens": jnp.sum(mask, dtype=jnp.float32)}
  return dpo._step_terms(spec, pol, None, dpo._masked_sum(logp, mask), counts)


# (objective, TRL options): every CPO loss type, label smoothing, SimPO's gamma, AlphaPO's alpha, cpo_alpha.
TRL_CASES = [
    ("cpo", {"loss_type": "sigmoid", "beta": 0.1}), ("cpo", {"loss_type": "sigmoid", "beta": 0.5,
                                                              "label_smoothing": 0.2, "cpo_alpha": 0.5}),
    ("cpo", {"loss_type": "sigmoid", "beta": 0.1, "alpha": 0.05}), ("cpo", {"loss_type": "hinge", "beta": 0.2}),
    ("cpo", {"loss_type": "ipo", "beta": 0.5}), ("cpo", {"loss_type": "ipo", "beta": 0.1, "cpo_alpha": 0.0}),
    ("cpo", {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0}),
    ("cpo", {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.2, "label_smoothing": 0.1}),
    ("cpo", {"loss_type": "alphapo", "beta": 2.0, "alpha": 0.25}),
    ("cpo", {"loss_type": "alphapo", "beta": 1.0, "alpha": -0.5, "simpo_gamma": 0.3, "label_smoothing": 0.05}),
    ("orpo", {"beta": 0.1}), ("orpo", {"beta": 1.0})]


def spec_of(objective, options):
  return StepSpec(stage="dpo", grad_accum=1, objective=objective, loss_type=(options.get("loss_type", "sigmoid"),),
                  **{k: v for k, v in options.items() if k != "loss_type"})


def test_every_cpo_loss_type_is_checked_against_trl():
  assert {o.get("loss_type") for k, o in TRL_CASES if k == "cpo"} == set(reference_free.CPO_LOSS_TYPES)


@pytest.mark.parametrize("objective,options", TRL_CASES)
def test_step_loss_and_metrics_match_trl_get_batch_loss_metrics(objective, options, tmp_path):
  """Our padded step's loss and metrics against TRL's `get_batch_loss_metrics` (its concatenated forward,
  per-token averaging, `cpo_loss` / `odds_ratio_loss` and NLL) on the same logits; then each pair's loss
  against TRL's `cpo_loss` / `odds_ratio_loss` of that pair. TRL in float64, ours fp32: 1e-6 relative."""
  logits, batch, rows, prompt = random_pairs(TRL_CASES.index((objective, options)))
  pairs = len(rows) // 2
  trainer = trl_trainer(objective, tmp_path, **options)
  with torch.no_grad():
    want_loss, want = trainer.get_batch_loss_metrics(_LogitsStub(logits), trl_batch(rows, prompt, pairs))
  spec = spec_of(objective, options)
  loss, got = jax.jit(ours_from_logits, static_argnums=0)(spec, logits, batch)
  np.testing.assert_allclose(float(loss), want_loss.item(), rtol=RTOL, atol=RTOL)
  # logits/*: TRL's CPO and ORPO trainers average every position of the padded batch (prompt and padding too);
  # ours are DPO's completion-token means. nll_loss: logged where the NLL term is on (TRL logs 0 when it is off).
  nll_off = objective == "cpo" and (options["loss_type"] == "alphapo" or options.get("cpo_alpha", 1.0) == 0.0)
  keys = {k for k in want if not k.startswith("logits/")} - ({"nll_loss"} if nll_off else set())
  assert keys == set(got) - {"loss", "logits/chosen", "logits/rejected"}, (keys, set(got))
  for key in keys:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=RTOL, atol=RTOL, err_msg=key)
  # Each pair's loss on its own, from TRL's per-pair function on TRL's averaged (or summed) log-probs.
  stats = jax.jit(losses.token_stats)(jnp.asarray(logits), batch["input_ids"])
  per_pair, _ = dpo._pair_terms(spec, dpo._padded_stats(*stats, batch, spec, present=True), None)
  average = objective == "orpo" or options.get("loss_type") in ("ipo", "simpo", "alphapo")
  labels = torch.from_numpy(np.where(batch["loss_mask"] > 0, batch["input_ids"], -100).astype(np.int64))
  trl_logps = CPOTrainer.get_batch_logps(torch.as_tensor(logits, dtype=torch.float64), labels,
                                         average_log_prob=average)
  with torch.no_grad():
    if objective == "orpo":
      want_b = -trainer.odds_ratio_loss(trl_logps[:pairs], trl_logps[pairs:])[0]
    else:
      want_b = trainer.cpo_loss(trl_logps[:pairs], trl_logps[pairs:])[0]
  np.testing.assert_allclose(np.asarray(per_pair), want_b.numpy(), rtol=RTOL, atol=RTOL)


def test_ld_alpha_weights_match_trl_masks():
  """losses.ld_weights against TRL's shared/tail masks (dpo_trainer.py's ld_alpha lines) on random lengths."""
  rng = np.random.default_rng(3)
  mask = np.zeros((8, 16), np.int32)
  for i in range(8):
    start = rng.integers(1, 5)
    mask[i, start:start + rng.integers(0, 11)] = 1
  shift = torch.from_numpy(mask[:, 1:])
  comp_pos = shift.cumsum(dim=1)
  shared = torch.minimum(*shift.sum(dim=1).chunk(2)).repeat(2)
  shared_mask, tail_mask = (comp_pos > 0) & (comp_pos <= shared[:, None]), comp_pos > shared[:, None]
  completion = mask[:, 1:] > 0  # TRL's log-probs are 0 elsewhere: only these tokens' weights count
  got = np.asarray(losses.ld_weights(jnp.asarray(mask), 0.3))[:, 1:][completion]
  want = np.where(tail_mask.numpy(), 0.3, np.where(shared_mask.numpy(), 1.0, np.nan))[completion]
  assert 0.3 in want and 1.0 in want
  np.testing.assert_array_equal(got, want.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# First step of the stage against TRL's trainers on the same model and pairs


def trl_first_step(objective, c, model_dir, pairs_path, tmp_path, **options):
  """(loss, metrics, grad norm over the adapters) of TRL's trainer on the batch of all pairs, built from OUR
  token ids (TRL's CPO/ORPO trainers tokenize differently), on transformers' fp32 model with a PEFT LoRA
  holding our initial adapters (B = 0: the policy is the base, as our step 1)."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  examples, _ = PR.encode_preferences(D.load_rows([pairs_path]), tokenizer, max_length=c.data.max_length)
  rows = ([np.concatenate([ex.prompt_ids, ex.chosen_ids]) for ex in examples]
          + [np.concatenate([ex.prompt_ids, ex.rejected_ids]) for ex in examples])
  prompt = [len(ex.prompt_ids) for ex in examples] * 2
  initial = jax.tree.map(np.asarray, ST.build_stage(c, W.base_model_path(C.freeze(c))).state["params"])
  model = peft_model_with_our_adapters(model_dir, c, initial)
  trainer = trl_trainer(objective, tmp_path, **options)
  loss, metrics = trainer.get_batch_loss_metrics(model, trl_batch(rows, prompt, len(examples)))
  loss.backward()
  grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
  return loss.item(), metrics, float(torch.sqrt(sum(torch.sum(g.double() ** 2) for g in grads)))


FIRST_STEP_CASES = [("orpo", {"beta": 0.1}), ("cpo", {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0}),
                    ("cpo", {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0})]


@pytest.mark.slow
@pytest.mark.parametrize("objective,options", FIRST_STEP_CASES)
def test_first_step_matches_trl_trainer(objective, options, demo_config, tiny_hf_dir, pairs_file, tmp_path):
  overrides = {"quant.type": "none", "train.steps": 1, "mesh.data": 1, "dpo.objective": objective,
               **{f"dpo.{k}": v for k, v in options.items()}}
  c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **overrides)
  T.train_and_evaluate(c, str(tmp_path / "ours"))
  ours = metrics_of(str(tmp_path / "ours"))[0]
  want_loss, want, want_norm = trl_first_step(objective, c, tiny_hf_dir, pairs_file, tmp_path / "trl", **options)
  print(f"{objective} {options}: loss {ours['loss']:.7f} vs {want_loss:.7f}, grad_norm {ours['grad_norm']:.7g} vs "
        f"{want_norm:.7g}")
  assert rel(ours["loss"], want_loss) <= 1e-5, (ours["loss"], want_loss)
  assert rel(ours["grad_norm"], want_norm) <= 1e-5, (ours["grad_norm"], want_norm)
  keys = {k for k in want if not k.startswith("logits/")}  # logits/*: see test_step_loss_and_metrics_...
  if options.get("cpo_alpha") == 0.0:  # the NLL term is off: TRL logs 0, we leave it out
    keys.remove("nll_loss")
  assert keys <= set(ours) and ("nll_loss" in ours) == ("nll_loss" in keys)
  for key in keys:
    assert abs(ours[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (key, ours[key], want[key])


@pytest.mark.slow
def test_ld_alpha_matches_trl_dpo_trainer(demo_config, tiny_hf_dir, pairs_file, tmp_path):
  """Two steps with dpo.ld_alpha=0.5 (reference in the step, and precomputed) against TRL's DPOTrainer: step 2
  has policy != reference, so both sides' weighting shows in the rewards."""
  import datasets
  import transformers
  import trl
  common = {"quant.type": "none", "train.steps": 2, "mesh.data": 1, "train.weight_decay": 0.0,
            "dpo.ld_alpha": 0.5}
  runs = {}
  for reference in ("base", "precomputed"):
    c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **common, **{"dpo.reference": reference})
    T.train_and_evaluate(c, str(tmp_path / reference))
    runs[reference] = metrics_of(str(tmp_path / reference))
  initial = jax.tree.map(np.asarray, ST.build_stage(c, W.base_model_path(C.freeze(c))).state["params"])
  model = peft_model_with_our_adapters(tiny_hf_dir, c, initial)
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=c.train.batch_size,
                       max_steps=2, logging_steps=1, report_to=[], use_cpu=True, max_length=c.data.max_length,
                       beta=c.dpo.beta, learning_rate=c.train.lr, lr_scheduler_type="linear", warmup_steps=0,
                       weight_decay=0.0, max_grad_norm=c.train.max_grad_norm, loss_type=["sigmoid"], ld_alpha=0.5,
                       save_strategy="no", seed=0, bf16=False, gradient_checkpointing=False)
  rows = [json.loads(line) for line in open(pairs_file, encoding="utf-8")]
  trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=transformers.AutoTokenizer.from_pretrained(tiny_hf_dir))
  trainer.train()
  theirs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
  for reference, ours in runs.items():
    # Step 1: ld-weighted log-probs, and the gradient they give; step 2 (after one AdamW update): the rewards
    # (1e-4 as test_dpo_with_sft_term_matches_trl: one update's rounding).
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
      assert rel(ours[0][key], theirs[0][key]) <= 1e-5, (reference, key, ours[0][key], theirs[0][key])
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
      assert rel(ours[1][key], theirs[1][key]) <= 1e-4, (reference, key, ours[1][key], theirs[1][key])
  unweighted = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{**common, "dpo.ld_alpha": 1.0})
  examples = T.build_data(C.freeze(c), trainer.processing_class, batch_size=1)[0].examples  # the cache's key
  assert dpo.reference_key(C.freeze(c), examples) != dpo.reference_key(C.freeze(unweighted), examples)


# ----------------------------------------------------------------------------------------------
# Packed = padded; no reference pass


@pytest.fixture(scope="module")
def packing_case(demo_config, tiny_hf_dir):
  """(stage, trainable with B != 0: policy != reference, padded batch, packed batch) of the same pairs."""
  stage, trainable = _stage(demo_config, tiny_hf_dir)
  padded, packed, _ = _layouts(_examples(stage.tokenizer))
  return stage, trainable, padded, packed


@pytest.mark.parametrize("case", [{"objective": "orpo", "beta": 0.2},
                                  {"objective": "cpo", "loss_type": ("simpo",), "beta": 2.0, "cpo_alpha": 0.5},
                                  {"objective": "dpo", "ld_alpha": 0.4, "sft_weight": 0.3}],
                         ids=["orpo", "simpo", "ld_alpha"])
def test_packed_equals_padded(case, packing_case):
  """Loss, metrics and gradients of the same pairs in the padded and packed layouts (1e-5); and in each, the eval
  of the batch (every pair real) gives the training loss, reward accuracy and margin."""
  stage, trainable, padded, packed = packing_case
  spec = dataclasses.replace(stage.step_spec, grad_accum=1, **case)
  results = []
  for batch in (padded, packed):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    fn = jax.jit(jax.value_and_grad(lambda t, b: Dpo().loss(stage.model, t, stage.frozen, b, None, spec, None),
                                    has_aux=True))
    (_, metrics), grads = fn(trainable, batch)
    results.append((metrics, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])))
    sums = jax.jit(lambda t, b: Dpo().eval_sums(stage.model, spec, t, stage.frozen, b))(trainable, batch)
    evaluated = Dpo().eval_metrics({k: float(v) for k, v in sums.items()})
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
      assert abs(evaluated[f"eval_{key}"] - float(metrics[key])) <= 1e-5 * max(1.0, abs(float(metrics[key]))), key
  (want_m, want_g), (got_m, got_g) = results
  print(f"{case}: gradient relative error {rel(got_g, want_g):.2e}")
  assert np.abs(want_g).max() > 0 and rel(got_g, want_g) <= 1e-5
  assert set(got_m) == set(want_m)
  for key in want_m:
    assert abs(float(got_m[key]) - float(want_m[key])) <= 1e-5 * max(1.0, abs(float(want_m[key]))), (
        key, float(got_m[key]), float(want_m[key]))


@pytest.mark.slow
@pytest.mark.parametrize("objective", [{"dpo.objective": "orpo", "dpo.beta": 0.2},
                                       {"dpo.objective": "cpo", "dpo.loss_type": "simpo", "dpo.beta": 2.0,
                                        "dpo.cpo_alpha": 0.5}], ids=["orpo", "simpo"])
def test_packed_reference_free_losses_agree_across_meshes_and_accumulation(objective, demo_config, tiny_hf_dir,
                                                                            many_pairs_file, tmp_path):
  """Two packed steps of 4 rows (the epoch's first 8 of its 15): on one device in one micro-batch, and on a
  (1, 2, 2) mesh in two micro-batches of 2 rows (the NLL term's token mean is the step's, so accumulation is
  exact). Step 2's loss follows step 1's whole update: losses to 1e-5."""
  runs = {}
  for mesh, batch_size, accum in [("1x1x1", 4, 1), ("1x2x2", 2, 2)]:
    d, f, t = (int(x) for x in mesh.split("x"))
    workdir = str(tmp_path / mesh)
    c = dpo_config(demo_config, tiny_hf_dir, many_pairs_file, **{
        "data.packing": True, "mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t, "train.batch_size": batch_size,
        "train.grad_accum": accum, "train.steps": 2, **objective})
    T.train_and_evaluate(c, workdir)
    runs[mesh] = [m["loss"] for m in metrics_of(workdir)]
  assert len(runs["1x1x1"]) == 2 and runs["1x1x1"][0] != runs["1x1x1"][1]
  assert rel(runs["1x2x2"], runs["1x1x1"]) <= 1e-5, runs


def test_reference_free_step_runs_no_reference_forward(demo_config, tiny_hf_dir, pairs_file):
  """The compiler's FLOP count of the compiled step: DPO's exceeds CPO's and ORPO's by one forward pass of the
  batch (the reference's, adapters off), compiled on its own for comparison; unrolled layers, one micro-batch."""
  flops, stage = {}, None
  batch = {k: jax.ShapeDtypeStruct((1, 16, 32), np.int32) for k in STEP.BATCH_KEYS}
  for objective in ("dpo", "cpo", "orpo"):
    c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"mesh.data": 1, "model.scan_layers": False,
                                                            "dpo.objective": objective})
    assert Dpo().reference_forward(C.freeze(c)) == (objective == "dpo")
    stage = ST.build_stage(c, W.base_model_path(C.freeze(c)))
    step = STEP.compile_step(stage, make_optimizer(c.train, 3)[0], S.batch_sharding(stage.mesh, 3, leading=1))
    flops[objective] = _flops(step.lower(stage.state, stage.frozen, batch, jax.random.key(0)).compile())
  one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batch.items()}
  forward = S.in_mesh(stage.mesh, jax.jit(lambda params, frozen, b: token_stats(
      stage.model, params, frozen, b, None, stage.step_spec, adapters_enabled=False, deterministic=True)))
  reference = _flops(forward.lower(stage.state["params"], stage.frozen, one).compile())
  print(f"flops: {flops}, one reference forward {reference:.4g}")
  for objective in ("cpo", "orpo"):
    saved = flops["dpo"] - flops[objective]
    assert 0.9 * reference <= saved <= 1.1 * reference, (objective, saved / reference)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


# ----------------------------------------------------------------------------------------------
# Refusals


REFUSALS = [  # (dpo.* overrides, the field the one error line names)
    ({"objective": "kto"}, "dpo.objective"),
    ({"objective": "cpo", "loss_type": "robust"}, "dpo.loss_type"),
    ({"objective": "cpo", "loss_type": "sigmoid,hinge"}, "dpo.loss_type"),
    ({"objective": "cpo", "loss_weights": "1"}, "dpo.loss_weights"),
    ({"objective": "orpo", "loss_type": "sigmoid,sft"}, "dpo.loss_type"),
    ({"objective": "cpo", "sft_weight": 0.5}, "dpo.sft_weight"),
    ({"objective": "orpo", "sft_weight": 0.5}, "dpo.sft_weight"),
    ({"objective": "cpo", "reference": "precomputed"}, "dpo.reference"),
    ({"objective": "orpo", "reference": "precomputed"}, "dpo.reference"),
    ({"objective": "cpo", "loss_type": "hinge", "label_smoothing": 0.1}, "dpo.label_smoothing"),
    ({"objective": "cpo", "loss_type": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing"),
    ({"objective": "cpo", "label_smoothing": 0.5}, "dpo.label_smoothing"),
    ({"objective": "orpo", "label_smoothing": 0.1}, "dpo.label_smoothing"),
    ({"objective": "cpo", "loss_type": "ipo", "simpo_gamma": 1.0}, "dpo.simpo_gamma"),
    ({"objective": "cpo", "alpha": float("nan")}, "dpo.alpha"),
    ({"objective": "cpo", "loss_type": "alphapo", "cpo_alpha": 0.5}, "dpo.cpo_alpha"),
    ({"objective": "cpo", "ld_alpha": 0.5}, "dpo.ld_alpha"),
    ({"objective": "orpo", "ld_alpha": 0.5}, "dpo.ld_alpha"),
    ({"objective": "orpo", "cpo_alpha": 0.5}, "dpo.cpo_alpha"),
    ({"objective": "orpo", "alpha": 0.5}, "dpo.alpha"),
    ({"cpo_alpha": 0.5}, "dpo.cpo_alpha"), ({"simpo_gamma": 1.0}, "dpo.simpo_gamma"),
    ({"ld_alpha": 1.5}, "dpo.ld_alpha"), ({"ld_alpha": -0.1}, "dpo.ld_alpha")]


@pytest.mark.parametrize("overrides,field", REFUSALS)
def test_refusals_are_one_line_naming_the_field(overrides, field, demo_config):
  c = C.freeze(demo_config("dpo"))
  c = C.replace(c, **{f"dpo.{k}": v for k, v in overrides.items()})
  with pytest.raises(UserError) as e:
    C.validate(c)
    Dpo().check(c)
  message = str(e.value)
  assert message.startswith(f"config field '{field}'=") and "\n" not in message, message


def test_offered_options_pass_the_checks(demo_config):
  c = C.freeze(demo_config("dpo"))
  for overrides in ({"objective": "orpo", "beta": 0.25}, {"objective": "cpo", "loss_type": "alphapo", "alpha": 0.25},
                    {"objective": "cpo", "loss_type": "alphapo", "cpo_alpha": 0.0},
                    {"objective": "cpo", "loss_type": "simpo", "simpo_gamma": 1.0, "label_smoothing": 0.1},
                    {"objective": "cpo", "loss_type": "hinge", "cpo_alpha": 0.0}, {"ld_alpha": 0.0},
                    {"ld_alpha": 0.5, "reference": "precomputed"}):
    overridden = C.replace(c, **{f"dpo.{k}": v for k, v in overrides.items()})
    C.validate(overridden)
    Dpo().check(overridden)
