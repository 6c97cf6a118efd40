"""Our parameter tree -> a llama.cpp GGUF file (the inverse of `convert.gguf`).

What llama.cpp's `convert_hf_to_gguf.py` writes for a `LlamaForCausalLM`, from a merged tree:
- tensors `token_embd`, `blk.{i}.attn_q/k/v/output`, `blk.{i}.ffn_gate/up/down`, `blk.{i}.attn_norm`,
  `blk.{i}.ffn_norm`, `output_norm`, `output` (absent when tied), [out, in] in numpy order (GGUF lists
  dims innermost first); q_proj/k_proj rows permuted from HF's rotate_half halves into llama.cpp's
  interleaved pairs (`permute_rotary`, undone by `convert.gguf._unpermute`); Llama 3.1+ `llama3` rope
  scaling as the `rope_freqs` tensor of per-frequency divisors (`rope_freq_factors`);
- `llama.*` hyperparameters and a byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2"): tokens,
  token types, merges, special ids, `tokenizer.ggml.pre` (the pre-tokenizer llama.cpp must apply,
  recognised as llama.cpp does: by hashing the ids of a fixed text), the chat template.

Types: f32 | f16 | bf16 | q8_0 | q4_0, through `gguf.quants.quantize` (numpy). Norms and `rope_freqs`
stay F32; a row that is not a whole number of quantization blocks falls back to F16 (as the converter
does); with q4_0 the output projection (the embedding when tied) is Q8_0, where llama-quantize would pick
Q6_K, which numpy cannot write. K-quants (q4_k_m, ...) are made by llama.cpp's `llama-quantize` from
an f16 file: `check_type` refuses them with the command.

The file is streamed: tensor infos are planned from the shapes, then each tensor is converted,
quantized and written in turn, so host memory beyond the parameters stays under one tensor. It is
written through `files.atomic_write`: an interrupted export leaves no partial FILE.gguf.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from hashlib import sha256

import numpy as np

from anita_jax import files
from anita_jax.convert import hf
from anita_jax.convert.gguf import _LAYER_NAMES, _ROOT_NAMES
from anita_jax.errors import UserError
from anita_jax.model.config import ModelConfig

# --type -> (ggml tensor type name, llama.cpp file type name).
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# llama-quantize's names of the types the `gguf` package cannot make (K-quants, i-quants).
LLAMA_QUANTIZE_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                        "q6_k", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs")

# convert_hf_to_gguf.py's `get_vocab_base_pre`: sha256 of str(ids of _CHECK_TEXT) -> pre-tokenizer name.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3(.1, .2)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}
# Token types (gguf.TokenType): NORMAL 1, CONTROL 3, USER_DEFINED 4, UNUSED 5.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# End-of-turn tokens of the chat formats we write (llama.cpp also finds these by their text).
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>")

# HF names -> GGUF names: the inverse of the importer's tables.
_ROOT_GGUF = {hf_name: name for name, hf_name in _ROOT_NAMES.items()}
_LAYER_GGUF = {hf_name: name for name, hf_name in _LAYER_NAMES.items()}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def check_type(type: str) -> None:  # noqa: A002 - the flag's name
  """UserError for a --type this writer cannot make; for a K-quant it names the llama-quantize command."""
  if type in TYPES:
    return
  if type.lower() in LLAMA_QUANTIZE_TYPES:
    raise UserError(
        f"--type={type}: K-quants are made by llama.cpp, not here; write an f16 file and quantize it: "
        f"python scripts/export_gguf.py --model=PATH --output=MODEL-f16.gguf --type=f16 && "
        f"{quantize_command('MODEL-f16.gguf', f'MODEL-{type.lower()}.gguf', type)}")
  raise UserError(f"--type={type}: expected one of {', '.join(TYPES)} (K-quants such as q4_k_m: "
                  "llama.cpp's llama-quantize, from an f16 file)")


def quantize_command(f16_file: str, out_file: str, type: str) -> str:  # noqa: A002
  """llama.cpp's command that makes a K-quant (e.g. q4_k_m) from an f16 GGUF file."""
  return f"llama-quantize {f16_file} {out_file} {type.upper()}"


