"""dpo.reference_model (TRL's ref_model): our first DPO steps against TRL 1.16's DPOTrainer given a reference
model other than the policy, for every per-pair loss type we offer; its refusals, and its cache."""

import collections
import dataclasses
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from anita_jax.data.preference import PreferenceExample
from anita_jax.errors import UserError
from anita_jax.model import losses
from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train import dpo
from anita_jax.train import loop as T
from anita_jax.train import resume as R
from anita_jax.train import state as ST
from anita_jax.train import workdir as W
from anita_jax.train.data import build_data, load_source
from test_dpo import dpo_config, metrics_of, pairs_file  # noqa: F401 - pairs_file is a fixture

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def write_model(source_dir, out, noise: float, seed: int) -> str:
  """source_dir's model with N(0, noise^2) added to every weight (seeded), written with safetensors beside
  source_dir's tokenizer."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(noise * torch.randn(p.shape, generator=generator))
  model.save_pretrained(out, safe_serialization=True)
  transformers.AutoTokenizer.from_pretrained(source_dir).save_pretrained(out)
  return str(out)


@pytest.fixture(scope="module")
def reference_dir(tiny_hf_dir, tmp_path_factory):
  """The tiny policy's weights perturbed: another model with the policy's tokenizer."""
  return write_model(tiny_hf_dir, tmp_path_factory.mktemp("reference"), noise=0.05, seed=1)


def reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir, **overrides):
  return dpo_config(demo_config, tiny_hf_dir, pairs_file, **{
      "quant.type": "none", "train.steps": 1, "mesh.data": 1, "dpo.reference": "precomputed",
      "dpo.reference_model": reference_dir, **overrides})


def trl_trainer(tiny_hf_dir, reference_dir, pairs_file, out, c):
  """TRL's DPOTrainer on the same rows: the fp32 policy in full (step 1 is B = 0 for our LoRA) and the
  reference model as its ref_model."""
  import datasets
  import torch
  import transformers
  import trl
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
  rows = [json.loads(line) for line in open(pairs_file, encoding="utf-8")]
  args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=c.train.batch_size, max_steps=1,
                       logging_steps=1, report_to=[], use_cpu=True, max_length=c.data.max_length, beta=c.dpo.beta,
                       learning_rate=c.train.lr, loss_type=["sigmoid"], save_strategy="no", seed=0, bf16=False)
  return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=transformers.AutoTokenizer.from_pretrained(tiny_hf_dir))


def assert_metrics_match(ours, theirs, where):
  """Log-probs and mean logits (about -1e2 and 1) to 1e-5 relative; the loss and the rewards (beta times a
  difference of log-probs) to 1e-5 absolute, or relative where the loss exceeds 1 (sppo_hard's is about 1e2)."""
  print(where, {key: f"{ours[key] - theirs[key]:.1e}" for key in METRICS})
  for key in METRICS:
    scale = abs(theirs[key]) if key.startswith(("logps/", "logits/")) else max(1.0, abs(theirs[key]))
    assert abs(ours[key] - theirs[key]) <= 1e-5 * scale, (where, key, ours[key], theirs[key])


@pytest.mark.slow
def test_first_step_matches_trl_with_a_reference_model(demo_config, tiny_hf_dir, pairs_file, reference_dir,
                                                       tmp_path):
  trainer = trl_trainer(tiny_hf_dir, reference_dir, pairs_file, tmp_path / "trl",
                        C.freeze(reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir)))
  trainer.train()
  theirs = next(h for h in trainer.state.log_history if "rewards/margins" in h)
  assert abs(theirs["rewards/margins"]) > 1e-2, theirs  # the reference is not the policy: margins at step 1
  # Padded on a (data, fsdp, tensor) = (2, 2, 2) mesh: the reference model sharded as a base would be. Packed
  # pairs read the same precomputed [N, 2] reference; the 8 pairs pack into 2 rows: one step.
  for packing, rows, mesh in ((False, 8, (2, 2, 2)), (True, 2, (1, 1, 1))):
    c = reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir, **{
        "data.packing": packing, "train.batch_size": rows, "mesh.data": mesh[0], "mesh.fsdp": mesh[1],
        "mesh.tensor": mesh[2]})
    workdir = str(tmp_path / f"ours-{packing}")
    T.train_and_evaluate(c, workdir)
    assert os.path.isfile(os.path.join(workdir, dpo.REFERENCE_FILE))
    assert_metrics_match(metrics_of(workdir)[0], theirs, f"packing={packing}, mesh={mesh}")


