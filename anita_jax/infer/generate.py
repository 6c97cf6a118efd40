"""Batched generation: one prefill, then KV-cache decoding inside a compiled while loop.

Prompts are left-padded to a length bucket (powers of two), so a program is
compiled once per (bucket, batch, max_new_tokens) and sampling settings are
runtime values: changing the temperature does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anita_jax import files
from anita_jax.errors import UserError
from anita_jax.infer import score
from anita_jax.model.llama import Llama, init_cache

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters (HF's order: T, k, p)."""

  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def validate(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
    if self.temperature < 0:
      raise UserError(f"temperature={self.temperature} must be >= 0")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k} must be >= 0")


def bucket(length: int) -> int:
  return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def filter_logits(logits_bv, temperature, top_k, top_p):
  """Temperature, then top-k, then top-p (nucleus), as transformers' logits warpers; fp32."""
  logits = logits_bv.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
  vocab = logits.shape[-1]
  kth = sorted_desc[:, jnp.clip(top_k - 1, 0, vocab - 1)][:, None]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  sorted_desc = jnp.where((top_k > 0) & (sorted_desc < kth), -jnp.inf, sorted_desc)
  # Keep the smallest set of top tokens whose probability reaches top_p (at least one).
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p) | (top_p >= 1)  # fp32 cumsum can reach 1 before the tail
  cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def _next_token(logits_bv, rng, greedy, temperature, top_k, top_p):
  if greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_bv, temperature, top_k, top_p)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(model: Llama, params, tokens_bp, segments_bp, stop_ids, rng, temperature, top_k, top_p,
              *, max_new_tokens: int, greedy: bool):
  """Returns generated ids [B, max_new_tokens] (-1 after a row stopped) and their count."""
  b, p = tokens_bp.shape
  positions_bp = jnp.maximum(jnp.cumsum(segments_bp, axis=1) - 1, 0)
  lengths_b = segments_bp.sum(axis=1)
  kv_segments = jnp.concatenate([segments_bp, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
  cache = init_cache(model.config, b, p + max_new_tokens, model.dtype)
  # The head only where a token is predicted: the prompt's last position (prompts are left-padded).
  hidden, cache = model.apply({"params": params}, tokens_bp, positions_bp, segments_bp, cache=cache,
                              cache_offset=0, kv_segment_ids_bs=kv_segments, logits=False)
  rng, step_rng = jax.random.split(rng)
  token = _next_token(score.head_logits(model, params, hidden[:, -1]), step_rng, greedy, temperature, top_k, top_p)
  out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, stop_ids)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, token, cache, done, out, rng = state
    hidden, cache = model.apply(
        {"params": params}, token[:, None], (lengths_b + i - 1)[:, None], jnp.ones((b, 1), jnp.int32),
        cache=cache, cache_offset=p + i - 1, kv_segment_ids_bs=kv_segments, logits=False)
    rng, step_rng = jax.random.split(rng)
    token = _next_token(score.head_logits(model, params, hidden[:, -1]), step_rng, greedy, temperature, top_k,
                        top_p)
    out = out.at[:, i].set(jnp.where(done, -1, token))
    done = done | jnp.isin(token, stop_ids)
    return i + 1, token, cache, done, out, rng

  state = (jnp.int32(1), token, cache, done, out, rng)
  i, _, _, _, out, _ = jax.lax.while_loop(cond, body, state)
  return out, i


class Generator:
  """Generates from token ids, plain strings or chat messages with one model and tokenizer."""

  def __init__(self, model: Llama, params, tokenizer, stop_ids: Sequence[int], max_length: int,
               batch_size: int = 8):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.stop_ids = jnp.asarray(sorted(set(stop_ids)) or [-2], jnp.int32)
    self.max_length = max_length
    self.batch_size = batch_size

  def encode(self, prompt: str, system: str | None = None, chat: bool = True) -> list[int]:
    if not chat:
      return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
      ids = ids["input_ids"]
    return list(ids)

  def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec,
                   seed: int = 0) -> list[list[int]]:
    """Generated ids per prompt, stop token excluded."""
    sampling.validate()
    results: list[list[int]] = []
    rng = jax.random.key(seed)
    for start in range(0, len(prompts), self.batch_size):
      chunk = [list(p) for p in prompts[start:start + self.batch_size]]
      for row, ids in enumerate(chunk, start + 1):
        if not ids:
          raise UserError(f"prompt {row}: empty after tokenization")
        if len(ids) + sampling.max_new_tokens > self.max_length:
          raise UserError(
              f"prompt {row}: {len(ids)} tokens + max_new_tokens={sampling.max_new_tokens} exceed the "
              f"model's context of {self.max_length} tokens (max_position_embeddings)")
      p = bucket(max(len(ids) for ids in chunk))
      b = bucket(len(chunk)) if len(chunk) > 1 else 1
      tokens = np.zeros((b, p), np.int32)
      segments = np.zeros((b, p), np.int32)
      for row, ids in enumerate(chunk):
        tokens[row, p - len(ids):] = ids
        segments[row, p - len(ids):] = 1
      segments[len(chunk):, -1] = 1  # filler rows: one token, so no row is all padding
      rng, chunk_rng = jax.random.split(rng)
      out, _ = _generate(
          self.model, self.params, jnp.asarray(tokens), jnp.asarray(segments), self.stop_ids, chunk_rng,
          jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
          max_new_tokens=sampling.max_new_tokens, greedy=sampling.temperature == 0)
      stops = set(np.asarray(self.stop_ids).tolist())
      for row in np.asarray(out)[:len(chunk)]:
        ids = []
        for t in row.tolist():
          if t < 0 or t in stops:
            break
          ids.append(t)
        results.append(ids)
    return results

  def generate(self, prompts: Sequence[str], sampling: SamplingSpec, *, system: str | None = None,
               chat: bool = True, seed: int = 0) -> list[str]:
    ids = self.generate_ids([self.encode(p, system, chat) for p in prompts], sampling, seed)
    return [self.tokenizer.decode(x, skip_special_tokens=True) for x in ids]


def read_prompts_file(path: str) -> list[dict]:
  """Rows {"prompt": str, "system"?: str} of a JSONL file, validated row by row."""
  rows = []
  for number, row in files.read_jsonl(path):
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
      raise UserError(f"{path}:{number}: field 'prompt' must be a non-empty string")
    if row.get("system") is not None and not isinstance(row["system"], str):
      raise UserError(f"{path}:{number}: field 'system' must be a string")
    rows.append(row)
  if not rows:
    raise UserError(f"{path}: no prompts")
  return rows

