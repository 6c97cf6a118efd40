"""The DPO stage against TRL 1.16's DPOTrainer, and its invariances (step 0, meshes, reference modes)."""

import json
import math
import os

import jax
import numpy as np
import pytest

from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train import loop as T
from anita_jax.train import state as ST
from anita_jax.train import step as STEP
from anita_jax.train import publish
from anita_jax.train import workdir as W
from anita_jax.train.optim import make_optimizer

ROWS = [
    ("Qual è la capitale della Francia?", "La capitale della Francia è Parigi.", "La capitale della Francia è Lione."),
    ("Come si dice 'cat' in italiano?", "Si dice 'gatto'.", "It is 'cat'."),
    ("Quanto fa 7 per 8?", "7 per 8 fa 56.", "7 per 8 fa 54, credo."),
    ("Dove si trova il Colosseo?", "Il Colosseo si trova a Roma, nel centro storico.", "Non lo so."),
    ("Chi ha scritto la Divina Commedia?", "L'ha scritta Dante Alighieri.", "Dante Alighieri wrote it."),
    ("Qual è il fiume più lungo d'Italia?", "Il Po, lungo circa 652 chilometri.", "Il Tevere."),
    ("Di che colore è il cielo sereno?", "Azzurro.", "Verde, di solito."),
    ("Cosa si mangia a Napoli?", "La pizza napoletana, tra le altre cose.", "Pizza, mostly."),
]


def write_pairs(path, rows) -> str:
  """Conversational preference rows (prompt, chosen, rejected) as a JSONL file."""
  with open(path, "w", encoding="utf-8") as f:
    for prompt, chosen, rejected in rows:
      f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": rejected}]}, ensure_ascii=False) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  return write_pairs(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", ROWS)


def dpo_config(demo_config, model_dir, data, **overrides):
  c = demo_config("dpo")
  c.model.path = model_dir
  c.quant.type = "nf4"
  c.data.train, c.data.eval = data, ""
  c.data.max_length, c.data.max_prompt_length = 128, None
  c.data.packing = False  # the padded [2B, T] layout, as TRL's (packed pairs: tests/test_dpo_packing.py)
  c.train.batch_size, c.train.steps, c.train.log_every = 8, 3, 1
  c.train.warmup_ratio, c.train.warmup_steps, c.train.lr = 0.0, 0, 1e-3
  c.checkpoint.every = 1000
  c.update_from_flattened_dict(overrides)
  return c


def metrics_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_first_batch_matches_trl(demo_config, tiny_hf_dir, pairs_file, tmp_path):
  import datasets
  import torch
  import transformers
  import trl
  c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"quant.type": "none", "train.steps": 1,
                                                          "mesh.data": 1})
  T.train_and_evaluate(c, str(tmp_path / "ours"))
  ours = metrics_of(str(tmp_path / "ours"))[0]

  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  rows = [json.loads(line) for line in open(pairs_file, encoding="utf-8")]
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=1,
                       logging_steps=1, report_to=[], use_cpu=True, max_length=128, beta=0.1, learning_rate=1e-3,
                       loss_type=["sigmoid"], save_strategy="no", seed=0, bf16=False)  # fp32, as ours
  trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer)
  trainer.train()
  theirs = next(h for h in trainer.state.log_history if "logps/chosen" in h)
  for key in ("logps/chosen", "logps/rejected"):
    assert rel(ours[key], theirs[key]) <= 1e-4, (key, ours[key], theirs[key])
  assert abs(ours["loss"] - theirs["loss"]) <= 1e-4
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(ours[key] - theirs[key]) <= 1e-5, key
  assert rel(ours["logits/chosen"], theirs["logits/chosen"]) <= 1e-4


def test_step_zero_loss_is_log2_with_zero_rewards(demo_config, tiny_hf_dir, pairs_file, tmp_path):
  T.train_and_evaluate(dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"train.steps": 1}), str(tmp_path))
  first = metrics_of(str(tmp_path))[0]
  assert abs(first["loss"] - math.log(2)) <= 1e-6
  # Policy and reference are two separately compiled passes over the same weights (B = 0), so their
  # log-probs (about -1e2 here) agree to float32 rounding, not bit for bit.
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(first[key]) <= 1e-5, (key, first[key])