# Every per-pair DPO loss type TRL 1.16 offers and we offer (aot and aot_unpaired are refused here), two
# weighted lists (one with TRL's SFT term) and LD-DPO (policy and reference log-probs): the dpo.* fields changed.
LOSS_SETTINGS = [{"loss_type": t, "label_smoothing": {"robust": 0.1, "exo_pair": 0.1}.get(t, 0.0)}
                 for t in losses.DPO_LOSS_TYPES] + [
    {"loss_type": "sigmoid,ipo,hinge", "loss_weights": "1.0,0.3,0.5"},
    {"loss_type": "bco_pair,sft", "loss_weights": "1.0,0.5"},
    {"loss_type": "sigmoid", "ld_alpha": 0.5}]


def our_first_batch(stage, workdir, settings: dict) -> dict:
  """Our step-1 loss and metrics under these dpo.* settings, from the stage built once: its first batch with
  the reference log-probs the loop gives it (WORKDIR/reference_logps.npy, recomputed for another ld_alpha)."""
  c = C.replace(stage.config, **{f"dpo.{k}": v for k, v in settings.items()})
  C.validate(c)
  stage = dataclasses.replace(stage, config=c, step_spec=ST.step_spec(c, stage.model_config, stage.mesh))
  it, _ = build_data(c, stage.tokenizer, num_processes=1, process_index=0, rows=load_source(c, "train"))
  obj = dpo.Dpo()
  local = obj.next_batch(it, obj.prepare(stage, it, workdir))
  batch = {k: S.place(v, S.batch_sharding(stage.mesh, v.ndim)) for k, v in local.items()}
  _, metrics = obj.loss(stage.model, stage.state["params"], stage.frozen, batch, None, stage.step_spec, None)
  return {k: float(v) for k, v in metrics.items()}


def trl_first_batch(trainer, batch, settings: dict, references: dict) -> dict:
  """TRL's loss and metrics of its first batch under these settings, set on the attributes its `_compute_loss`
  reads; the reference log-probs from its ref_model as `precompute_ref_log_probs` gets them (`references`:
  those already computed, by ld_alpha)."""
  import torch
  trainer.loss_types = settings["loss_type"].split(",")
  weights = settings.get("loss_weights")
  trainer.loss_weights = [float(w) for w in weights.split(",")] if weights else [1.0] * len(trainer.loss_types)
  trainer.label_smoothing = settings.get("label_smoothing", 0.0)
  ld_alpha = settings.get("ld_alpha")  # TRL's None: every token alike (our 1.0)
  trainer.ld_alpha = ld_alpha
  if ld_alpha not in references:
    references[ld_alpha] = trainer.compute_ref_log_probs(trainer.ref_model, batch)
  chosen, rejected = references[ld_alpha]
  trainer.precompute_ref_logps = True
  trainer._metrics = {mode: collections.defaultdict(list) for mode in ("train", "eval")}
  with torch.no_grad():
    loss = trainer.compute_loss(trainer.model, {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
  mode = "train" if trainer.model.training else "eval"
  return {"loss": float(loss), **{k: v[-1] for k, v in trainer._metrics[mode].items()}}


@pytest.mark.slow
def test_every_loss_type_matches_trl_with_a_reference_model(demo_config, tiny_hf_dir, pairs_file, reference_dir,
                                                            tmp_path):
  c = C.freeze(reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir))
  trainer = trl_trainer(tiny_hf_dir, reference_dir, pairs_file, tmp_path / "trl", c)
  batch = next(iter(trainer.get_train_dataloader()))  # all 8 pairs, as our first batch
  stage = ST.build_stage(c, W.base_model_path(c))
  references = {}
  for settings in LOSS_SETTINGS:
    ours = our_first_batch(stage, str(tmp_path), settings)
    assert_metrics_match(ours, trl_first_batch(trainer, batch, settings, references), settings)


def test_the_reference_model_is_dense_in_the_stage_dtype_and_freed(demo_config, tiny_hf_dir, pairs_file,
                                                                  reference_dir):
  """An NF4 policy in bfloat16: the reference model is loaded dense in bfloat16 (its weights as stored, rounded),
  and nothing of it outlives the reference pass."""
  from safetensors.numpy import load_file
  c = C.freeze(reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir,
                                **{"quant.type": "nf4", "model.dtype": "bfloat16"}))
  stage = ST.build_stage(c, W.base_model_path(c))
  model, params = stage.reference_model()
  assert model.quant.type == "none" and model.lora is None
  stored = load_file(os.path.join(reference_dir, "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
  kernel = params["layers"]["mlp"]["down_proj"]["kernel"][1]  # [in, out]: HF's [out, in] transposed
  assert kernel.dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                stored.T.astype(jax.numpy.bfloat16).astype(np.float32))
  del model, params, kernel
  live = len(jax.live_arrays())
  it, _ = build_data(c, stage.tokenizer, num_processes=1, process_index=0, rows=load_source(c, "train"))
  ref = dpo.reference_logps(stage, it.examples, c.train.batch_size, c.data.max_length, it.pad_id)
  assert ref.shape == (len(it.examples), 2) and np.all(ref < 0)
  assert len(jax.live_arrays()) == live


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the field, before any weight is read


def copy_model(source_dir, out, edit_config=None, swap_tokens=None) -> str:
  """A copy of source_dir with config.json edited, or two ids of its tokenizer's vocabulary swapped."""
  shutil.copytree(source_dir, out)
  for name, edit in (("config.json", edit_config), ("tokenizer.json", swap_tokens)):
    if edit is not None:
      with open(os.path.join(out, name), encoding="utf-8") as f:
        data = json.load(f)
      edit(data)
      with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(data, f)
  return str(out)


def swap_ids(tokenizer_json, a=1000, b=1001):
  """The tokens of ids a and b trade ids: the same size, another vocabulary."""
  vocab = tokenizer_json["model"]["vocab"]
  token_a, token_b = (next(t for t, i in vocab.items() if i == x) for x in (a, b))
  vocab[token_a], vocab[token_b] = b, a


def test_refusals_are_one_line_naming_the_field(demo_config, tiny_hf_dir, pairs_file, reference_dir, tmp_path,
                                                monkeypatch):
  def load_weights(*args, **kwargs):
    raise AssertionError("a weight was read before the refusal")

  monkeypatch.setattr(ST.loading, "load_weights", load_weights)
  field = "config field 'dpo.reference_model'="
  bigger_vocab = copy_model(tiny_hf_dir, tmp_path / "vocab", edit_config=lambda c: c.update(vocab_size=49280))
  other_ids = copy_model(tiny_hf_dir, tmp_path / "ids", swap_tokens=swap_ids)
  cases = [
      ({"dpo.reference": "base"}, r"needs dpo.reference=precomputed .*no second model is ever held in the step"),
      ({"dpo.objective": "cpo"}, r"dpo.objective=cpo is reference-free"),
      ({"dpo.objective": "orpo"}, r"dpo.objective=orpo is reference-free"),
      ({"data.eval": pairs_file}, r"the eval pass scores its pairs against the base"),
      ({"dpo.reference_model": str(tmp_path / "missing")}, r"no such file or directory"),
      ({"dpo.reference_model": bigger_vocab}, r"its vocab_size is 49280, the policy's 49152"),
      ({"dpo.reference_model": other_ids}, r"its tokenizer's vocabulary is not the policy's .*at id 1000\)"),
  ]
  for overrides, message in cases:
    c = reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir, **overrides)
    with pytest.raises(UserError, match=f"^{field}.*{message}") as error:
      T.train_and_evaluate(c, str(tmp_path / "w"))
    assert "\n" not in str(error.value), str(error.value)