def check_config(config: ModelConfig, source: str = "model") -> None:
  """UserError for an architecture the llama GGUF layout cannot express."""
  if config.num_heads % config.num_kv_heads or config.head_dim % 2:
    raise UserError(f"{source}: heads {config.num_heads}/{config.num_kv_heads} with head_dim "
                    f"{config.head_dim} cannot be written as a llama GGUF")


# Tensors ----------------------------------------------------------------------------------------

def gguf_name(hf_name: str) -> str:
  """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (llama.cpp's names)."""
  if hf_name in _ROOT_GGUF:
    return _ROOT_GGUF[hf_name]
  m = _LAYER_RE.match(hf_name)
  if m is None or m.group(2) not in _LAYER_GGUF:
    raise ValueError(f"{hf_name}: no GGUF name")
  return f"blk.{m.group(1)}.{_LAYER_GGUF[m.group(2)]}.weight"


def permute_rotary(w_oi: np.ndarray, heads: int) -> np.ndarray:
  """HF's rotate_half rows (per head: first halves, then second halves) -> llama.cpp's interleaved pairs.

  convert_hf_to_gguf's `LlamaModel.permute`; [heads * H, in] -> same shape.
  """
  half = w_oi.shape[0] // heads // 2
  return w_oi.reshape(heads, 2, half, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def rope_freq_factors(config: ModelConfig) -> np.ndarray | None:
  """[H/2] fp32 divisors of the rotary frequencies for `llama3` rope scaling (None without scaling).

  llama.cpp divides frequency i by factor i; convert_hf_to_gguf's `generate_extra_tensors`, in fp32.
  """
  s = config.rope_scaling
  if s is None:
    return None
  dim = config.head_dim
  freqs = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  factors = []
  for freq in freqs.astype(np.float32):
    wavelen = np.float32(2 * math.pi) / freq
    if wavelen < high_wavelen:
      factors.append(1.0)
    elif wavelen > low_wavelen:
      factors.append(s.factor)
    else:
      smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
          s.high_freq_factor - s.low_freq_factor)
      factors.append(1 / ((1 - smooth) / s.factor + smooth))
  return np.asarray(factors, np.float32)


def _tensor_type(name: str, shape: tuple[int, ...], type: str, tied: bool):  # noqa: A002
  import gguf
  q = gguf.GGMLQuantizationType
  if len(shape) <= 1 or name.endswith("_norm.weight"):
    return q.F32  # llama.cpp's kernels take norms and vectors in F32 only
  wanted = q[TYPES[type][0]]
  if wanted == q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
    wanted = q.Q8_0  # the output projection is the most sensitive tensor (llama-quantize: Q6_K)
  block = gguf.GGML_QUANT_SIZES[wanted][0]
  if shape[-1] % block:
    return q.F16  # as the converter's fallback for rows that are not whole blocks
  return wanted


