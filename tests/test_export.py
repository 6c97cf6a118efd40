"""Exports read back by transformers and PEFT: merged weights, adapters, bf16, shards, atomic writes."""

import dataclasses
import json
import os
import re
import types

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from safetensors import safe_open
from test_model import TINY, our_params, reference_model, rel_err

from anita_jax.convert import export
from anita_jax.convert import loading
from anita_jax.model import lora
from anita_jax.model import tree as PT
from anita_jax.model import llama as M
from anita_jax.convert import hf
from anita_jax.errors import UserError
from anita_jax.model.quant import QuantSpec, quantize

NF4 = QuantSpec("nf4")
SPEC = lora.make_spec(8, 16)  # all seven projections
TIED = dataclasses.replace(TINY, tie_word_embeddings=True)
PROMPTS = [
    [{"role": "user", "content": "Qual è la capitale d'Italia?"}],
    [{"role": "system", "content": "Rispondi in italiano."},
     {"role": "user", "content": "Scrivi una breve poesia sul mare di Sicilia."}],
    [{"role": "user", "content": "Explain photosynthesis in one sentence."}],
]
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 512}
STAGES = [
    {"name": "sft", "data": "Chat-Error/wizard_alpaca_dolly_orca",
     "lora": {"rank": 16, "alpha": 8}, "learning_rate": 2e-4, "epochs": 1},
    {"name": "dpo", "data": "mlabonne/orpo-dpo-mix-40k", "lora": {"rank": 64, "alpha": 16, "rslora": True},
     "beta": 0.1},
]


# Fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_nf4(smollm2_hf_dir):
  _, params, tokenizer, config = loading.load_pretrained(smollm2_hf_dir, quant=NF4)
  return config, params, tokenizer


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_hf_dir):
  _, params, tokenizer, config = loading.load_pretrained(smollm2_hf_dir)
  return config, params, tokenizer


@pytest.fixture(scope="module")
def smollm2_torch(smollm2_hf_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def nf4_adapted(smollm2_nf4):
  """Our NF4 SmolLM2 with a random adapter: (adapters, prompts, logits with and without the adapter)."""
  config, params, tokenizer = smollm2_nf4
  adapters = random_adapters(config, SPEC, seed=0)
  prompts = chat_prompts(tokenizer)
  adapted = ours(M.Llama(config, lora=SPEC, quant=NF4), PT.combine(params, adapters), prompts)
  base = ours(M.Llama(config, quant=NF4), params, prompts)
  return adapters, prompts, adapted, base


def random_adapters(config, spec, seed, scale=0.05):
  """PEFT-initialised A and a random (trained-looking) B, so the adapter changes the outputs."""
  adapters = lora.init_adapters(jax.random.key(seed), config, spec)
  keys = iter(jax.random.split(jax.random.key(seed + 1000), 64))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: scale * jax.random.normal(next(keys), x.shape) if path[-1].key == "lora_b" else x, adapters)


def chat_prompts(tokenizer):
  """The PROMPTS through the tokenizer's chat template: a list of id lists."""
  texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in PROMPTS]
  return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def random_prompts(config, seed=0):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(0, config.vocab_size, n)) for n in (7, 19, 12)]


def ours(net, params, prompts):
  """Our logits for each prompt (right-padded batch, padding masked), as a list of [T, V]."""
  length = max(map(len, prompts))
  tokens = np.zeros((len(prompts), length), np.int32)
  segments = np.zeros_like(tokens)
  for row, ids in enumerate(prompts):
    tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
  logits, _ = jax.jit(net.apply)({"params": params}, jnp.asarray(tokens), segment_ids_bt=jnp.asarray(segments))
  return [np.asarray(logits[row, :len(ids)], np.float32) for row, ids in enumerate(prompts)]


def theirs(model, prompts):
  """transformers' (or PEFT's) logits, each prompt run alone: no padding involved."""
  with torch.no_grad():
    return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def worst(a, b):
  return max(rel_err(x, y) for x, y in zip(a, b))


def load_hf(directory, **kwargs):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


