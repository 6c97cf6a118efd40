"""Packed DPO pairs ([prompt][chosen][rejected], the prompt computed once) against the padded layout, TRL 1.16's
DPOTrainer, and across meshes and reference modes."""

import dataclasses
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dpo import ROWS, dpo_config, metrics_of, pairs_file, rel  # noqa: F401 - pairs_file is a fixture

from anita_jax.data import batching
from anita_jax.data import preference as PR
from anita_jax.errors import UserError
from anita_jax.model import losses
from anita_jax.train import config as C
from anita_jax.train import loop as T
from anita_jax.train import state as ST
from anita_jax.train import workdir as W
from anita_jax.train.dpo import Dpo
from anita_jax.train.objective import token_stats

SYSTEM = {"role": "system", "content": "Rispondi in italiano, in modo breve."}
CHAT = [
    # a system prompt; the rejected completion is longer than the chosen one
    ([SYSTEM, {"role": "user", "content": "Qual è la capitale d'Italia?"}], "Roma.",
     "La capitale d'Italia, per quanto ne so, dovrebbe essere Milano, ma non ne sono sicuro."),
    # a multi-turn prompt
    ([{"role": "user", "content": "Ciao!"}, {"role": "assistant", "content": "Ciao, come posso aiutarti?"},
      {"role": "user", "content": "Quanto fa 2 + 2?"}], "Fa 4.", "Fa 5."),
    ([{"role": "user", "content": "Nomina un fiume italiano."}], "Il Po, il più lungo d'Italia.", "Il Nilo."),
    ([SYSTEM, {"role": "user", "content": "Di che colore è il cielo?"},
      {"role": "assistant", "content": "Di giorno?"}, {"role": "user", "content": "Sì."}],
     "Azzurro, quando è sereno.", "Verde."),
]


def _examples(tokenizer, max_length=128):
  out = []
  for prompt, chosen, rejected in CHAT:
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": rejected}]}
    out.append(PR.encode_preference(row, tokenizer, max_length=max_length))
  # completions of one token, and a pair whose chosen has one token and rejected many
  one = out[2]
  out.append(PR.PreferenceExample(one.prompt_ids, one.chosen_ids[:1], one.rejected_ids[:1]))
  out.append(PR.PreferenceExample(out[1].prompt_ids, out[1].chosen_ids[:1], out[0].rejected_ids))
  return out


def _stage(demo_config, tiny_hf_dir, **overrides):
  c = demo_config("dpo")
  c.model.path, c.quant.type, c.mesh.data = tiny_hf_dir, "none", 1
  c.data.max_length, c.data.max_prompt_length = 128, None
  c.update_from_flattened_dict(overrides)
  stage = ST.build_stage(c, W.base_model_path(C.freeze(c)))
  # B != 0, so the policy differs from the reference and every adapter has a gradient
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype) if "lora_b" in str(path[-1]) else x,
      stage.state["params"])
  return stage, trainable


def _layouts(examples):
  """(padded batch, packed batch, groups): the same pairs; packed row 0 filled exactly, the others padded."""
  groups = [[0, 2, 4], [1, 5], [3]]
  row_length = sum(PR.pair_length(examples[i]) for i in groups[0])
  assert all(PR.pair_length(examples[i]) <= row_length for g in groups for i in g)
  padded_length = max(len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) for ex in examples)
  padded = PR.build_batch(examples, list(range(len(examples))), 0, 2 * len(examples), padded_length)
  return padded, PR.build_packed_batch(examples, groups, row_length), groups


