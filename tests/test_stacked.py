"""Stacked stages (init_as=stacked): earlier adapters kept frozen on the first stage's quantized base.

Against transformers and PEFT: a stacked DPO stage starts exactly at the SFT model (its merged export in
transformers), and a three-stage workdir's folded PEFT adapter and merged export reproduce its logits.
"""

import json

import numpy as np
import pytest

from anita_jax.apps import commands
from anita_jax.data import preference
from anita_jax.data import rows as D
from anita_jax.train import loop as T
from anita_jax.train import publish
from anita_jax.train import workdir as W
from test_dpo import ROWS, metrics_of, rel, write_pairs

@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  return write_pairs(tmp_path_factory.mktemp("stacked") / "pairs.jsonl", ROWS[:4])  # one batch of 4 pairs


def stage(demo_config, name, model_dir, quant, **overrides):
  c = demo_config(name)
  c.model.path, c.quant.type = model_dir, quant
  c.data.eval, c.data.max_rows, c.data.max_length = "", 8, 128
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.lr = 4, 2, 1, 2e-2
  c.train.warmup_steps, c.train.warmup_ratio, c.train.eval_on_start = 0, 0.0, False
  c.lora.rank, c.lora.alpha, c.lora.rslora = 4, 8.0, False
  c.checkpoint.every, c.mesh.data = 1000, 1
  c.update_from_flattened_dict(overrides)
  return c


def transformers_pair_logps(model_dir, pairs_file):
  """Mean summed completion log-probs (chosen, rejected) of the pairs under transformers (fp32)."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  examples, _ = preference.encode_preferences(D.load_rows([pairs_file]), tokenizer, max_length=128)
  sums = {"chosen": [], "rejected": []}
  for ex in examples:
    for key in sums:
      ids = np.concatenate([ex.prompt_ids, getattr(ex, f"{key}_ids")])
      with torch.no_grad():
        logits = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
      logp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:, None])).squeeze(-1)
      sums[key].append(float(logp[len(ex.prompt_ids) - 1:].sum()))
  return np.mean(sums["chosen"]), np.mean(sums["rejected"])


def test_stacked_dpo_starts_at_the_sft_model(demo_config, tiny_hf_dir, pairs_file, tmp_path, capsys):
  sft = stage(demo_config, "sft", tiny_hf_dir, "nf4")
  T.train_and_evaluate(sft, str(tmp_path / "sft"))
  publish.export_hf(str(tmp_path / "sft"), str(tmp_path / "sft_hf"), dtype="float32", adapter=False)
  want = transformers_pair_logps(str(tmp_path / "sft_hf"), pairs_file)
  errors = {}
  for init_as in ("stacked", "merged"):
    dpo = stage(demo_config, "dpo", tiny_hf_dir, "nf4", **{"data.train": pairs_file, "train.steps": 1,
                                                           "data.packing": False,
                                                           "init_from": str(tmp_path / "sft"), "init_as": init_as})
    T.train_and_evaluate(dpo, str(tmp_path / f"dpo-{init_as}"))
    first = metrics_of(str(tmp_path / f"dpo-{init_as}"))[0]
    errors[init_as] = max(rel(first["logps/chosen"], want[0]), rel(first["logps/rejected"], want[1]))
    for key in ("rewards/chosen", "rewards/rejected"):
      assert abs(first[key]) <= 1e-5, (init_as, key, first[key])
  with capsys.disabled():
    print(f"\nstep-1 DPO logps vs transformers on the SFT model: stacked {errors['stacked']:.2e}, "
          f"merged (NF4 re-quantized) {errors['merged']:.2e} relative")
  assert errors["stacked"] <= 1e-5, errors
  assert errors["merged"] > errors["stacked"]  # re-quantizing the merged SFT model moves it


@pytest.mark.slow
def test_three_stacked_stages_export_as_one_peft_adapter(demo_config, tiny_hf_dir, pairs_file, tmp_path):
  import peft
  import torch
  import transformers
  previous = None
  for name, data in (("sft", None), ("dpo", pairs_file), ("lm", None)):
    c = stage(demo_config, name, tiny_hf_dir, "none", **({"data.train": data, "data.packing": False} if data else {}))
    if previous:
      c.init_from = previous
    T.train_and_evaluate(c, str(tmp_path / name))
    previous = str(tmp_path / name)
  publish.export_hf(previous, str(tmp_path / "hf"), dtype="float32")
  with open(tmp_path / "hf" / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["r"] == 12  # 4 + 4 + 4: one adapter, the three stages' ranks stacked

  net, params, _, _ = W.load_model(previous, scan_layers=False)
  tokens = np.random.RandomState(0).randint(3, 49152, (2, 24)).astype(np.int32)
  ours = np.asarray(net.apply({"params": params}, tokens)[0], np.float64)
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  with torch.no_grad():
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "hf" / "adapter")).eval()
    theirs = with_adapter(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    theirs_merged = merged(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()
  assert rel(ours, theirs) <= 1e-5
  assert rel(ours, theirs_merged) <= 1e-5
  assert net.lora.frozen_rank == 8  # the workdir's model holds the sft and dpo adapters, frozen
  # scripts/check_export.py's comparison (a chat prompt through the export's tokenizer) agrees
  checked = commands.check_export(previous, str(tmp_path / "hf"), dtype="float32")
  assert checked["relative"] <= 1e-5 and checked["argmax_agreement"] == 1.0, checked


def test_merge_into_original_is_the_original_plus_the_adapter_in_peft(demo_config, tiny_hf_dir, tmp_path):
  """`merge_into=original`: the trained adapter merged into the original (unquantized) base, read one matrix at a
  time from its safetensors; equal to PEFT's merge_and_unload of the exported adapter on that base."""
  import os

  import peft
  import torch
  import transformers
  from safetensors.numpy import load_file
  T.train_and_evaluate(stage(demo_config, "sft", tiny_hf_dir, "nf4"), str(tmp_path / "sft"))
  publish.export_hf(str(tmp_path / "sft"), str(tmp_path / "hf"), dtype="float32", merge_into="original")
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "hf" / "adapter")).merge_and_unload().state_dict()
  ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
  original = load_file(os.path.join(tiny_hf_dir, "model.safetensors"))
  assert sorted(ours) == sorted(k for k in theirs if k != "lm_head.weight")  # tied embeddings
  moved = set()
  for name, value in ours.items():
    want = theirs[name].numpy()
    np.testing.assert_allclose(value, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=name)
    if not np.array_equal(value, original[name]):
      moved.add(name)
  assert len(moved) == 2 * 7 and all(name.endswith("_proj.weight") for name in moved)  # not the NF4 base