def tensor_plan(config: ModelConfig, type: str) -> list[tuple[str, tuple[int, ...], object]]:  # noqa: A002
  """(GGUF name, numpy shape, ggml type) of every tensor the file holds, in file order."""
  shapes = [(gguf_name(n), shape) for n, shape in hf.hf_shapes(config).items()]
  if config.rope_scaling is not None:
    shapes.insert(0, ("rope_freqs.weight", (config.head_dim // 2,)))
  return [(n, s, _tensor_type(n, s, type, config.tie_word_embeddings)) for n, s in shapes]


def gguf_tensors(config: ModelConfig, params: dict, scan_layers: bool = True) -> Iterator[tuple[str, np.ndarray]]:
  """(GGUF name, fp32 array in numpy order) one tensor at a time, in `tensor_plan` order."""
  factors = rope_freq_factors(config)
  if factors is not None:
    yield "rope_freqs.weight", factors
  for hf_name, array in hf.to_hf_tensors(config, params, scan_layers=scan_layers):
    array = np.asarray(array, np.float32)
    if hf_name.endswith("q_proj.weight"):
      array = permute_rotary(array, config.num_heads)
    elif hf_name.endswith("k_proj.weight"):
      array = permute_rotary(array, config.num_kv_heads)
    yield gguf_name(hf_name), array


# Tokenizer --------------------------------------------------------------------------------------

def _backend_json(tokenizer, source: str) -> dict:
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise UserError(f"{source}: the tokenizer has no fast (tokenizers) backend; GGUF export needs one")
  return json.loads(backend.to_str())


def pre_tokenizer_name(tokenizer, source: str = "tokenizer") -> str:
  """llama.cpp's `tokenizer.ggml.pre` for this tokenizer, found as convert_hf_to_gguf finds it."""
  ids = list(tokenizer.encode(_CHECK_TEXT, add_special_tokens=False))
  candidates = [ids]
  if tokenizer.bos_token_id is not None:
    candidates.append([int(tokenizer.bos_token_id)] + ids)  # the hashes were taken with the BOS the hub adds
  for candidate in candidates:
    name = PRE_TOKENIZERS.get(sha256(str(candidate).encode()).hexdigest())
    if name:
      return name
  raise UserError(f"{source}: the tokenizer's pre-tokenizer is not one this exporter knows for the llama "
                  f"architecture ({', '.join(f'{v}' for v in PRE_TOKENIZERS.values())}); llama.cpp would "
                  "tokenize differently")


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
  """(tokens, token types) for ids 0..vocab_size-1, as convert_hf_to_gguf's `get_vocab_base`.

  Added tokens that are special (or look it: `<|...|>`) are CONTROL, other added tokens USER_DEFINED,
  ids without a token `[PAD{i}]` UNUSED.
  """
  reverse = {i: t for t, i in tokenizer.get_vocab().items()}
  added = tokenizer.get_added_vocab()
  decoder = tokenizer.added_tokens_decoder
  tokens, types = [], []
  for i in range(vocab_size):
    token = reverse.get(i)
    if token is None:
      tokens.append(f"[PAD{i}]")
      types.append(_UNUSED)
      continue
    kind = _NORMAL
    if token in added:
      if not decoder[i].normalized:  # llama.cpp takes added tokens as pre-normalized text
        token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
      looks_special = token.startswith("<|") and token.endswith("|>")
      kind = _CONTROL if decoder[i].special or looks_special else _USER_DEFINED
      if kind == _USER_DEFINED:
        token = token.replace("\u2581", " ")
    tokens.append(token)
    types.append(kind)
  return tokens, types


def _special_vocab(tokenizer, config: ModelConfig, vocab_size: int):
  """(gguf.SpecialVocab, add_prefix_space or None) of the tokenizer's saved files, read as the converter
  reads a model directory (merges, special ids, add_bos/eos flags, chat template)."""
  import gguf
  with tempfile.TemporaryDirectory(prefix="anita-gguf-tokenizer-") as directory:
    tokenizer.save_pretrained(directory)
    eos = list(config.eos_token_ids)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
      json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if eos else None}, f)
    with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
      prefix_space = json.load(f).get("add_prefix_space")
    return gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size), prefix_space


def _byte_level_prefix_space(pre_tokenizer: dict | None) -> bool | None:
  """add_prefix_space of the ByteLevel step of a tokenizers pre-tokenizer (None without one)."""
  steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
  return next((bool(p.get("add_prefix_space")) for p in steps if p.get("type") == "ByteLevel"), None)


