"""The one token scorer: log p(token | prefix) of a batch under a model, for training, eval and reports.

`token_stats` runs the model to its final normed hidden states and applies the
head itself, a few positions at a time (`head.head_token_stats`): the
[B, T, V] logits are never materialised. A head that is being trained needs
its own gradient, so `head_trainable=True` takes the plain logits path.
`head_logits` gives the logits of selected positions (lm-eval's scorer).

Packed DPO pairs (`data.preference`, packing) carry `branch_ids` (passed to the
model's attention) and `prev_index`: token t is predicted by the output at
`prev_index[t]`, which is t - 1 except for a rejected completion's first token
(predicted by the last prompt token, an earlier pair member in the row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anita_jax.model import losses
from anita_jax.model.head import head_token_stats
from anita_jax.model import quant as Q

Array = jax.Array


def _apply(model, params, batch, rngs, logits: bool, **model_kwargs):
  out, _ = model.clone(**model_kwargs).apply(
      {"params": params}, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), rngs=rngs or {},
      branch_ids_bt=batch.get("branch_ids"), logits=logits)
  return out


def _predictors(x_btz: Array, prev_index_bt: Array) -> Array:
  """x'' [B, T, Z] with x''[t] = x[prev_index[t + 1]] (x[T - 1] at t = T - 1): the output predicting
  token t + 1 moved to position t, where the one-token shift of `losses` expects it."""
  src_bt = jnp.concatenate([prev_index_bt[:, 1:], prev_index_bt[:, -1:]], axis=1)
  return jnp.take_along_axis(x_btz, src_bt[..., None], axis=1)


def hidden_states(model, params, batch, *, rngs=None, **model_kwargs) -> Array:
  """The final normed hidden states [B, T, D] in the model's dtype."""
  return _apply(model, params, batch, rngs, False, **model_kwargs)


def head(model, params) -> tuple[Array, bool]:
  """(head matrix, vocab_major): the tied embedding [V, D] or the lm_head kernel [D, V], dequantized."""
  if model.config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"], True
  return Q.dequantize(params["lm_head"]["kernel"], model.dtype), False


def head_logits(model, params, hidden_bcd: Array) -> Array:
  """fp32 logits [..., V] of hidden states [..., D], as `Llama.__call__` computes them (before it rounds
  them to its dtype). A float32 head is used as it is, the hidden states cast up to it (the same product):
  for bfloat16 on CPU `convert.loading` keeps the vocab tables in float32, because XLA:CPU would otherwise
  convert the bf16 table to a float32 copy, hoisted out of the decoding loop."""
  if model.config.tie_word_embeddings:
    w, vocab_major = params["embed_tokens"]["embedding"], True
  else:
    w, vocab_major = params["lm_head"]["kernel"], False
  if getattr(w, "dtype", None) != jnp.float32:
    w = Q.dequantize(w, model.dtype)
  return jnp.dot(hidden_bcd.astype(w.dtype), w.T if vocab_major else w, preferred_element_type=jnp.float32)


def token_stats(model, params, batch, *, head_trainable: bool = False, chunk: int = 16, rngs=None,
                prev_index: Array | None = None, **model_kwargs) -> tuple[Array, Array]:
  """(log p of each token given the tokens before it [B, T], mean logit predicting it [B, T]), fp32,
  0 at t = 0 (see `losses.token_stats`). model_kwargs override module fields (adapters_enabled, ...).

  prev_index: int [B, T], the position whose output predicts token t (packed DPO pairs); None: t - 1.
  """
  if head_trainable:  # the head's own gradient needs the plain logits
    logits = _apply(model, params, batch, rngs, True, **model_kwargs)
    if prev_index is not None:
      logits = _predictors(logits, prev_index)
    return losses.token_stats(logits, batch["input_ids"])
  hidden = hidden_states(model, params, batch, rngs=rngs, **model_kwargs)
  if prev_index is not None:
    hidden = _predictors(hidden, prev_index)
  w, vocab_major = head(model, params)
  return head_token_stats(hidden, w, batch["input_ids"], vocab_major=vocab_major, chunk=chunk)
