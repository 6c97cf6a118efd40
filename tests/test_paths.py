"""Production paths against independent references: LoRA dropout (PEFT with the same mask), a trainable head
(torch autograd), the stacking refusals, the data preview (the tokenizer's own ids), the multi-host start-up
(the arguments jax.distributed.initialize gets) and the recipe's base row when a stage trains more than LoRA."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_lora import TIED, adapters_of, base_params, peft_model
from test_model import TINY, our_params, reference_model, rel_err

from anita_jax.errors import UserError
from anita_jax.model import lora
from anita_jax.model import tree as PT
from anita_jax.model import llama as M
from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train import objective
from anita_jax.train import state as ST
from anita_jax.train import step as STEP
from anita_jax.train import workdir as W
from anita_jax.train.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def sft_batch(tokens, seg):
  return {"input_ids": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.asarray(seg, jnp.int32),
          "segment_ids": jnp.asarray(seg, jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)}


# ----------------------------------------------------------------------------------------------
# LoRA dropout


class _SameMask(torch.nn.Module):
  """PEFT's `lora_dropout` replaced by inverted dropout with a given keep mask; records its input."""

  def __init__(self, kept: np.ndarray, p: float):
    super().__init__()
    self.kept, self.p, self.seen = torch.from_numpy(kept.astype(np.float32)), p, None

  def forward(self, x):
    self.seen = x.detach().numpy().copy()
    return x * self.kept / (1 - self.p)


def test_lora_dropout_matches_peft_with_the_same_mask(tmp_path):
  """Dropout on the adapter input only, inverted (x * mask / (1 - p)), a fresh mask per projection and layer:
  PEFT in training mode, its dropout modules given our masks, computes the same logits."""
  p = 0.3
  spec = lora.make_spec(4, 8, dropout=p)
  model = peft_model(TINY, spec)  # PEFT's own dropout off; replaced below
  params = PT.combine(base_params(model, TINY), adapters_of(model, TINY, spec, tmp_path))
  params = M.unstack_layers(params, TINY.num_layers)  # per-layer modules: each Dropout's output is captured
  tokens = np.random.RandomState(4).randint(0, TINY.vocab_size, (2, 13))
  net = M.Llama(TINY, lora=spec, scan_layers=False, deterministic=False)
  (ours, _), state = net.apply({"params": params}, jnp.asarray(tokens), rngs={"dropout": jax.random.key(7)},
                          capture_intermediates=lambda module, _: isinstance(module, nn.Dropout))
  dropped = {}
  for i in range(TINY.num_layers):
    for name in spec.targets:
      (out,) = state["intermediates"][f"layers_{i}"][PARENT[name]][name]["Dropout_0"]["__call__"]
      dropped[i, name] = np.asarray(out)
  masks = {key: out != 0 for key, out in dropped.items()}  # the inputs are never exactly 0
  layers = model.base_model.model.model.layers
  patched = {}
  for (i, name), kept in masks.items():
    patched[i, name] = _SameMask(kept, p)
    getattr(getattr(layers[i], PARENT[name]), name).lora_dropout["default"] = patched[i, name]
  with torch.no_grad():
    expected = model.train()(torch.tensor(tokens)).logits.numpy()
  assert rel_err(ours, expected) <= 1e-5
  for key, module in patched.items():  # our dropout's output is exactly x * mask / (1 - p) of the same x
    np.testing.assert_allclose(dropped[key], module.seen * masks[key] / (1 - p), rtol=1e-5, atol=1e-6,
                               err_msg=str(key))
  kept = np.concatenate([m.ravel() for m in masks.values()])
  assert abs(kept.mean() - (1 - p)) < 0.02, kept.mean()  # Bernoulli(1 - p), about 20k draws
  assert not np.array_equal(masks[0, "q_proj"], masks[0, "k_proj"])  # each projection its own mask
  assert not np.array_equal(masks[0, "q_proj"], masks[1, "q_proj"])  # and each layer