def test_packed_layout(demo_config, tiny_hf_dir):
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  examples = _examples(tokenizer)
  _, packed, groups = _layouts(examples)
  assert (packed["segment_ids"][0] > 0).all()  # row 0 is filled exactly
  for r, group in enumerate(groups):
    o = 0
    for segment, i in enumerate(group, 1):
      ex = examples[i]
      p, c, n = len(ex.prompt_ids), len(ex.chosen_ids), PR.pair_length(ex)
      row = {k: v[r, o:o + n] for k, v in packed.items()}
      assert (row["segment_ids"] == segment).all()
      np.testing.assert_array_equal(row["branch_ids"], [0] * p + [1] * c + [2] * (n - p - c))
      np.testing.assert_array_equal(row["positions"], list(range(p + c)) + list(range(p, n - c)))
      np.testing.assert_array_equal(row["loss_mask"], [0] * p + [1] * (n - p))
      want_prev = np.arange(o - 1, o + n - 1)
      want_prev[p + c] = o + p - 1  # the rejected completion's first token: predicted by the prompt's last
      np.testing.assert_array_equal(row["prev_index"], np.maximum(want_prev, 0))
      o += n


def test_first_fit_packer():
  rng = random.Random(0)
  for _ in range(100):
    lengths = [rng.randint(0, 12) for _ in range(rng.randint(1, 40))]
    cap = rng.choice([None, 1, 3])
    rows, used = [], []
    for i, n in enumerate(lengths):
      r = next((r for r in range(len(rows)) if used[r] + n <= 12 and (cap is None or len(rows[r]) < cap)), None)
      if r is None:
        rows.append([]), used.append(0)
        r = len(rows) - 1
      rows[r].append(i)
      used[r] += n
    assert batching.pack_first_fit(lengths, 12, cap) == rows


def test_packed_epoch_holds_every_pair_once_in_the_objectives_shape(demo_config):
  rng = np.random.RandomState(0)
  ids = lambda n: rng.randint(3, 100, n).astype(np.int32)  # noqa: E731
  examples = [PR.PreferenceExample(ids(rng.randint(1, 9)), ids(rng.randint(1, 9)), ids(rng.randint(0, 9)))
              for _ in range(40)]
  c = demo_config("dpo")
  c.data.max_length, c.data.packing, c.train.batch_size = 16, True, 2
  it = PR.PreferenceBatchIterator(examples, batch_size=2, max_length=16, packing=True)
  seen = []
  for _ in range(it.steps_in_epoch(0)):
    batch = next(it)
    assert batch["input_ids"].shape == Dpo().batch_shape(C.freeze(c)) == (2, 32)
    for row in batch["segment_ids"]:
      seen.append(int(row.max()))
  groups = it.groups(0)
  assert sorted(i for g in groups for i in g) == list(range(40))  # each pair once, none split
  assert sum(seen) == sum(len(g) for g in groups[:2 * it.steps_in_epoch(0)])
  assert all(sum(PR.pair_length(examples[i]) for i in g) <= 32 for g in groups)


def _pair_values(stage, trainable, packed, groups, **kwargs):
  stats = token_stats(stage.model, trainable, stage.frozen, packed, None, stage.step_spec,
                      prev_index=packed["prev_index"], **kwargs)
  slots = PR.max_pairs_per_row(packed["input_ids"].shape[-1])
  sums = losses.pair_completion_stats(*stats, packed, slots)
  order = [r * slots + k for r, group in enumerate(groups) for k, _ in enumerate(group)]
  pairs = [i for group in groups for i in group]
  out = {}
  for k, v in sums.items():
    out[k] = np.empty_like(np.asarray(v)[order])
    out[k][pairs] = np.asarray(v)[order]
  assert int(np.sum(np.asarray(sums["present"]))) == len(pairs)
  return out


