"""Training stages against independent references: TRL's DPO + SFT loss, a float64 eval loss, gradient
accumulation against one big batch, and the placement of every weight on a 2x2x2 mesh."""

import json
import os

import jax
import numpy as np
import pytest

from anita_jax.model.config import PROJECTIONS
from anita_jax.train import config as C
from anita_jax.train import loop as T
from anita_jax.train import state as ST
from anita_jax.train import publish
from anita_jax.train import workdir as W
from test_dpo import dpo_config, metrics_of, pairs_file, rel  # noqa: F401 - pairs_file is a fixture

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def export_adapter(workdir, out):
  """OUT/adapter: the trained adapter as `scripts/export_hf.py --merged=false` writes it (PEFT files)."""
  publish.export_hf(workdir, out, merged=False, adapter=True)
  return os.path.join(out, "adapter")


def exported_adapter(workdir, out):
  """The tensors of `export_adapter`: {PEFT name: array}."""
  from safetensors.numpy import load_file
  return load_file(os.path.join(export_adapter(workdir, out), "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------
# DPO + SFT term against TRL 1.16


def peft_model_with_our_adapters(model_dir, c, adapters):
  """transformers' model in fp32 with a PEFT LoRA of the config's shape, A set to our initial A (B = 0)."""
  import peft
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  config = peft.LoraConfig(r=c.lora.rank, lora_alpha=c.lora.alpha, use_rslora=c.lora.rslora, lora_dropout=0.0,
                           target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
  model = peft.get_peft_model(model, config)
  layers = model.base_model.model.model.layers
  with torch.no_grad():
    for i, layer in enumerate(layers):
      for name in PROJECTIONS:
        module = getattr(getattr(layer, PARENT[name]), name)
        ours = adapters["layers"][PARENT[name]][name]
        assert not np.any(ours["lora_b"][i])
        module.lora_A["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(ours["lora_a"][i].T)))
  return model


@pytest.mark.slow
def test_dpo_with_sft_term_matches_trl(demo_config, tiny_hf_dir, pairs_file, tmp_path):  # noqa: F811
  import datasets
  import transformers
  import trl
  weight = 0.5
  c = dpo_config(demo_config, tiny_hf_dir, pairs_file, **{
      "quant.type": "none", "train.steps": 2, "mesh.data": 1, "dpo.sft_weight": weight, "train.weight_decay": 0.0,
      "train.schedule": "linear"})
  T.train_and_evaluate(c, str(tmp_path / "ours"))
  ours = metrics_of(str(tmp_path / "ours"))

  initial = jax.tree.map(np.asarray, ST.build_stage(c, W.base_model_path(C.freeze(c))).state["params"])
  model = peft_model_with_our_adapters(tiny_hf_dir, c, initial)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  rows = [json.loads(line) for line in open(pairs_file, encoding="utf-8")]
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=c.train.batch_size,
                       max_steps=2, logging_steps=1, report_to=[], use_cpu=True, max_length=c.data.max_length,
                       beta=c.dpo.beta, learning_rate=c.train.lr, lr_scheduler_type="linear", warmup_steps=0,
                       weight_decay=0.0, max_grad_norm=c.train.max_grad_norm, loss_type=["sigmoid", "sft"],
                       loss_weights=[1.0, weight], save_strategy="no", seed=0, bf16=False,
                       gradient_checkpointing=False)
  trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer)
  trainer.train()
  theirs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
  assert [m["step"] for m in ours] == [h["step"] for h in theirs] == [1, 2]
  # Step 1: the loss (DPO log 2 plus the weighted chosen NLL) and the gradient it gives the adapters.
  for key in ("loss", "grad_norm"):
    assert rel(ours[0][key], theirs[0][key]) <= 1e-5, (key, ours[0][key], theirs[0][key])
  # Step 2, after one AdamW update from that gradient: the DPO term is no longer log 2 (seen here: rewards
  # agree to 1e-5 relative, losses and log-probs to 1e-6).
  for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
    assert rel(ours[1][key], theirs[1][key]) <= 1e-4, (key, ours[1][key], theirs[1][key])
  assert ours[1]["learning_rate"] == pytest.approx(theirs[1]["learning_rate"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The SFT eval loss against float64


CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
        ("Ciao!", "Ciao, come posso aiutarti?"),
        ("Quanto fa 2 più 2?", "Fa 4."),
        ("Traduci 'dog' in italiano.", "Cane."),
        ("Qual è la capitale d'Italia?", "Roma è la capitale d'Italia."),
        ("Dimmi un colore.", "Blu."),
        ("Chi era Galileo?", "Un astronomo e fisico italiano."),
        ("Che giorno viene dopo lunedì?", "Martedì."),
        ("Scrivi un numero primo.", "Sette."),
        ("Come si chiama il mare a est dell'Italia?", "Adriatico."),
        ("Di che colore è la neve?", "Bianca."),
    ]]


def write_chats(path, chats):
  with open(path, "w", encoding="utf-8") as f:
    for chat in chats:
      f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
  return str(path)


def float64_eval_loss(model_dir, chats, adapter_dir=None):
  """Mean token NLL over every eval row's targets (all tokens but the first: data.mask=all), in float64
  with transformers (+ PEFT for a trained adapter)."""
  import torch
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
  if adapter_dir:
    import peft
    model = peft.PeftModel.from_pretrained(model, adapter_dir).double().eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for chat in chats:
      out = tokenizer.apply_chat_template(chat, tokenize=True)
      ids = torch.tensor([list(out["input_ids"] if hasattr(out, "keys") else out)])
      logits = model(input_ids=ids).logits[0, :-1]
      total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
      count += ids.shape[1] - 1
  return total / count


# 10 rows in eval batches of 4: the last batch is partial, and every row is still scored.
@pytest.mark.parametrize("num_eval", [8, 10])
def test_sft_eval_loss_equals_float64_reference(demo_config, tiny_hf_dir, tmp_path, num_eval):
  c = demo_config("sft")
  c.model.path, c.quant.type = tiny_hf_dir, "none"  # the very weights transformers reads
  c.data.train = write_chats(tmp_path / "train.jsonl", CHATS[:8])
  c.data.eval = write_chats(tmp_path / "eval.jsonl", CHATS[:num_eval])
  c.data.max_length, c.data.packing, c.data.truncation = 64, False, "truncate"
  c.train.batch_size, c.train.steps, c.train.log_every = 4, 3, 1
  c.train.lr, c.train.warmup_steps, c.train.schedule = 1e-2, 2, "linear"
  c.train.eval_on_start, c.train.eval_every = True, 0
  c.lora.rank, c.lora.alpha = 4, 8.0
  c.mesh.data = 4
  workdir = str(tmp_path / "w")
  T.train_and_evaluate(c, workdir)
  logged = {m["step"]: m for m in metrics_of(workdir)}

  before = float64_eval_loss(tiny_hf_dir, CHATS[:num_eval])
  assert rel(logged[0]["eval_loss"], before) <= 1e-5, (logged[0]["eval_loss"], before)
  after = float64_eval_loss(tiny_hf_dir, CHATS[:num_eval], export_adapter(workdir, str(tmp_path / "export")))
  assert after < before - 0.1  # the adapters moved: the final eval is not the untrained one
  assert rel(logged[3]["eval_loss"], after) <= 1e-5, (logged[3]["eval_loss"], after)
  # The logged learning rate of each step is the one its update applied: transformers' linear schedule
  # with 2 warmup steps over 3 steps gives 0, lr/2, lr (Trainer logs it before lr_scheduler.step()).
  assert [logged[s]["learning_rate"] for s in (1, 2, 3)] == pytest.approx([0.0, 5e-3, 1e-2], abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation against one big batch (DPO)


def test_dpo_grad_accum_equals_one_big_batch(demo_config, tiny_hf_dir, pairs_file, tmp_path):  # noqa: F811
  common = {"quant.type": "none", "train.steps": 3, "mesh.data": 2, "train.lr": 1e-2}
  big = dpo_config(demo_config, tiny_hf_dir, pairs_file, **common, **{"train.batch_size": 4})
  small = dpo_config(demo_config, tiny_hf_dir, pairs_file, **common, **{"train.batch_size": 2,
                                                                        "train.grad_accum": 2})
  T.train_and_evaluate(big, str(tmp_path / "big"))
  T.train_and_evaluate(small, str(tmp_path / "small"))
  want, got = metrics_of(str(tmp_path / "big")), metrics_of(str(tmp_path / "small"))
  assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3]
  assert want[2]["loss"] < want[0]["loss"]  # it trained
  # Pair means are the same over one batch of 4 or two of 2. The `logits/*` metrics are token-weighted
  # means within a micro-batch, averaged over micro-batches (as TRL logs them), so they are left out.
  keys = [k for k in want[0] if k.startswith(("rewards/", "logps/")) or k in ("loss", "grad_norm", "learning_rate")]
  assert {"loss", "grad_norm", "rewards/chosen", "rewards/accuracies", "logps/rejected"} <= set(keys)
  for key in keys:
    a, b = [m[key] for m in got], [m[key] for m in want]
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (key, a, b)
  small_adapter = exported_adapter(str(tmp_path / "small"), str(tmp_path / "small_export"))
  big_adapter = exported_adapter(str(tmp_path / "big"), str(tmp_path / "big_export"))
  assert small_adapter.keys() == big_adapter.keys()
  # Adam divides each update by the root of its second moment, so the fp32 summation order of near-zero
  # gradients moves a few adapter entries by a part of lr: 1.2e-4 relative measured on an AVX-512 host,
  # below 1e-4 on AVX2 ones. Averaging wrongly (a sum, one micro-batch dropped) is off by O(1).
  for name in big_adapter:
    assert rel(small_adapter[name], big_adapter[name]) <= 3e-4, name


# ----------------------------------------------------------------------------------------------
# Where each weight lives on a (data 2, fsdp 2, tensor 2) mesh


def _path(keys):
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def placements(tree):
  """{path: PartitionSpec as a tuple, one entry per dimension}."""
  out = {}
  for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = tuple(x.sharding.spec)
    out[_path(keys)] = spec + (None,) * (x.ndim - len(spec))
  return out


def expected_placements():
  """The tiny model (D 64, N*H 64, K*H 32, F 128, V 49152, L 2 scanned), LoRA rank 8, NF4 (blocks of 64 inputs,
  double quantization) on mesh (data 2, fsdp 2, tensor 2).

  The rules' intent: a weight's `embed` (D) axis over fsdp, its heads / mlp / vocab axis over tensor, the layer
  axis and norms replicated, the batch never on weights (data). NF4 codes [L, I/2, O] and block absmax
  [L, I/64, O] follow the weight's axes where they divide; the per-matrix scale [L, G] and offset [L] follow
  only the layer axis. LoRA A [L, in, R] takes the weight's input axis, B [L, R, out] its output axis, and the
  rank axis takes fsdp where the other did not (no factor is replicated over fsdp).
  """
  weight_axes = {"q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
                 "o_proj": ("tensor", "fsdp"), "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"),
                 "down_proj": ("tensor", "fsdp")}
  frozen = {"embed_tokens/embedding": ("tensor", "fsdp")}
  trainable = {"layers/input_layernorm/scale": (None, None), "layers/post_attention_layernorm/scale": (None, None),
               "norm/scale": (None,)}
  for name, (axis_in, axis_out) in weight_axes.items():
    node = f"layers/{PARENT[name]}/{name}"
    frozen[f"{node}/kernel/codes"] = (None, axis_in, axis_out)
    # One 64-input block per column where the input is D = 64: that axis (size 1) stays unsharded;
    # down_proj's F = 128 inputs make 2 blocks, split over tensor.
    frozen[f"{node}/kernel/absmax_q"] = (None, "tensor" if name == "down_proj" else None, axis_out)
    frozen[f"{node}/kernel/absmax_scale"] = (None, None)
    frozen[f"{node}/kernel/absmax_offset"] = (None,)
    trainable[f"{node}/lora_a"] = (None, axis_in, None if axis_in == "fsdp" else "fsdp")
    trainable[f"{node}/lora_b"] = (None, None if axis_out == "fsdp" else "fsdp", axis_out)
  return frozen, trainable


def test_every_weight_is_placed_as_the_rules_intend_on_a_2x2x2_mesh(demo_config, tiny_hf_dir):
  assert jax.device_count() == 8
  c = demo_config("sft")
  c.model.path = tiny_hf_dir
  c.quant.type, c.quant.block_size, c.quant.double_quant = "nf4", 64, True
  c.lora.rank = 8
  c.train.trainable = "lora,norms"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  stage = ST.build_stage(c, W.base_model_path(C.freeze(c)))
  assert dict(stage.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  frozen, trainable = expected_placements()
  assert placements(stage.frozen) == frozen
  assert placements(stage.state["params"]) == trainable
  # AdamW's moments live where their parameters do.
  moments = {"mu": {}, "nu": {}}
  for path, spec in placements(stage.state["opt_state"]).items():
    parts = path.split("/")
    if spec:  # not the step counts
      moment = next(m for m in moments if m in parts)
      moments[moment]["/".join(parts[parts.index(moment) + 1:])] = spec
  assert moments == {"mu": trainable, "nu": trainable}
  # The codes really are split: each device holds a quarter of q_proj's (fsdp x tensor), half of it twice
  # over data.
  codes = stage.frozen["layers"]["self_attn"]["q_proj"]["kernel"].codes
  assert codes.addressable_shards[0].data.shape == (2, 16, 32)