def _dropout_step(dropout: float, rngs):
  """The training step's loss and updated adapters, as the loop builds the model and step (a scanned model,
  `state.make_model` / `state.step_spec`), once per rng."""
  c = C.replace(C.StageConfig(), **{"lora.dropout": dropout, "lora.rank": 4, "lora.alpha": 8.0,
                                    "quant.type": "none", "data.max_length": 16, "train.batch_size": 2})
  spec = ST.lora_spec(c)
  model = ST.make_model(c, TINY, spec)
  mesh = S.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  step_spec = ST.step_spec(c, TINY, mesh)
  frozen = our_params(reference_model(TINY, seed=5), TINY)
  adapters = lora.init_adapters(jax.random.key(1), TINY, spec)
  # B != 0: with PEFT's B = 0 the first loss would not see the adapter input at all
  adapters = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.1 * jax.random.normal(jax.random.key(2), x.shape) if path[-1].key == "lora_b" else x,
      adapters)
  tx, _ = make_optimizer(c.train, 10)
  state = {"step": jnp.zeros((), jnp.int32), "params": adapters, "opt_state": tx.init(adapters)}
  tokens = np.random.RandomState(6).randint(0, TINY.vocab_size, (1, 2, 16))
  batches = {k: v[None] for k, v in sft_batch(tokens[0], np.ones_like(tokens[0])).items()}
  step = jax.jit(functools.partial(STEP.train_step, model, tx, step_spec))
  out = []
  for rng in rngs:
    new_state, metrics = step(state, frozen, batches, rng)
    out.append((float(metrics["loss"]), PT.flatten(jax.device_get(new_state["params"]))))
  return out


def test_training_step_draws_dropout_from_its_rng():
  keys = [jax.random.key(0), jax.random.key(1), jax.random.key(0)]
  (loss_a, params_a), (loss_b, params_b), (loss_a2, params_a2) = _dropout_step(0.2, keys)
  assert loss_a != loss_b  # two rngs, two masks
  assert loss_a == loss_a2 and all(np.array_equal(params_a[k], params_a2[k]) for k in params_a)
  assert any(not np.array_equal(params_a[k], params_b[k]) for k in params_a)
  (loss_a, params_a), (loss_b, params_b) = _dropout_step(0.0, keys[:2])
  assert loss_a == loss_b and all(np.array_equal(params_a[k], params_b[k]) for k in params_a)


# ----------------------------------------------------------------------------------------------
# A trainable head (train.trainable=lora,lm_head / embed_tokens / norms)


def _torch_param(model, path):
  """(the PEFT model's tensors of our flat path of a non-adapter weight, one per layer for a layer's norm;
  whether ours is their transpose)."""
  base = model.get_base_model()
  if path == ("lm_head", "kernel"):
    return [base.lm_head.weight], True  # [V, D]: ours is [D, V]
  if path == ("embed_tokens", "embedding"):
    return [base.model.embed_tokens.weight], False
  if path == ("norm", "scale"):
    return [base.model.norm.weight], False
  assert path[0] == "layers" and path[-1] == "scale", path
  return [getattr(layer, path[1]).weight for layer in base.model.layers], False


@pytest.mark.parametrize("config, groups", [(TINY, ("lora", "lm_head")), (TIED, ("lora", "embed_tokens")),
                                            (TINY, ("lora", "norms"))], ids=["lm_head", "tied-embed", "norms"])