@pytest.mark.slow
def test_dpo_losses_agree_across_meshes_and_reference_modes(demo_config, tiny_hf_dir, pairs_file, tmp_path):
  runs = {}
  for mesh, reference in [("1x1x1", "base"), ("8x1x1", "base"), ("2x2x2", "base"), ("2x2x2", "precomputed")]:
    d, f, t = (int(x) for x in mesh.split("x"))
    c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t,
                                                            "dpo.reference": reference})
    workdir = str(tmp_path / f"{mesh}-{reference}")
    T.train_and_evaluate(c, workdir)
    runs[(mesh, reference)] = [m["loss"] for m in metrics_of(workdir)]
  reference = runs[("1x1x1", "base")]
  assert len(reference) == 3 and reference[2] < reference[0]
  for key, got in runs.items():
    assert rel(got, reference) <= 1e-5, (key, got, reference)
  assert os.path.isfile(tmp_path / "2x2x2-precomputed" / "reference_logps.npy")


def test_base_reference_holds_no_second_copy(demo_config, tiny_hf_dir, pairs_file):
  """The compiled step's arguments are the state, the frozen base once, and the batch; with the
  reference computed in the step, temporaries grow by activations only, never by a weight copy."""
  sizes = {}
  for reference in ("base", "precomputed"):
    c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"mesh.data": 1, "dpo.reference": reference})
    stage = ST.build_stage(c, W.base_model_path(C.freeze(c)))
    tx, _ = make_optimizer(c.train, 3)
    batch = {k: jax.ShapeDtypeStruct((1, 16, 32), np.int32)
             for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    if reference == "precomputed":
      batch["ref_logps"] = jax.ShapeDtypeStruct((1, 16), np.float32)
    step = STEP.compile_step(stage, tx, S.batch_sharding(stage.mesh, 3, leading=1) if reference == "base" else
                          {**{k: S.batch_sharding(stage.mesh, 3, leading=1) for k in batch if k != "ref_logps"},
                           "ref_logps": S.batch_sharding(stage.mesh, 2, leading=1)})
    compiled = step.lower(stage.state, stage.frozen, batch, jax.random.key(0)).compile()
    stats = compiled.memory_analysis()
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(stage.frozen))
    sizes[reference] = (stats.argument_size_in_bytes, stats.temp_size_in_bytes, frozen_bytes)
  base_args, base_temp, frozen_bytes = sizes["base"]
  pre_args, pre_temp, _ = sizes["precomputed"]
  assert base_args == pre_args - 16 * 4  # identical inputs but the precomputed log-probs
  # The in-step reference pass adds its activations (dominated by its [16, 32, V] fp32 logits), and
  # less than half a copy of the frozen weights on top of that: no second copy of the model.
  ref_logits = 16 * 32 * 49152 * 4
  print(f"temp: base {base_temp / 1e6:.1f} MB, precomputed {pre_temp / 1e6:.1f} MB, reference logits "
        f"{ref_logits / 1e6:.1f} MB, frozen weights {frozen_bytes / 1e6:.1f} MB")
  assert base_temp - pre_temp <= ref_logits + frozen_bytes / 2


def test_dpo_eval_scores_every_pair(demo_config, tiny_hf_dir, pairs_file, tmp_path):
  """5 eval pairs in eval batches of 4: the last batch is padded with empty pairs, which count nowhere.
  The logged eval metrics equal transformers' (float64) on the exported policy and the base."""
  import torch
  import transformers

  from anita_jax.data import preference
  from anita_jax.data import rows as D
  eval_file = tmp_path / "eval.jsonl"
  eval_file.write_text("".join(open(pairs_file, encoding="utf-8").readlines()[:5]), encoding="utf-8")
  c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{"quant.type": "none", "train.steps": 1,
                                                          "train.batch_size": 4, "data.eval": str(eval_file),
                                                          "mesh.data": 1, "train.lr": 2e-2})
  T.train_and_evaluate(c, str(tmp_path / "w"))
  ours = metrics_of(str(tmp_path / "w"))[-1]
  publish.export_hf(str(tmp_path / "w"), str(tmp_path / "hf"), dtype="float32", adapter=False)

  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  examples, _ = preference.encode_preferences(D.load_rows([str(eval_file)]), tokenizer, max_length=128)
  assert len(examples) == 5

  def logps(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    for ex in examples:
      pair = []
      for completion in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.tensor(np.concatenate([ex.prompt_ids, completion])[None], dtype=torch.long)
        with torch.no_grad():
          logp = torch.log_softmax(model(ids).logits[0], -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        pair.append(float(logp[len(ex.prompt_ids) - 1:].sum()))
      out.append(pair)
    return np.asarray(out)

  policy, ref = logps(str(tmp_path / "hf")), logps(tiny_hf_dir)
  margin = 0.1 * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
  want = {"eval_loss": float(np.mean(np.logaddexp(0.0, -margin))),
          "eval_rewards/margins": float(np.mean(margin)), "eval_rewards/accuracies": float(np.mean(margin > 0))}
  assert abs(want["eval_rewards/margins"]) > 1e-3  # trained: the policy has moved from the reference
  for key, value in want.items():
    assert abs(ours[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, ours[key], value)