def test_packed_logps_and_gradients_equal_padded(demo_config, tiny_hf_dir):
  stage, trainable = _stage(demo_config, tiny_hf_dir)
  examples = _examples(stage.tokenizer)
  padded, packed, groups = _layouts(examples)
  n = len(examples)
  for adapters in (True, False):  # the policy and the reference
    stats = token_stats(stage.model, trainable, stage.frozen, padded, None, stage.step_spec,
                        adapters_enabled=adapters)
    logps, ntok, mean_logit = (np.asarray(x) for x in losses.completion_stats(*stats, padded["loss_mask"]))
    got = _pair_values(stage, trainable, packed, groups, adapters_enabled=adapters)
    want = logps.reshape(2, n).T
    print(f"adapters {adapters}: logps relative error {rel(got['logps'], want):.2e}")
    assert rel(got["logps"], want) <= 1e-5, (got["logps"], want)
    np.testing.assert_array_equal(got["tokens"], ntok.reshape(2, n).T)
    if adapters:  # the test can fail: without the branch mask the rejected completions see the chosen ones
      slots = PR.max_pairs_per_row(packed["input_ids"].shape[-1])
      rejected = []
      for model_batch in (packed, {**packed, "branch_ids": np.zeros_like(packed["branch_ids"])}):
        stats = token_stats(stage.model, trainable, stage.frozen, model_batch, None, stage.step_spec,
                            prev_index=packed["prev_index"])
        rejected.append(np.asarray(losses.pair_completion_stats(*stats, packed, slots)["logps"][:, 1]))
      assert rel(rejected[1], rejected[0]) > 1e-3
    assert rel(got["logit_sums"], (mean_logit * ntok).reshape(2, n).T) <= 1e-5

  obj = Dpo()
  for loss_type, sft_weight, smoothing, weights in (
      ("sigmoid", 0.5, 0.0, ""), ("ipo", 0.0, 0.0, ""), ("robust", 0.0, 0.1, ""), ("hinge", 0.0, 0.0, ""),
      ("sigmoid_norm", 0.0, 0.0, ""), ("nca_pair", 0.0, 0.0, ""), ("ipo,bco_pair,sft", 0.0, 0.0, "1,0.5,0.3")):
    spec = dataclasses.replace(stage.step_spec, grad_accum=1, loss_type=tuple(loss_type.split(",")),
                               loss_weights=tuple(w for w in weights.split(",") if w), sft_weight=sft_weight,
                               label_smoothing=smoothing)
    results = []
    for batch in (padded, packed):
      fn = jax.jit(jax.value_and_grad(lambda t, b, s=spec: obj.loss(stage.model, t, stage.frozen, b, None, s, None),
                                      has_aux=True))
      (_, metrics), grads = fn(trainable, {k: jnp.asarray(v) for k, v in batch.items()})
      results.append((metrics, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])))
    (want_m, want_g), (got_m, got_g) = results
    assert np.abs(want_g).max() > 0
    print(f"{loss_type}: gradient relative error {rel(got_g, want_g):.2e}, loss {float(got_m['loss']):.6f} vs "
          f"{float(want_m['loss']):.6f}")
    assert rel(got_g, want_g) <= 1e-5, (loss_type, rel(got_g, want_g))
    assert set(got_m) == set(want_m)
    for key in want_m:
      assert abs(float(got_m[key]) - float(want_m[key])) <= 1e-5 * max(1.0, abs(float(want_m[key]))), (
          loss_type, key, float(got_m[key]), float(want_m[key]))


def test_packed_eval_sums_ignore_padding_rows(demo_config, tiny_hf_dir):
  """Eval over `eval_batches` (the last batch filled up with empty rows): the same sums as the padded layout."""
  stage, trainable = _stage(demo_config, tiny_hf_dir, **{"dpo.sft_weight": 0.0})
  examples = _examples(stage.tokenizer)
  params = {**trainable}
  totals = []
  for packing in (False, True):
    it = PR.PreferenceBatchIterator(examples, batch_size=2, max_length=128, packing=packing)
    sums: dict = {}
    for batch in it.eval_batches():
      for k, v in Dpo().eval_sums(stage.model, stage.step_spec, params, stage.frozen, batch).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    totals.append(sums)
  padded, packed = totals
  assert padded["weight"] == packed["weight"] == len(examples)
  for key in padded:
    assert abs(packed[key] - padded[key]) <= 1e-5 * max(1.0, abs(padded[key])), (key, packed[key], padded[key])


