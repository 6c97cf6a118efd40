"""LoRA against PEFT on the same weights: forward, merge, adapter files; masks and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from test_model import TINY, our_params, reference_model, rel_err

from anita_jax.model import lora
from anita_jax.model import tree as PT
from anita_jax.model import llama as M
from anita_jax.convert import hf
from anita_jax.convert import peft as peft_files
from anita_jax.errors import UserError

TIED = dataclasses.replace(TINY, tie_word_embeddings=True)


def peft_model(config, spec, seed=0):
  base = reference_model(config, seed)
  peft_config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, use_rslora=spec.rslora,
                                target_modules=list(spec.targets), task_type="CAUSAL_LM")
  model = peft.get_peft_model(base, peft_config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.1)
  return model.eval()


def adapters_of(model, config, spec, tmp_path):
  model.save_pretrained(str(tmp_path))
  return peft_files.load_peft(str(tmp_path), config)[1]


def base_params(model, config):
  base = model.get_base_model()
  tensors = ((k, v.detach().numpy()) for k, v in base.state_dict().items() if "lora_" not in k)
  names = {k.replace(".base_layer", ""): v for k, v in tensors}
  return hf.build_params(config, names.items(), source="peft base")


@pytest.mark.parametrize("config", [TINY, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_peft(config, rslora, tmp_path):
  spec = lora.make_spec(4, 8, rslora=rslora, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
  model = peft_model(config, spec)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 19))
  with torch.no_grad():
    expected = model(torch.tensor(tokens)).logits.numpy()
  params = PT.combine(base_params(model, config), adapters_of(model, config, spec, tmp_path))
  ours, _ = M.Llama(config, lora=spec).apply({"params": params}, jnp.asarray(tokens))
  assert rel_err(ours, expected) <= 1e-5


def test_zero_b_reproduces_base_and_disabled_adapters_equal_base():
  ref = reference_model(TINY, seed=1)
  base = our_params(ref, TINY)
  spec = lora.make_spec(8, 16)
  adapters = lora.init_adapters(jax.random.key(0), TINY, spec)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, TINY.vocab_size, (2, 16)))
  plain, _ = M.Llama(TINY).apply({"params": base}, tokens)
  adapted, _ = M.Llama(TINY, lora=spec).apply({"params": PT.combine(base, adapters)}, tokens)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))
  trained = jax.tree.map(lambda x: x + 0.05, adapters)
  disabled, _ = M.Llama(TINY, lora=spec, adapters_enabled=False).apply(
      {"params": PT.combine(base, trained)}, tokens)
  np.testing.assert_array_equal(np.asarray(disabled), np.asarray(plain))


def test_init_follows_peft_bounds():
  spec = lora.make_spec(16, 8)
  adapters = lora.init_adapters(jax.random.key(0), TINY, spec)
  a = np.asarray(adapters["layers"]["mlp"]["down_proj"]["lora_a"])  # in = intermediate_size
  assert a.shape == (TINY.num_layers, TINY.intermediate_size, 16)
  assert np.abs(a).max() <= 1 / np.sqrt(TINY.intermediate_size)
  assert np.abs(a).max() > 0.9 / np.sqrt(TINY.intermediate_size)
  assert not np.asarray(adapters["layers"]["mlp"]["down_proj"]["lora_b"]).any()


@pytest.mark.parametrize("config", [TINY, TIED], ids=["untied", "tied"])
def test_merge_matches_peft_merge_and_unload(config, tmp_path):
  spec = lora.make_spec(4, 16, rslora=True)
  model = peft_model(config, spec, seed=2)
  params = PT.combine(base_params(model, config), adapters_of(model, config, spec, tmp_path))
  # merge_lazily: what the exporters read, one layer's matrix at a time
  merged = lora.merge_lazily(params, spec)
  reference = model.merge_and_unload()
  for name, value in hf.to_hf_tensors(config, merged):
    np.testing.assert_allclose(value, reference.state_dict()[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_peft_files_round_trip_through_peft(tmp_path):
  spec = lora.make_spec(4, 8)
  model = peft_model(TINY, spec, seed=3)
  adapters = adapters_of(model, TINY, spec, tmp_path / "from_peft")
  peft_files.save_peft(str(tmp_path / "ours"), adapters, TINY, spec, base_model="tiny")
  reloaded = peft.PeftModel.from_pretrained(reference_model(TINY, seed=3), str(tmp_path / "ours")).eval()
  tokens = torch.tensor(np.random.RandomState(3).randint(0, TINY.vocab_size, (2, 11)))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(tokens).logits.numpy(), model(tokens).logits.numpy(), rtol=0, atol=1e-6)


def test_trainable_mask_selects_groups():
  spec = lora.make_spec(4, 8)
  params = PT.combine(our_params(reference_model(TINY), TINY), lora.init_adapters(jax.random.key(0), TINY, spec))
  trainable, frozen = PT.partition(params, PT.trainable_mask(params))
  leaves = jax.tree_util.tree_flatten_with_path(trainable)[0]
  assert leaves and all(str(path[-1].key) in ("lora_a", "lora_b") for path, _ in leaves)
  assert "lora_a" not in str(jax.tree_util.tree_structure(frozen))
  with_norms, _ = PT.partition(params, PT.trainable_mask(params, ("lora", "norms", "lm_head")))
  assert "norm" in with_norms and "lm_head" in with_norms and "embed_tokens" not in with_norms
  jax.tree.map(np.testing.assert_array_equal, PT.combine(trainable, frozen), params)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0, alpha=8), "lora.rank"), (dict(rank=-2, alpha=8), "lora.rank"),
    (dict(rank=4, alpha=8, targets=("q_proj", "qkv_proj")), "unknown target module 'qkv_proj'"),
    (dict(rank=4, alpha=8, targets="q_proj,fc1"), "unknown target module 'fc1'"),
])
def test_bad_lora_settings_name_the_field(kwargs, field):
  with pytest.raises(UserError, match=field):
    lora.make_spec(**kwargs)


def test_peft_adapter_directory_is_a_model_path(tiny_hf_dir, tmp_path):
  import transformers

  from anita_jax.convert import loading
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                    task_type="CAUSAL_LM"))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.1)
  model.save_pretrained(str(tmp_path))  # adapter_config.json names tiny_hf_dir as the base
  tokens = np.random.RandomState(5).randint(0, 49152, (2, 12))
  with torch.no_grad():
    expected = model.eval()(torch.tensor(tokens)).logits.numpy()
  net, params, _, _ = loading.load_pretrained(str(tmp_path))
  ours, _ = net.apply({"params": params}, jnp.asarray(tokens))
  assert rel_err(ours, expected) <= 1e-5



@pytest.mark.parametrize("config", [TINY, TIED], ids=["untied", "tied"])
def test_adapter_gradients_match_peft(config, tmp_path):
  """The SFT loss's gradient on every lora_A / lora_B equals torch autograd through PEFT (fp32, 1e-4).

  Both backward passes of ours are written by hand (`model.lora_delta`, the fused head of
  `head.head_token_stats`), so they are checked against an independent autodiff here.
  """
  from anita_jax.train import objective
  spec = lora.make_spec(4, 8)
  model = peft_model(config, spec)
  adapters = adapters_of(model, config, spec, tmp_path / "adapters")
  frozen = base_params(model, config)
  tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, 23))
  seg = np.ones_like(tokens)
  seg[1, 15:] = 0  # a shorter second row: padding, out of the loss
  model(torch.tensor(tokens), labels=torch.tensor(np.where(seg > 0, tokens, -100))).loss.backward()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(p.grad)
  want = adapters_of(model, config, spec, tmp_path / "grads")  # PEFT's layout, read by our loader

  batch = {"input_ids": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.asarray(seg, jnp.int32),
           "segment_ids": jnp.asarray(seg, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)}
  step_spec = objective.StepSpec(stage="sft", grad_accum=1, head_chunk=5)  # 5 does not divide 23
  loss = lambda a: objective.Nll().loss(M.Llama(config, lora=spec), a, frozen, batch, None, step_spec, None)[0]
  got = PT.flatten(jax.jit(jax.grad(loss))(adapters))
  want = PT.flatten(want)
  assert got.keys() == want.keys()
  for path, g in got.items():
    assert rel_err(g, np.asarray(want[path])) <= 1e-4, path