def add_tokenizer(writer, tokenizer, config: ModelConfig, source: str = "tokenizer") -> None:
  """The tokenizer.ggml.* keys and tokenizer.chat_template of a byte-level BPE tokenizer."""
  backend = _backend_json(tokenizer, source)
  model = backend.get("model", {})
  if model.get("type") != "BPE":
    raise UserError(f"{source}: the tokenizer is a {model.get('type')} model; GGUF export writes byte-level "
                    "BPE tokenizers (Llama 3, SmolLM2)")
  if len(tokenizer) > config.vocab_size:
    raise UserError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                    f"{config.vocab_size}")
  tokens, types = vocabulary(tokenizer, config.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, source))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  special, prefix_space = _special_vocab(tokenizer, config, config.vocab_size)
  if prefix_space is None:  # not in tokenizer_config.json: what the byte-level pre-tokenizer does
    prefix_space = _byte_level_prefix_space(backend.get("pre_tokenizer"))
  if isinstance(prefix_space, bool):
    writer.add_add_space_prefix(prefix_space)
  if not special.merges:
    raise UserError(f"{source}: the tokenizer has no BPE merges")
  # What encoding really does decides BOS/EOS, whatever the files claim.
  probe = list(tokenizer("a")["input_ids"])
  special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
  if tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]:
    special.add_special_token["eos"] = True
  vocab = tokenizer.get_vocab()
  eot = next((vocab[t] for t in EOT_TOKENS if t in vocab), None)
  if eot is not None:
    special.special_token_ids.setdefault("eot", int(eot))
  template = getattr(tokenizer, "chat_template", None)
  if isinstance(template, dict):
    template = template.get("default")
  if template:
    special.chat_template = str(template)
  special.add_to_gguf(writer, quiet=True)


# The file ---------------------------------------------------------------------------------------

def _nbytes(shape: tuple[int, ...], ttype) -> int:
  import gguf
  block, size = gguf.GGML_QUANT_SIZES[ttype]
  return math.prod(shape) // block * size


def add_hyperparameters(writer, config: ModelConfig, type: str, name: str) -> None:  # noqa: A002
  import gguf
  writer.add_type(gguf.GGUFType.MODEL)
  writer.add_name(name)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_file_type(gguf.LlamaFileType[TYPES[type][1]])
  writer.add_vocab_size(config.vocab_size)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(out_file: str, config: ModelConfig, params: dict, tokenizer, *, type: str = "f16",  # noqa: A002
               scan_layers: bool = True, name: str = "", progress: bool = False) -> None:
  """Writes `out_file` (atomically): a llama GGUF that llama.cpp, Ollama and transformers load.

  params: a merged tree of plain arrays (`lora.merge_lazily` first), kernels [in, out]; layers stacked
    (`scan_layers=True`) or as `layers_{i}`.
  tokenizer: the model's transformers tokenizer (byte-level BPE), with its chat template.
  type: f32 | f16 | bf16 | q8_0 | q4_0 (see the module doc); others raise UserError.
  name: `general.name` (default: the file's name without `.gguf`).
  progress: a tensor count on stderr (a terminal only).
  """
  import gguf
  check_type(type)
  check_config(config, out_file)
  out_file = files.absolute(out_file)
  if files.isdir(out_file):
    raise UserError(f"{out_file}: is a directory (--output names the .gguf file)")
  files.makedirs(os.path.dirname(out_file))
  name = name or os.path.basename(out_file).removesuffix(".gguf")
  plan = tensor_plan(config, type)
  progress = progress and sys.stderr.isatty()
  step = max(1, len(plan) // 50)

  def write(tmp: str) -> None:
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
      add_hyperparameters(writer, config, type, name)
      add_tokenizer(writer, tokenizer, config, source=out_file)
      for tname, shape, ttype in plan:
        writer.add_tensor_info(tname, shape, np.dtype(np.float32), _nbytes(shape, ttype), raw_dtype=ttype)
      writer.write_header_to_file()
      writer.write_kv_data_to_file()
      writer.write_ti_data_to_file()
      tensors = gguf_tensors(config, params, scan_layers)
      for i, ((tname, shape, ttype), (got, array)) in enumerate(zip(plan, tensors, strict=True)):
        if got != tname or tuple(array.shape) != tuple(shape):
          raise ValueError(f"params: tensor {got} {tuple(array.shape)} where {tname} {shape} was planned")
        writer.write_tensor_data(gguf.quants.quantize(array, ttype))
        if progress and ((i + 1) % step == 0 or i + 1 == len(plan)):
          print(f"\rgguf: {i + 1}/{len(plan)} tensors", end="", file=sys.stderr, flush=True)
      if progress:
        print(file=sys.stderr)
    finally:
      writer.close()

  files.atomic_write(out_file, write)