def test_splash_attention_refuses_packed_pairs(demo_config):
  c = demo_config("dpo")
  c.data.packing, c.model.attention = True, "splash"
  with pytest.raises(UserError, match="model.attention"):
    Dpo().check(C.freeze(c))


def _packing_run(demo_config, tiny_hf_dir, data, workdir, **overrides):
  c = dpo_config(demo_config, tiny_hf_dir, data, **{"data.packing": True, **overrides})
  T.train_and_evaluate(c, workdir)
  return metrics_of(workdir)


@pytest.mark.slow
def test_packed_first_batch_matches_trl(demo_config, tiny_hf_dir, pairs_file, tmp_path):  # noqa: F811
  """All 8 pairs in one packed step against TRL's first batch of the same 8 pairs (padded, fp32), with the
  plain attention and with the flash kernel (Pallas interpret mode here)."""
  import datasets
  import torch
  import transformers
  import trl
  c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"quant.type": "none", "data.packing": True})
  it, _ = T.build_data(C.freeze(c), transformers.AutoTokenizer.from_pretrained(tiny_hf_dir), batch_size=1)
  rows = len(it.groups(0))
  assert rows < 8 and sum(len(g) for g in it.groups(0)) == 8  # several pairs share a row
  ours = {attention: _packing_run(demo_config, tiny_hf_dir, pairs_file, str(tmp_path / attention),
                                  **{"quant.type": "none", "train.steps": 1, "mesh.data": 1, "train.batch_size": rows,
                                     "model.attention": attention})[0]
          for attention in ("dot", "flash")}

  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  data = [json.loads(line) for line in open(pairs_file, encoding="utf-8")]
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=1,
                       logging_steps=1, report_to=[], use_cpu=True, max_length=128, beta=0.1, learning_rate=1e-3,
                       loss_type=["sigmoid"], save_strategy="no", seed=0, bf16=False)
  trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                           processing_class=tokenizer)
  trainer.train()
  theirs = next(h for h in trainer.state.log_history if "logps/chosen" in h)
  for attention, metrics in ours.items():
    for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
      assert rel(metrics[key], theirs[key]) <= 1e-4, (attention, key, metrics[key], theirs[key])
    assert abs(metrics["loss"] - theirs["loss"]) <= 1e-4, attention
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
      assert abs(metrics[key] - theirs[key]) <= 1e-5, (attention, key)


@pytest.fixture(scope="module")
def many_pairs_file(tmp_path_factory):
  """48 pairs: the 8 of test_dpo, each with 6 prompt variants (several steps of 8 packed rows)."""
  path = tmp_path_factory.mktemp("dpo_packed") / "pairs.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for k in range(6):
      for prompt, chosen, rejected in ROWS:
        prompt = prompt if k == 0 else f"{prompt} (domanda {k})"
        messages = [SYSTEM] if k % 2 else []
        f.write(json.dumps({"prompt": messages + [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": rejected}]}, ensure_ascii=False) + "\n")
  return str(path)


@pytest.mark.slow
def test_packed_losses_agree_across_meshes_and_reference_modes(demo_config, tiny_hf_dir, many_pairs_file, tmp_path):
  runs = {}
  for mesh, reference in [("1x1x1", "base"), ("1x8x1", "base"), ("2x2x2", "base"), ("2x2x2", "precomputed")]:
    d, f, t = (int(x) for x in mesh.split("x"))
    metrics = _packing_run(demo_config, tiny_hf_dir, many_pairs_file, str(tmp_path / f"{mesh}-{reference}"),
                           **{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t, "dpo.reference": reference,
                              "train.grad_accum": 2})
    runs[(mesh, reference)] = [m["loss"] for m in metrics]
  want = runs[("1x1x1", "base")]
  assert len(want) == 3 and want[2] < want[0]
  for key, got in runs.items():
    assert rel(got, want) <= 1e-5, (key, got, want)
  assert os.path.isfile(tmp_path / "2x2x2-precomputed" / "reference_logps.npy")