def test_trainable_head_gradients_match_torch_autograd(config, groups, tmp_path):
  """The SFT loss's gradient on the trained non-adapter weights (and the adapters beside them) equals torch
  autograd through PEFT on the same weights and batch (fp32, 1e-4). A trained head takes the plain-logits
  path of the loss (`score.token_stats`), not the fused head whose weight gets no gradient."""
  spec = lora.make_spec(4, 8)
  model = peft_model(config, spec, seed=3)
  params = PT.combine(base_params(model, config), adapters_of(model, config, spec, tmp_path / "adapters"))
  trainable, frozen = PT.partition(params, PT.trainable_mask(params, groups))
  extra = [p for p in PT.flatten(trainable) if p[-1] not in lora.LORA_LEAVES]
  assert extra, groups
  tokens = np.random.RandomState(8).randint(0, config.vocab_size, (2, 21))
  seg = np.ones_like(tokens)
  seg[1, 14:] = 0
  for path in extra:
    for p in _torch_param(model, path)[0]:
      p.requires_grad_(True)
  model(torch.tensor(tokens), labels=torch.tensor(np.where(seg > 0, tokens, -100))).loss.backward()

  step_spec = objective.StepSpec(stage="sft", grad_accum=1, head_chunk=4)
  loss = lambda t: objective.Nll().loss(M.Llama(config, lora=spec), t, frozen, sft_batch(tokens, seg), None,
                                        step_spec, None)[0]
  got = PT.flatten(jax.jit(jax.grad(loss))(trainable))
  for path in extra:
    tensors, transposed = _torch_param(model, path)
    want = np.stack([t.grad.numpy() for t in tensors]) if len(tensors) > 1 else tensors[0].grad.numpy()
    want = want.T if transposed else want
    assert np.abs(want).max() > 0, path
    assert rel_err(got[path], want) <= 1e-4, path
  layers = model.base_model.model.model.layers
  for path, g in got.items():
    if path[-1] in lora.LORA_LEAVES:
      for i, layer in enumerate(layers):
        module = getattr(getattr(layer, path[1]), path[2])
        weight = (module.lora_A if path[-1] == "lora_a" else module.lora_B)["default"].weight
        assert rel_err(np.asarray(g)[i], weight.grad.numpy().T) <= 1e-4, (path, i)


# ----------------------------------------------------------------------------------------------
# init_as=stacked: the refused combinations


def _previous_workdir(tmp_path, model_dir, **fields):
  prev = C.replace(C.StageConfig(), **{"model.path": model_dir, **fields})
  workdir = tmp_path / "prev"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(prev)))
  return str(workdir)


STACKING_REFUSALS = [
    ("quant.type", {"quant.type": "nf4"}, {"quant.type": "int4"}),
    ("quant.type", {"quant.type": "nf4"}, {"quant.type": "none"}),
    ("quant.block_size", {"quant.block_size": 64}, {"quant.block_size": 128}),
    ("quant.double_quant", {"quant.double_quant": True}, {"quant.double_quant": False}),
    ("lora.targets", {"lora.targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
     {"lora.targets": "q_proj,v_proj"}),
    ("model.scan_layers", {"model.scan_layers": True}, {"model.scan_layers": False}),
    ("train.trainable", {"train.trainable": "lora,norms"}, {}),
    ("train.trainable", {"train.trainable": "lora,lm_head"}, {}),
]


@pytest.mark.parametrize("field, theirs, mine", STACKING_REFUSALS,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(STACKING_REFUSALS)])
def test_stacking_refusals_name_the_field(field, theirs, mine, tiny_hf_dir, tmp_path):
  prev = _previous_workdir(tmp_path, tiny_hf_dir, **theirs)
  c = C.replace(C.StageConfig(stage="dpo"), **{"init_from": prev, "model.path": tiny_hf_dir, **mine})
  with pytest.raises(UserError) as e:
    W.frozen_adapters(c)
  message = str(e.value)
  assert f"'{field}'" in message or f"{field}=" in message, message
  assert "init_as=merged" in message and prev in message and "\n" not in message


def test_stacking_accepts_a_new_rank_and_lr(tiny_hf_dir, tmp_path):
  """What may differ passes the check: the refusal then is the missing checkpoint, not a field."""
  prev = _previous_workdir(tmp_path, tiny_hf_dir, **{"lora.rank": 8})
  c = C.replace(C.StageConfig(stage="dpo"), **{"init_from": prev, "model.path": tiny_hf_dir, "lora.rank": 4,
                                               "train.lr": 1e-3, "lora.alpha": 4.0})
  with pytest.raises(UserError, match="no checkpoint to start from"):
    W.frozen_adapters(c)


def test_stacking_accepts_the_same_targets_in_another_order(tiny_hf_dir, tmp_path):
  prev = _previous_workdir(tmp_path, tiny_hf_dir, **{"lora.targets": "q_proj,v_proj"})
  c = C.replace(C.StageConfig(stage="dpo"), **{"init_from": prev, "model.path": tiny_hf_dir,
                                               "lora.targets": "v_proj, q_proj"})
  with pytest.raises(UserError, match="no checkpoint to start from"):
    W.frozen_adapters(c)