def merged(params, spec):
  return lora.merge_lazily(params, spec)  # what the exporters read, one matrix at a time


# 1. Merged export ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_merged_export_of_nf4_adapted_tied_model_matches_transformers(smollm2_nf4, nf4_adapted, tmp_path):
  config, params, tokenizer = smollm2_nf4
  adapters, prompts, expected, base = nf4_adapted
  assert config.tie_word_embeddings
  assert worst(base, expected) > 1e-2  # the adapter really changes the function

  out = str(tmp_path / "merged")
  export.write_hf_model(out, config, merged(PT.combine(params, adapters), SPEC), tokenizer, dtype="float32")
  assert "lm_head.weight" not in safe_open(os.path.join(out, "model.safetensors"), "np").keys()
  err = worst(theirs(load_hf(out, dtype=torch.float32), prompts), expected)
  print(f"merged export, tied SmolLM2 (NF4 base + LoRA): relative error {err:.2e}")
  assert err <= 1e-4


def test_merged_export_of_untied_model_matches_transformers(tmp_path):
  params = our_params(reference_model(TINY, seed=1), TINY)
  adapted = PT.combine(params, random_adapters(TINY, SPEC, seed=1, scale=0.2))
  prompts = random_prompts(TINY)
  expected = ours(M.Llama(TINY, lora=SPEC), adapted, prompts)
  out = str(tmp_path / "merged")
  export.write_hf_model(out, TINY, merged(adapted, SPEC), None, dtype="float32")
  err = worst(theirs(load_hf(out, dtype=torch.float32), prompts), expected)
  print(f"merged export, untied tiny model: relative error {err:.2e}")
  assert err <= 1e-4


# 2. Adapter export --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny-untied", pytest.param("smollm2-tied", marks=pytest.mark.slow)])
def test_adapter_loads_in_peft_and_matches_ours(which, request, tmp_path):
  if which == "tiny-untied":
    config, prompts = TINY, random_prompts(TINY, seed=2)
    params, base = our_params(reference_model(TINY, seed=2), TINY), reference_model(TINY, seed=2)
    source = "tiny"
  else:
    config, params, tokenizer = request.getfixturevalue("smollm2_fp32")
    prompts = chat_prompts(tokenizer)
    source = request.getfixturevalue("smollm2_hf_dir")
    base = load_hf(source, dtype=torch.float32)
  adapters = random_adapters(config, SPEC, seed=3, scale=0.2 if which == "tiny-untied" else 0.05)
  expected = ours(M.Llama(config, lora=SPEC), PT.combine(params, adapters), prompts)
  out = str(tmp_path / "out" / "adapter")
  export.write_adapter(out, adapters, config, SPEC, base_model=source)
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
  model = peft.PeftModel.from_pretrained(base, out).eval()
  err = worst(theirs(model, prompts), expected)
  print(f"PEFT adapter export, {which}: relative error {err:.2e}")
  assert err <= 1e-5


# 3. bf16 export with tokenizer, generation config and model card ----------------------------------