def test_a_resumed_run_refuses_another_reference_model(demo_config, tiny_hf_dir, pairs_file, reference_dir,
                                                       tmp_path):
  c = C.freeze(reference_config(demo_config, tiny_hf_dir, pairs_file, reference_dir))
  R.record(c, str(tmp_path), {})
  os.makedirs(tmp_path / "checkpoints")
  other = C.replace(c, **{"dpo.reference_model": tiny_hf_dir})
  with pytest.raises(UserError, match=r"trained with dpo.reference_model=.*, not "):
    R.check(other, str(tmp_path), {})


# ----------------------------------------------------------------------------------------------
# The cache: WORKDIR/reference_logps.npy is reused for the same reference model's files only


def test_the_cache_is_keyed_by_the_reference_models_files(demo_config, tiny_hf_dir, pairs_file, reference_dir,
                                                          tmp_path, monkeypatch):
  calls = []

  def reference_logps(stage, examples, batch_size, max_length, pad_id):  # a new value on each computation
    calls.append(stage.config.dpo.reference_model)
    return np.full((len(examples), 2), -float(len(calls)), np.float32)

  monkeypatch.setattr(dpo, "reference_logps", reference_logps)
  it = types.SimpleNamespace(examples=[PreferenceExample(np.array([1]), np.array([2]), np.array([3]))], pad_id=0)
  own = copy_model(reference_dir, tmp_path / "reference")  # its files may be rewritten below
  c = C.freeze(reference_config(demo_config, tiny_hf_dir, pairs_file, own))
  stage = types.SimpleNamespace(config=c)
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)

  def reference(model_path):
    stage.config = C.replace(c, **{"dpo.reference_model": model_path})
    return float(dpo.cached_reference(stage, it, workdir)[0, 0])

  assert (reference(own), reference(own)) == (-1, -1)  # computed once, then read back by a second run
  assert reference(reference_dir) == -2  # another reference model
  assert reference(own) == -3
  weights = os.path.join(own, "model.safetensors")
  os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10 ** 9))  # rewritten
  assert (reference(own), reference(own)) == (-4, -4)
  stage.config = C.replace(c, **{"dpo.reference_model": ""})  # the base, adapters off
  assert float(dpo.cached_reference(stage, it, workdir)[0, 0]) == -5
  assert calls == [own, reference_dir, own, own, ""]