def test_a_trainable_head_of_a_tied_model_is_refused(tiny_hf_dir):
  """tiny_hf_dir ties its head to the embedding: `lm_head` names no weight, so it would train nothing."""
  from anita_jax.convert import loading
  c = C.replace(C.StageConfig(), **{"model.path": tiny_hf_dir, "train.trainable": "lora,lm_head"})
  with pytest.raises(UserError, match=r"'lm_head' names no weight of this model \(its head is the tied"):
    ST.abstract_stage(c, loading.load_config(tiny_hf_dir), S.make_mesh(1, 1, 1), with_optimizer=False)


def test_stacking_refusal_is_one_error_line(tiny_hf_dir, tmp_path):
  """scripts/train.py: two refused fields, one `error:` line (the first field), exit 2, before any import."""
  prev = _previous_workdir(tmp_path, tiny_hf_dir, **{"quant.type": "int4", "model.scan_layers": False})
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'anita_demo.py')}:dpo", f"--workdir={tmp_path / 'dpo'}",
         f"--config.model.path={tiny_hf_dir}", f"--config.init_from={prev}", "--config.data.eval="]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "'quant.type'='nf4'" in errors[0] and "'int4'" in errors[0], done.stderr[-2000:]
  assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------------
# scripts/preview_data.py (apps/commands.py): the tokenizer's own ids


def _records(demo_config, model_dir, stage, capsys, n, **fields):
  from anita_jax.apps import commands
  c = demo_config(stage)
  c.model.path = model_dir
  c.update_from_flattened_dict(fields)
  commands.preview(c, n)
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _rows(name, n):
  with open(os.path.join(ROOT, "anita_jax", "demo_data", name), encoding="utf-8") as f:
    return [json.loads(line) for line in f][:n]


def _chat_ids(tok, messages, **kwargs):
  out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
  return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


def _trl_pair_ids(tok, row):
  """TRL's DPO tokenization of a conversational pair: the prompt with the generation prompt, the completions
  from where prompt + completion departs from it."""
  prompt = _chat_ids(tok, row["prompt"], add_generation_prompt=True)
  chosen = _chat_ids(tok, row["prompt"] + row["chosen"])
  rejected = _chat_ids(tok, row["prompt"] + row["rejected"])
  common = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # noqa
  n = min(common(prompt, chosen), common(prompt, rejected))
  return prompt[:n], chosen[n:], rejected[n:]


def test_preview_sft_ids_are_the_chat_template(demo_config, tiny_hf_dir, capsys):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  records = _records(demo_config, tiny_hf_dir, "sft", capsys, 3)
  rows = _rows("sft_train.jsonl", 3)
  assert len(records) == 3
  for record, row in zip(records, rows):
    want = _chat_ids(tok, row["messages"])
    assert record["input_ids"] == want
    assert record["loss_mask"] == [0] + [1] * (len(want) - 1)  # the demo's data.mask=all


