"""Architecture of a LLaMA-3 family model, presets, the HF config.json mapping, and the
allowed values of the model's options. Plain Python: importable without JAX."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from anita_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """The `llama3` rope_scaling of Llama 3.1+ (transformers' `_compute_llama3_parameters`)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What a checkpoint's architecture is; nothing about how it is run."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UserError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")

  @property
  def num_params(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  def to_hf(self) -> dict[str, Any]:
    """The transformers `config.json` of this architecture (LlamaForCausalLM)."""
    eos = list(self.eos_token_ids)
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if self.rope_scaling is not None:
      out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    return out


def from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Maps an HF LLaMA `config.json` (transformers 4.x or 5.x spelling) to a ModelConfig."""

  def get(key, default=None, required=False):
    if key in hf and hf[key] is not None:
      return hf[key]
    if required:
      raise UserError(f"{source}: field '{key}' is missing")
    return default

  model_type = get("model_type", "llama")
  if model_type != "llama":
    raise UserError(f"{source}: field 'model_type' is '{model_type}', expected 'llama'")
  for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if get(key, expected) != expected:
      raise UserError(f"{source}: field '{key}'={hf[key]!r} is not supported (expected {expected!r})")

  # transformers 5 moves rope_theta/rope_scaling into `rope_parameters`.
  rope = dict(get("rope_parameters", {}) or {})
  scaling = get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  theta = get("rope_theta", rope.get("rope_theta", 10000.0))
  rope_scaling = None
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
      raise UserError(f"{source}: field 'rope_scaling' has rope_type {kind!r}; only 'llama3' is supported")
    rope_scaling = RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))

  hidden = int(get("hidden_size", required=True))
  heads = int(get("num_attention_heads", required=True))
  eos = get("eos_token_id")
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
  return ModelConfig(
      vocab_size=int(get("vocab_size", required=True)),
      hidden_size=hidden,
      intermediate_size=int(get("intermediate_size", required=True)),
      num_layers=int(get("num_hidden_layers", required=True)),
      num_heads=heads,
      num_kv_heads=int(get("num_key_value_heads", heads)),
      head_dim=int(get("head_dim", hidden // heads)),
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      max_position_embeddings=int(get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(get("tie_word_embeddings", False)),
      bos_token_id=get("bos_token_id"),
      eos_token_ids=tuple(int(e) for e in eos),
  )


_LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
    max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000)

PRESETS: dict[str, ModelConfig] = {
    # meta-llama/Meta-Llama-3-8B(-Instruct); the Instruct config.json lists eos 128009.
    "llama3-8b": ModelConfig(**_LLAMA3_8B, eos_token_ids=(128009,)),
    # meta-llama/Llama-3.1-8B-Instruct.
    "llama3.1-8b": ModelConfig(**{
        **_LLAMA3_8B, "max_position_embeddings": 131072,
        "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 8192)}, eos_token_ids=(128001, 128008, 128009)),
    # meta-llama/Llama-3.2-1B-Instruct.
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    # HuggingFaceTB/SmolLM2-135M-Instruct.
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
        eos_token_ids=(2,)),
    # A tiny random model for tests: GQA, untied, llama3 rope scaling.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
        eos_token_ids=(2,)),
}


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# Training/eval attention: plain [T, S] scores | blockwise Pallas TPU kernels (splash: causal + segments;
# flash: also packed DPO pairs, masks from the ids at run time).
ATTENTION_KINDS = ("dot", "splash", "flash")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """A LoRA adapter on the projections named in `targets` (PEFT's semantics).

  frozen_rank > 0: each projection also carries earlier stages' adapters, frozen, as one low-rank
  term `frozen_a` [in, frozen_rank] @ `frozen_b` [frozen_rank, out] with their scales folded into
  `frozen_b` (stacked stages, `init_as=stacked`). It stays on when the trainable adapter is switched
  off, so the DPO reference is the previous stage's model.
  """

  rank: int
  alpha: float
  dropout: float = 0.0
  rslora: bool = False
  targets: tuple[str, ...] = PROJECTIONS
  frozen_rank: int = 0

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