@pytest.mark.slow
def test_bf16_export_loads_with_chat_template_generation_config_and_card(
    smollm2_fp32, smollm2_torch, smollm2_gguf, tmp_path):
  config, params, _ = smollm2_fp32
  gguf_tokenizer = loading.load_tokenizer(smollm2_gguf)
  out = str(tmp_path / "bf16")
  card = export.model_card("HuggingFaceTB/SmolLM2-135M-Instruct", STAGES, "apache-2.0")
  export.write_hf_model(out, config, params, gguf_tokenizer, dtype="bfloat16", generation_config=SAMPLING,
                        model_card=card)

  model = load_hf(out)  # dtype from config.json
  assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
  reference = smollm2_torch.state_dict()
  for name, value in model.state_dict().items():
    torch.testing.assert_close(value, reference[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
  prompts = chat_prompts(gguf_tokenizer)
  err = worst(theirs(model, prompts), theirs(smollm2_torch, prompts))
  print(f"bf16 export vs fp32 original in transformers: relative error {err:.3f}")
  assert err < 0.1

  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer.chat_template and tokenizer.chat_template == gguf_tokenizer.chat_template
  for messages in PROMPTS:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")

  generation = transformers.GenerationConfig.from_pretrained(out)
  assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
  assert (generation.do_sample, generation.temperature, generation.top_p, generation.max_new_tokens) == (
      True, 0.6, 0.9, 512)

  meta = huggingface_hub.ModelCard.load(os.path.join(out, "README.md")).data
  assert meta.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
  assert (meta.library_name, meta.license, meta.language) == ("transformers", "apache-2.0", ["it", "en"])
  assert meta.datasets == ["Chat-Error/wizard_alpaca_dolly_orca", "mlabonne/orpo-dpo-mix-40k"]
  assert {"sft", "dpo"} <= set(meta.tags)
  text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  assert "| lora.rank | 64 |" in text and "| beta | 0.1 |" in text


# 4. Sharding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY, TIED], ids=["untied", "tied"])
def test_sharded_export_loads_with_identical_logits(config, tmp_path):
  params = our_params(reference_model(config, seed=5), config)
  single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
  limit = 40_000
  export.write_hf_model(single, config, params, None, dtype="float32")
  export.write_hf_model(sharded, config, params, None, dtype="float32", max_shard_bytes=limit)

  assert not os.path.exists(os.path.join(single, export.INDEX_NAME))
  with open(os.path.join(sharded, export.INDEX_NAME), encoding="utf-8") as f:
    index = json.load(f)
  files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
  assert len(files) > 2 and "model.safetensors" not in files
  assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
  assert set(index["weight_map"]) == set(hf.hf_shapes(config))
  assert sorted(set(index["weight_map"].values())) == files
  total = 0
  for file in files:
    tensors = safetensors.numpy.load_file(os.path.join(sharded, file))
    size = sum(t.nbytes for t in tensors.values())
    assert size <= limit or len(tensors) == 1, file
    assert all(index["weight_map"][name] == file for name in tensors)
    total += size
  assert index["metadata"]["total_size"] == total

  prompts = random_prompts(config, seed=5)
  a = theirs(load_hf(single, dtype=torch.float32), prompts)
  b = theirs(load_hf(sharded, dtype=torch.float32), prompts)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# 5. Atomic writes -----------------------------------------------------------------------------------

def _boom(*args, **kwargs):
  raise RuntimeError("simulated crash")


def _siblings(path):
  return sorted(os.listdir(os.path.dirname(path)))


def test_failed_export_leaves_no_output_and_keeps_the_old_one(tmp_path):
  params = our_params(reference_model(TINY), TINY)
  tokenizer = types.SimpleNamespace(save_pretrained=_boom, chat_template="{{ messages }}")

  fresh = str(tmp_path / "fresh" / "model")
  with pytest.raises(RuntimeError, match="simulated crash"):
    export.write_hf_model(fresh, TINY, params, tokenizer, dtype="float32")
  assert _siblings(fresh) == []

  old = tmp_path / "old" / "model"
  old.mkdir(parents=True)
  (old / "config.json").write_text("old contents")
  with pytest.raises(RuntimeError, match="simulated crash"):
    export.write_hf_model(str(old), TINY, params, tokenizer, dtype="float32")
  assert _siblings(str(old)) == ["model"]
  assert os.listdir(old) == ["config.json"] and (old / "config.json").read_text() == "old contents"


def test_crash_between_shards_leaves_no_output(tmp_path, monkeypatch):
  params = our_params(reference_model(TINY), TINY)
  real, calls = safetensors.numpy.save_file, []

  def save_then_crash(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 2:
      raise KeyboardInterrupt  # not an Exception: cleanup must still run
    return real(*args, **kwargs)

  monkeypatch.setattr(safetensors.numpy, "save_file", save_then_crash)
  out = str(tmp_path / "model")
  with pytest.raises(KeyboardInterrupt):
    export.write_hf_model(out, TINY, params, None, dtype="float32", max_shard_bytes=40_000)
  assert len(calls) == 2 and _siblings(out) == []


def test_successful_export_replaces_an_existing_directory(tmp_path):
  params = our_params(reference_model(TINY), TINY)
  out = tmp_path / "model"
  out.mkdir()
  (out / "stale.safetensors").write_text("from an older export")
  export.write_hf_model(str(out), TINY, params, None, dtype="float32")
  assert _siblings(str(out)) == ["model"]
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_atomic_dir_refuses_a_file_and_cleans_up_on_error(tmp_path):
  target = tmp_path / "file"
  target.write_text("x")
  with pytest.raises(UserError, match="not a directory"):
    with export.atomic_dir(str(target)):
      pass
  with pytest.raises(ValueError):
    with export.atomic_dir(str(tmp_path / "report")) as tmp:
      open(os.path.join(tmp, "half.txt"), "w").close()
      raise ValueError
  assert _siblings(str(target)) == ["file"]


def test_model_card_front_matter_reads_back_as_strings_and_the_body_stays_verbatim():
  # YAML 1.1 reads a bare no / on as booleans; a hyperparameter holding jinja syntax must not be rendered.
  stages = [{"name": "sft", "data": ["org/set", "local/rows.jsonl"], "template": "{{ x }} {% if y %}"}]
  card = export.model_card("yes/no", stages, "on")
  meta = huggingface_hub.ModelCard(card).data
  assert (meta.base_model, meta.license, meta.datasets) == ("yes/no", "on", ["org/set"])
  assert meta.tags == ["llama", "llama-3", "qlora", "lora", "merged", "sft"]
  assert "| template | {{ x }} {% if y %} |" in card and "Data: `org/set`, `local/rows.jsonl`" in card
  assert card.endswith("under its license: `on`.\n")


@pytest.mark.parametrize("kind", ["hub id", "local directory", "local gguf", "local hub-shaped directory"])
def test_card_and_adapter_config_name_a_hub_base_and_never_a_local_path(kind, tmp_path, monkeypatch):
  hub = "meta-llama/Meta-Llama-3-8B-Instruct"
  monkeypatch.chdir(tmp_path)
  base = {"hub id": hub, "local directory": str(tmp_path / "models" / "Meta-Llama-3-8B-Instruct"),
          "local gguf": str(tmp_path / "smollm2-135m-instruct.gguf"), "local hub-shaped directory": hub}[kind]
  if kind != "hub id":  # a local copy: named by its file name in the text, absent from the metadata
    os.makedirs(base if not base.endswith(".gguf") else tmp_path, exist_ok=True)
    if base.endswith(".gguf"):
      open(base, "wb").close()
  card = export.model_card(base, STAGES, "llama3")
  meta = huggingface_hub.ModelCard(card).data
  front = card.split("---")[1]
  assert str(tmp_path) not in card
  if kind == "hub id":
    assert meta.base_model == hub and f"base_model: {hub}\n" in front
    assert f"Base model: `{hub}`. Training stages" in card
  else:
    assert meta.base_model is None and "base_model" not in front
    assert f"Base model: `{os.path.basename(base)}` (local). Training stages" in card

  reference = reference_model(TINY, seed=4)
  out = str(tmp_path / "adapter")
  export.write_adapter(out, random_adapters(TINY, SPEC, seed=4), TINY, SPEC, base_model=base)
  config = peft.PeftConfig.from_pretrained(out)  # PEFT's own reading of adapter_config.json
  assert config.base_model_name_or_path == (hub if kind == "hub id" else None)
  assert str(tmp_path) not in open(os.path.join(out, "adapter_config.json")).read()
  peft.PeftModel.from_pretrained(reference, out)  # loads onto the base given, whatever the file names


def test_export_files_get_the_mode_open_gives(tmp_path):
  # safetensors writes 0600 files; an export must be readable as any other file the user writes
  with open(tmp_path / "plain.txt", "w") as f:  # the reference: open() under this process's umask
    f.write("x")
  expected = os.stat(tmp_path / "plain.txt").st_mode & 0o777
  params = our_params(reference_model(TINY, seed=6), TINY)
  out = str(tmp_path / "out")
  with export.atomic_dir(out) as tmp:
    export.write_hf_model(tmp, TINY, params, None, dtype="float32", model_card="card", atomic=False,
                          max_shard_bytes=40_000)
    export.write_adapter(os.path.join(tmp, "adapter"), random_adapters(TINY, SPEC, seed=6), TINY, SPEC,
                         base_model="tiny", atomic=False)
  written = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names]
  assert sum(n.endswith(".safetensors") for n in written) > 2  # shards and the adapter
  assert {n: oct(os.stat(n).st_mode & 0o777) for n in written} == {n: oct(expected) for n in written}


# Refusals ------------------------------------------------------------------------------------------

def test_unmerged_or_quantized_params_and_bad_settings_are_refused(tmp_path):
  params = our_params(reference_model(TINY), TINY)
  out = str(tmp_path / "model")
  with pytest.raises(ValueError, match="LoRA factors"):
    export.write_hf_model(out, TINY, PT.combine(params, random_adapters(TINY, SPEC, 0)), None)
  quantized = jax.tree_util.tree_map_with_path(
      lambda p, x: quantize(np.asarray(x), NF4) if p[-2].key == "q_proj" else x, params)
  with pytest.raises(ValueError, match="quantized kernel"):
    export.write_hf_model(out, TINY, quantized, None)
  with pytest.raises(UserError, match="--dtype=float16"):
    export.write_hf_model(out, TINY, params, None, dtype="float16")
  with pytest.raises(UserError, match="temperature"):
    export.write_hf_model(out, TINY, params, None, generation_config={"temperature": 0.6})
  with pytest.raises(UserError, match="unknown field 'temprature'"):
    export.write_hf_model(out, TINY, params, None, generation_config={"do_sample": True, "temprature": 0.6})
  assert not os.path.exists(out)


def test_unscanned_params_export_the_same_tensors(tmp_path):
  reference = reference_model(TIED, seed=6)
  scanned, unscanned = str(tmp_path / "scanned"), str(tmp_path / "unscanned")
  export.write_hf_model(scanned, TIED, our_params(reference, TIED), None, dtype="bfloat16")
  export.write_hf_model(unscanned, TIED, our_params(reference, TIED, scan_layers=False), None, dtype="bfloat16",
                        scan_layers=False)
  a = safetensors.numpy.load_file(os.path.join(scanned, "model.safetensors"))
  b = safetensors.numpy.load_file(os.path.join(unscanned, "model.safetensors"))
  assert a.keys() == b.keys() == set(hf.hf_shapes(TIED))
  for name, value in reference.state_dict().items():
    if name in a:
      np.testing.assert_array_equal(a[name].view(np.uint16), b[name].view(np.uint16), err_msg=name)
      # ml_dtypes and torch both round to nearest even
      expected = value.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
      np.testing.assert_array_equal(a[name].view(np.uint16), expected, err_msg=name)


def test_merged_model_and_adapter_compose_under_one_atomic_directory(tmp_path):
  reference = reference_model(TINY, seed=7)
  params = our_params(reference, TINY)
  adapters = random_adapters(TINY, SPEC, seed=7, scale=0.2)
  prompts = random_prompts(TINY, seed=7)
  out = str(tmp_path / "out")
  with export.atomic_dir(out) as tmp:
    export.write_hf_model(tmp, TINY, merged(PT.combine(params, adapters), SPEC), None, dtype="float32",
                          atomic=False)
    export.write_adapter(os.path.join(tmp, "adapter"), adapters, TINY, SPEC, base_model="tiny", atomic=False)
  assert _siblings(out) == ["out"]
  via_merge = theirs(load_hf(out, dtype=torch.float32), prompts)
  via_peft = theirs(peft.PeftModel.from_pretrained(reference, os.path.join(out, "adapter")).eval(), prompts)
  assert worst(via_merge, via_peft) <= 1e-5
