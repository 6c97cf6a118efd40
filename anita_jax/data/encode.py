"""SFT and LM rows -> token ids and loss masks, through the tokenizer's own chat template.

Token convention: `loss_mask[t] = 1` means token t is a target, scored against the model's output
at t - 1. So the first token of every sequence (packed or not) is never a target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from anita_jax.data import parallel
from anita_jax.data.rows import END_OF_TEXT_TOKENS, END_OF_TURN_TOKENS, Row, conversation, describe_sources, \
    detect_format, field, string
from anita_jax.errors import UserError



def _apply_template(tokenizer, chat: list[dict], where: str, **kwargs):
  if not getattr(tokenizer, "chat_template", None):
    raise UserError(f"{where or 'tokenizer'}: the tokenizer has no chat template (use the format 'text')")
  try:
    return tokenizer.apply_chat_template(chat, **kwargs)
  except Exception as e:  # noqa: BLE001 - a template's own raise_exception is about this conversation
    raise UserError(f"{where}: the chat template rejected the conversation ({str(e).splitlines()[0][:200]})") from None


def chat_ids(tokenizer, chat: list[dict], *, add_generation_prompt: bool = False, where: str = "") -> list[int]:
  """`tokenizer.apply_chat_template(chat, tokenize=True)` as a list of ints."""
  out = _apply_template(tokenizer, chat, where, tokenize=True, add_generation_prompt=add_generation_prompt)
  if hasattr(out, "keys"):
    out = out["input_ids"]
  return [int(t) for t in out]


def render(tokenizer, chat: list[dict], *, add_generation_prompt: bool = False, where: str = "") -> str:
  """The chat template's text for `chat`: what `chat_ids` tokenizes (without adding special tokens)."""
  return _apply_template(tokenizer, chat, where, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_mask(tokenizer, chat: list[dict], ids: list[int], where: str = "") -> list[int]:
  """1 on the tokens of each assistant turn after its header: its content and end-of-turn tokens.

  The span of assistant turn k runs from the end of `chat[:k]` rendered with a generation prompt
  (so the header, `<|im_start|>assistant\\n` or `<|start_header_id|>assistant<|end_header_id|>\\n\\n`,
  is context, as at inference) to the end of `chat[:k+1]` rendered: exactly what the model must
  write for that turn, end-of-turn included (ChatML: content `<|im_end|>` `\\n`; Llama-3: content
  `<|eot_id|>`). Each of those renderings must be a prefix of the next and of the whole conversation;
  a template that breaks this is an error. The spans are located in the text, then a token is a
  target when any of its characters is in a span (transformers' rule for `{% generation %}` masks),
  so a token that whitespace merges across the header boundary still maps exactly.
  """
  full = render(tokenizer, chat, where=where)
  spans = []
  for k, m in enumerate(chat):
    if m["role"] != "assistant":
      continue
    start = render(tokenizer, chat[:k], add_generation_prompt=True, where=where)
    stop = full if k == len(chat) - 1 else render(tokenizer, chat[:k + 1], where=where)
    if not stop.startswith(start) or not full.startswith(stop):
      raise UserError(f"{where}: turn {k} (assistant): the chat template does not render the conversation up to "
                      "this turn as a prefix of the whole, so its tokens cannot be located (use mask='all')")
    spans.append((len(start), len(stop)))
  try:
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  except NotImplementedError:
    raise UserError("mask='assistant' needs a fast tokenizer (one that reports character offsets)") from None
  if [int(t) for t in enc["input_ids"]] != ids:
    raise UserError(f"{where}: the chat template's text does not tokenize to its token ids, so assistant tokens "
                    "cannot be located (use mask='all')")
  return [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]


def _special_id(tokenizer, candidates: Sequence[str]) -> int | None:
  added = tokenizer.get_added_vocab()
  for token in candidates:
    if token in added:
      return int(added[token])
  return None


def text_ids(tokenizer, text: str) -> list[int]:
  """Token ids of a plain-text (`lm`) example: [BOS] + text + end-of-turn + end-of-text.

  - BOS: whatever the tokenizer adds on its own (`add_special_tokens=True`): `<|begin_of_text|>`
    for Llama-3, nothing for SmolLM2 (its `bos_token` `<|im_start|>` opens a chat turn, not a text).
  - end-of-turn: the first special token of <|eot_id|>, <|im_end|>, <end_of_turn>, <|end|> in the
    vocabulary (Llama-3 `<|eot_id|>`, ChatML `<|im_end|>`), so that stopping after a text is
    trained as after a chat turn.
  - end-of-text: the first of <|end_of_text|>, <|endoftext|>, </s> in the vocabulary, else
    `tokenizer.eos_token`; skipped when it equals the end-of-turn token or is already last.
  Llama-3: `<|begin_of_text|> TEXT <|eot_id|><|end_of_text|>` (ANITA's `lm` stage);
  SmolLM2: `TEXT <|im_end|><|endoftext|>` (`<|endoftext|>` separates documents in its pretraining).
  """
  ids = [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]
  end_of_text = _special_id(tokenizer, END_OF_TEXT_TOKENS)
  if end_of_text is None:
    end_of_text = tokenizer.eos_token_id
  for tid in (_special_id(tokenizer, END_OF_TURN_TOKENS), end_of_text):
    if tid is not None and (not ids or ids[-1] != tid):
      ids.append(int(tid))
  return ids


@dataclasses.dataclass
class EncodeStats:
  """Counts over a dataset. `dropped` includes rows left with no target token after truncation."""

  rows: int = 0
  kept: int = 0
  truncated: int = 0
  dropped: int = 0
  tokens: int = 0  # kept tokens
  targets: int = 0  # kept target tokens

  def __str__(self) -> str:
    return (f"{self.rows} rows: {self.kept} kept ({self.truncated} truncated), {self.dropped} dropped; "
            f"{self.tokens} tokens, {self.targets} targets")


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized SFT / LM sequence. input_ids int32 [L], loss_mask int32 [L]."""

  input_ids: np.ndarray
  loss_mask: np.ndarray
  where: str = ""

  def preview(self, tokenizer) -> dict:
    """What the trainer consumes, as a JSON-ready dict (special tokens kept in `text`)."""
    ids = [int(t) for t in self.input_ids]
    return {"input_ids": ids, "loss_mask": [int(t) for t in self.loss_mask],
            "text": tokenizer.decode(ids, skip_special_tokens=False)}


def encode_example(row: Row | dict, fmt: str, tokenizer, *, mask: str = "all", max_length: int,
                   truncation: str = "truncate", stats: EncodeStats | None = None
                   ) -> tuple[list[int], list[int]] | None:
  """(input_ids, loss_mask) of one row, or None when dropped (too long with 'drop', or no target left).

  Chat formats go through `tokenizer.apply_chat_template`; `text` through `text_ids`.
  mask='all': every token but the first is a target (ANITA's SFT: loss on all tokens).
  mask='assistant': the assistant turns only, as `assistant_mask` defines them.
  truncation='truncate' keeps the first max_length tokens; 'drop' drops the row.
  """
  row = row if isinstance(row, Row) else Row("row", 1, dict(row))
  fmt = detect_format(row) if fmt == "auto" else fmt
  if mask not in ("all", "assistant"):
    raise UserError(f"mask '{mask}': expected 'all' or 'assistant'")
  if truncation not in ("truncate", "drop"):
    raise UserError(f"truncation '{truncation}': expected 'truncate' or 'drop'")
  if fmt == "preference":
    raise UserError(f"{row.where}: a preference row (chosen/rejected) needs the dpo stage")
  if fmt == "text":
    if mask == "assistant":
      raise UserError(f"{row.where}: mask='assistant' needs a chat format, not 'text'")
    ids = text_ids(tokenizer, string(row, "text", field(row, "text")))
    target = [1] * len(ids)
  else:
    chat = conversation(row, fmt)
    ids = chat_ids(tokenizer, chat, where=row.where)
    target = [1] * len(ids) if mask == "all" else assistant_mask(tokenizer, chat, ids, row.where)
  if target:
    target[0] = 0
  stats = stats if stats is not None else EncodeStats()
  stats.rows += 1
  if len(ids) > max_length:
    if truncation == "drop":
      stats.dropped += 1
      return None
    ids, target = ids[:max_length], target[:max_length]
    stats.truncated += 1
  if not any(target):
    stats.dropped += 1
    return None
  stats.kept += 1
  stats.tokens += len(ids)
  stats.targets += sum(target)
  return ids, target


def encode_rows(rows: Sequence[Row], tokenizer, stats: EncodeStats, *, max_length: int, mask: str = "all",
                truncation: str = "truncate", fmt: str | None = None) -> list[Example]:
  """The kept rows' examples, in order, counted into `stats`: `encode_dataset`'s work on a share of the rows."""
  examples = []
  for row in rows:
    out = encode_example(row, fmt or row.format, tokenizer, mask=mask, max_length=max_length,
                         truncation=truncation, stats=stats)
    if out is not None:
      examples.append(Example(np.asarray(out[0], np.int32), np.asarray(out[1], np.int32), row.where))
  return examples


def encode_dataset(rows: Sequence[Row], tokenizer, *, max_length: int, mask: str = "all",
                   truncation: str = "truncate", fmt: str | None = None, workers: int = 1
                   ) -> tuple[list[Example], EncodeStats]:
  """Every row encoded (each with its own format unless `fmt` is given); UserError if none is left.

  workers > 1: shares of the rows encoded in that many processes (`parallel.encode_rows`), the same result.
  """
  if max_length < 2:
    raise UserError(f"max_length={max_length} must be at least 2")
  stats = EncodeStats()
  examples = parallel.encode_rows(encode_rows, rows, tokenizer, stats, workers=workers, max_length=max_length,
                                  mask=mask, truncation=truncation, fmt=fmt)
  if not examples:
    raise UserError(f"{describe_sources(rows)}: dataset left empty after filtering ({stats}; max_length={max_length}, "
                    f"truncation='{truncation}', mask='{mask}')")
  return examples, stats
