"""Presets against the published config.json files; config.json round trips."""

import json
import os

import pytest
import transformers

from anita_jax.model import config as cfg
from anita_jax.errors import UserError

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_configs")
PUBLISHED = {
    "llama3-8b": "Meta-Llama-3-8B-Instruct.json",
    "llama3.1-8b": "Llama-3.1-8B-Instruct.json",
    "llama3.2-1b": "Llama-3.2-1B-Instruct.json",
    "smollm2-135m": "SmolLM2-135M-Instruct.json",
}


def _published(name):
  with open(os.path.join(DATA, PUBLISHED[name])) as f:
    return json.load(f)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_config_field_by_field(name):
  published = _published(name)
  preset = cfg.PRESETS[name]
  # Each field of the preset, read straight from the published JSON (not through from_hf).
  scaling = published.get("rope_scaling")
  expected = {
      "vocab_size": published["vocab_size"],
      "hidden_size": published["hidden_size"],
      "intermediate_size": published["intermediate_size"],
      "num_layers": published["num_hidden_layers"],
      "num_heads": published["num_attention_heads"],
      "num_kv_heads": published["num_key_value_heads"],
      "head_dim": published.get("head_dim", published["hidden_size"] // published["num_attention_heads"]),
      "rope_theta": float(published["rope_theta"]),
      "rope_scaling": None if scaling is None else cfg.RopeScaling(
          scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
          scaling["original_max_position_embeddings"]),
      "rms_norm_eps": published["rms_norm_eps"],
      "max_position_embeddings": published["max_position_embeddings"],
      "tie_word_embeddings": published["tie_word_embeddings"],
      "bos_token_id": published["bos_token_id"],
      "eos_token_ids": tuple(published["eos_token_id"]) if isinstance(published["eos_token_id"], list)
                       else (published["eos_token_id"],),
  }
  for field, value in expected.items():
    assert getattr(preset, field) == value, field
  assert cfg.from_hf(published) == preset


@pytest.mark.parametrize("name", sorted(cfg.PRESETS))
def test_transformers_reads_our_config_back(name):
  preset = cfg.PRESETS[name]
  hf = transformers.LlamaConfig(**preset.to_hf())
  assert cfg.from_hf(hf.to_dict()) == preset  # transformers 5 spelling (rope_parameters)


@pytest.mark.parametrize("name", sorted(cfg.PRESETS))
def test_param_count_equals_transformers_model(name):
  import torch
  with torch.device("meta"):  # shapes only: the 8B models cost nothing here
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.PRESETS[name].to_hf()))
  # parameters() yields a tied embedding once.
  assert cfg.PRESETS[name].num_params == sum(p.numel() for p in model.parameters())


def test_param_count_of_llama3_8b():
  assert cfg.PRESETS["llama3-8b"].num_params == 8_030_261_248  # Meta's published count


@pytest.mark.parametrize("change, field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
])
def test_unsupported_config_names_the_field(change, field):
  published = {**_published("smollm2-135m"), **change}
  with pytest.raises(UserError, match=field):
    cfg.from_hf(published, source="x/config.json")


def test_missing_field_names_the_field():
  published = _published("smollm2-135m")
  del published["hidden_size"]
  with pytest.raises(UserError, match="x/config.json: field 'hidden_size' is missing"):
    cfg.from_hf(published, source="x/config.json")
