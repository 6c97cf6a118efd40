"""The optimizer against transformers' Trainer: which weights decay, and the learning rate of every update."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from anita_jax.model import config as cfg
from anita_jax.model import llama as M
from anita_jax.model import lora as LA
from anita_jax.model import tree as PT
from anita_jax.train.optim import make_optimizer

TINY = cfg.PRESETS["tiny"]  # untied: lm_head is its own weight
TRAINABLE = ("lora", "embed_tokens", "lm_head", "norms")


def train_section(**fields):
  t = ml_collections.ConfigDict({"lr": 1e-3, "schedule": "linear", "warmup_steps": 0, "warmup_ratio": 0.0,
                                 "weight_decay": 0.1, "max_grad_norm": 1.0})
  t.update(fields)
  return t


def our_trainable_tree(scan_layers):
  """The trainable leaves of the Flax model for train.trainable='lora,embed_tokens,lm_head,norms' (ones)."""
  model = M.Llama(TINY, scan_layers=scan_layers, lora=LA.make_spec(4, 8.0))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  abstract = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: hasattr(x, "names"))
  trainable, _ = PT.partition(abstract, PT.trainable_mask(abstract, TRAINABLE))
  return jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), trainable)


def decayed_by_us(params):
  """Paths that one AdamW update with zero gradients moves: only weight decay acts then."""
  tx, _ = make_optimizer(train_section(schedule="constant"), 10)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  return {"/".join(k.key for k in path) for path, u in flat if np.any(np.asarray(u) != 0)}, \
         {"/".join(k.key for k in path) for path, _ in flat}


def our_path(hf_name, scan_layers):
  """PEFT parameter name -> our tree path (layer index folded into 'layers' when scanned)."""
  name = hf_name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
  name = re.sub(r"\.lora_([AB])\.default\.weight$", lambda m: f".lora_{m.group(1).lower()}", name)
  name = name.removeprefix("model.")
  name = re.sub(r"^layers\.(\d+)\.", (lambda m: "layers.") if scan_layers else (lambda m: f"layers_{m.group(1)}."),
                name)
  name = {"embed_tokens.weight": "embed_tokens.embedding", "lm_head.weight": "lm_head.kernel"}.get(name, name)
  name = re.sub(r"norm\.weight$", "norm.scale", name)
  return name.replace(".", "/")


@pytest.fixture(scope="module")
def hf_decay(tmp_path_factory):
  """(decayed, trainable) PEFT parameter names of transformers' Trainer on the same model: LoRA on the seven
  projections, embeddings, lm_head and every norm trained in full (modules_to_save)."""
  import peft
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY.to_hf()))
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(cfg.PROJECTIONS), task_type="CAUSAL_LM",
                           modules_to_save=["embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm",
                                            "norm"])
  model = peft.get_peft_model(model, config)
  args = transformers.TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), weight_decay=0.1,
                                        use_cpu=True, report_to=[])
  optimizer = transformers.Trainer(model=model, args=args).create_optimizer()
  names = {id(p): n for n, p in model.named_parameters()}
  decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
  trainable = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
  return decayed, trainable


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_falls_on_the_weights_transformers_decays(hf_decay, scan_layers):
  hf_decayed, hf_trainable = hf_decay
  decayed, trainable = decayed_by_us(our_trainable_tree(scan_layers))
  assert trainable == {our_path(n, scan_layers) for n in hf_trainable}  # the same trainable set, mapped by name
  assert decayed == {our_path(n, scan_layers) for n in hf_decayed}
  # What that means: LoRA A/B, embeddings and lm_head decay; no norm scale does, scanned [L, D] or not.
  assert {p.split("/")[-1] for p in decayed} == {"lora_a", "lora_b", "embedding", "kernel"}
  assert not [p for p in decayed if "norm" in p]


def applied_learning_rates(t, total):
  """The step each of `total` AdamW updates takes on a scalar whose gradient is always 1 (Adam's normalised
  step is then exactly 1/(1 + eps)); weight decay 0."""
  tx, _ = make_optimizer(t, total)
  params = {"w": jnp.zeros((), jnp.float32)}
  state = tx.init(params)
  rates = []
  for _ in range(total):
    updates, state = tx.update({"w": jnp.ones((), jnp.float32)}, state, params)
    rates.append(-float(updates["w"]) * (1 + 1e-8))
  return np.asarray(rates)


def transformers_learning_rates(kind, lr, warmup, total):
  """torch AdamW under transformers' scheduler as the Trainer steps them: optimizer.step(), then
  lr_scheduler.step(); the step taken by each update on the same scalar."""
  w = torch.zeros((), dtype=torch.float64, requires_grad=True)
  optimizer = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  scheduler = {"linear": lambda: transformers.get_linear_schedule_with_warmup(optimizer, warmup, total),
               "cosine": lambda: transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total),
               "constant": lambda: transformers.get_constant_schedule_with_warmup(optimizer, warmup)}[kind]()
  rates = []
  for _ in range(total):
    before = w.item()
    w.grad = torch.ones((), dtype=torch.float64)
    optimizer.step()
    scheduler.step()
    rates.append((before - w.item()) * (1 + 1e-8))
  return np.asarray(rates)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup_steps, warmup_ratio, total", [
    (0, 0.0, 12), (3, 0.0, 12), (0, 0.1, 24), (0, 0.25, 7), (10, 0.0, 6)])  # the last: warmup outlasts the run
def test_learning_rate_of_every_update_equals_transformers(kind, warmup_steps, warmup_ratio, total):
  lr = 2e-4
  t = train_section(lr=lr, schedule=kind, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, weight_decay=0.0)
  # transformers 5 takes the ratio as a fractional warmup_steps: ceil(ratio x total) (get_warmup_steps).
  args = transformers.TrainingArguments(output_dir="unused", warmup_steps=warmup_steps or warmup_ratio, report_to=[])
  expected = transformers_learning_rates(kind, lr, args.get_warmup_steps(total), total)
  got = applied_learning_rates(t, total)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * lr)
  # The loop logs schedule(step - 1) for step `step`: the rate its update applied.
  _, schedule = make_optimizer(t, total)
  np.testing.assert_allclose([float(schedule(k)) for k in range(total)], expected, rtol=1e-5, atol=1e-6 * lr)