def test_preview_dpo_ids_are_trl_style(demo_config, tiny_hf_dir, capsys):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  rows = _rows("dpo_train.jsonl", 3)
  want = [_trl_pair_ids(tok, row) for row in rows]
  records = _records(demo_config, tiny_hf_dir, "dpo", capsys, 3, **{"data.packing": False, "data.max_length": 1024,
                                                                    "data.max_prompt_length": None})
  assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in records] == want
  # Packed (the demo's default): each row lays its pairs out as [prompt][chosen][rejected], spans given
  packed = _records(demo_config, tiny_hf_dir, "dpo", capsys, 3, **{"data.max_length": 1024,
                                                                   "data.max_prompt_length": None})
  pairs = [(row, pair) for row in packed for pair in row["pairs"]]
  assert len(pairs) == 3
  for (row, pair), (prompt, chosen, rejected) in zip(pairs, want):
    ids = row["input_ids"]
    assert [ids[slice(*pair[k])] for k in ("prompt", "chosen", "rejected")] == [prompt, chosen, rejected]
    assert pair["prompt_text"] == tok.decode(prompt, skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# Multi-host start-up: what jax.distributed.initialize gets


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")


@pytest.mark.parametrize("env, argv, want", [
    ({}, [], None),  # one host: no call
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, [], None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, [], (None, None, None)),  # a pod slice: JAX asks the metadata
    ({"SLURM_JOB_ID": "42"}, [], (None, None, None)),  # JAX's SLURM detection
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, [], (None, None, None)),  # JAX reads the variable itself
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, ["--num_processes=4", "--process_id=3"], (None, 4, 3)),
    ({}, ["--coordinator_address=10.0.0.2:1234", "--num_processes=2", "--process_id=1"], ("10.0.0.2:1234", 2, 1)),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "SLURM_JOB_ID": "42"},  # explicit flags win over the environment
     ["--coordinator_address=10.0.0.9:99", "--num_processes=8", "--process_id=0"], ("10.0.0.9:99", 8, 0)),
], ids=["none", "tpu-vm", "tpu-pod", "slurm", "jax-env", "jax-env-with-flags", "flags", "flags-win"])
def test_distributed_initialize_arguments(env, argv, want, monkeypatch):
  import inspect

  from absl import flags

  from anita_jax.apps import cli
  values = flags.FlagValues()
  monkeypatch.setattr(cli, "flags", types.SimpleNamespace(
      FLAGS=values, DEFINE_string=functools.partial(flags.DEFINE_string, flag_values=values),
      DEFINE_integer=functools.partial(flags.DEFINE_integer, flag_values=values)))
  cli.define_distributed_flags()
  values(["prog", *argv])
  for key in DISTRIBUTED_ENV:
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  real = inspect.signature(jax.distributed.initialize)
  calls = []

  def record(*args, **kwargs):
    bound = real.bind(*args, **kwargs)
    bound.apply_defaults()
    calls.append(tuple(bound.arguments[k] for k in ("coordinator_address", "num_processes", "process_id")))

  monkeypatch.setattr(jax.distributed, "initialize", record)
  cli.initialize_distributed()
  assert calls == ([] if want is None else [want])


# ----------------------------------------------------------------------------------------------
# The recipe when its first stage trains more than the adapters


@pytest.mark.parametrize("trainable", ["lora", "lora,norms"])
def test_recipe_base_row_when_the_first_stage_trains_more_than_lora(demo_config, trainable, tmp_path, monkeypatch):
  """The report's base: with LoRA only, the first stage's workdir with its adapter off (its quantized base);
  when the stage also trained norms or a head, those are in its workdir whatever the adapter, so the base is
  the original model PATH, loaded in the first stage's dtype and quantization."""
  from anita_jax.apps import recipe as R
  from anita_jax.apps import report
  from anita_jax.model import quant as Q
  full = demo_config()
  full.sft.model.path = "/models/base"
  full.sft.train.trainable = trainable
  full.sft.model.dtype, full.sft.quant.type, full.sft.quant.block_size = "bfloat16", "int4", 128
  calls = []
  monkeypatch.setattr(report, "evaluate_model", lambda path, data_dir, **kw: calls.append((path, kw)) or {})
  monkeypatch.setattr(report, "report_row", lambda name, *a, **kw: {"model": name})
  monkeypatch.setattr(report, "read_metrics", lambda path: [])
  written = []
  monkeypatch.setattr(report, "write_report", lambda out, rows, *a, **kw: written.append(rows))
  R.write_recipe_report(full, str(tmp_path))
  (base_path, base_kwargs), *stages = calls
  if trainable == "lora":
    assert base_path == str(tmp_path / "sft") and base_kwargs["adapters"] is False
  else:
    assert base_path == "/models/base" and base_kwargs["dtype"] == "bfloat16"
    assert base_kwargs["quant"] == Q.QuantSpec("int4", 128, True) and base_kwargs.get("adapters", True)
  assert [p for p, _ in stages] == [str(tmp_path / s) for s in ("sft", "dpo", "lm")]
  assert [row["model"] for row in written[0]] == ["base", "sft", "dpo", "lm"]
