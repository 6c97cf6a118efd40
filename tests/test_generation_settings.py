"""Generation settings of every model PATH kind: a workdir samples as its export does, a PEFT adapter as its
base, a GGUF file and a config without `do_sample` greedily; transformers' GenerationConfig is the reference
for what a generation_config.json means."""

import json
import os

import pytest

from anita_jax.apps.commands import sampling_spec
from anita_jax.convert import generation
from anita_jax.infer.generate import SamplingSpec
from anita_jax.train import loop as T
from anita_jax.train import publish
from anita_jax.train import workdir as W

SAMPLED = {"generation.temperature": 0.6, "generation.top_p": 0.9, "generation.top_k": 20,
           "generation.max_new_tokens": 64}


@pytest.mark.parametrize("config", [
    {}, {"do_sample": False, "max_new_tokens": 12}, {"do_sample": True},
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {"do_sample": True, "top_k": 0, "max_new_tokens": 7},
])
def test_sampling_is_what_transformers_decodes_with(config):
  import transformers
  gc = transformers.GenerationConfig(**config)
  unset = transformers.GenerationConfig._get_default_generation_params()  # what generate() applies for None
  value = lambda key: unset[key] if getattr(gc, key) is None else getattr(gc, key)  # noqa: E731
  want = ({k: value(k) for k in ("temperature", "top_p", "top_k")} if value("do_sample")
          else {"temperature": 0.0, "top_p": 1.0, "top_k": 0})
  got = generation.sampling(config)
  assert {k: got[k] for k in want} == pytest.approx(want)
  assert got["max_new_tokens"] == gc.max_new_tokens


def test_none_is_greedy_and_a_gguf_file_has_none(smollm2_gguf):
  assert W.generation_config(smollm2_gguf) is None
  assert sampling_spec(smollm2_gguf) == SamplingSpec(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0)


def test_a_hub_id_reads_its_generation_config_through_the_hub_cache(tmp_path, monkeypatch):
  import huggingface_hub
  from huggingface_hub.errors import EntryNotFoundError
  file = tmp_path / "generation_config.json"
  file.write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
  asked = []

  def download(repo, name, **kwargs):
    asked.append((repo, name))
    if repo == "org/none":
      raise EntryNotFoundError("no such file")
    return str(file)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  assert W.generation_config("org/model") == {"do_sample": True, "temperature": 0.7}
  assert W.generation_config("org/none") is None
  assert asked == [("org/model", "generation_config.json"), ("org/none", "generation_config.json")]


@pytest.mark.slow
def test_a_workdir_its_export_and_its_adapter_pick_their_settings_alike(demo_config, tiny_hf_dir, tmp_path):
  import transformers
  c = demo_config("sft")
  c.model.path, c.quant.type = tiny_hf_dir, "none"
  c.data.eval, c.data.max_rows, c.data.max_length, c.data.packing = "", 8, 128, False
  c.train.batch_size, c.train.steps, c.train.log_every = 4, 1, 1
  c.train.warmup_steps, c.train.warmup_ratio, c.train.eval_on_start = 0, 0.0, False
  c.checkpoint.every, c.mesh.data = 1000, 1
  c.update_from_flattened_dict(SAMPLED)
  workdir, out = str(tmp_path / "sft"), str(tmp_path / "hf")
  T.train_and_evaluate(c, workdir)
  publish.export_hf(workdir, out, dtype="float32")

  exported = transformers.GenerationConfig.from_pretrained(out)  # what transformers samples the export with
  want = SamplingSpec(max_new_tokens=exported.max_new_tokens, temperature=exported.temperature,
                      top_p=exported.top_p, top_k=exported.top_k)
  assert exported.do_sample and want == SamplingSpec(max_new_tokens=64, temperature=0.6, top_p=0.9, top_k=20)
  assert sampling_spec(workdir) == want
  assert sampling_spec(out) == want
  assert sampling_spec(workdir, temperature=0.0, max_new_tokens=5) == SamplingSpec(5, 0.0, 0.9, 20)  # flags win

  # The PEFT adapter decodes with its base model's generation config (here: the base's, greedy).
  adapter = os.path.join(out, "adapter")
  with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
    adapter_config = json.load(f)
  adapter_config["base_model_name_or_path"] = tiny_hf_dir  # the export names only hub bases
  with open(os.path.join(adapter, "adapter_config.json"), "w", encoding="utf-8") as f:
    json.dump(adapter_config, f)
  base = transformers.GenerationConfig.from_pretrained(tiny_hf_dir)
  assert not base.do_sample
  assert W.generation_config(adapter) == W.generation_config(tiny_hf_dir)
  assert sampling_spec(adapter) == SamplingSpec(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0)
