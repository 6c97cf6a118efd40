"""Preference (DPO) data: rows to (prompt, chosen, rejected) token ids exactly as TRL 1.16's DPOTrainer makes them.

TRL 1.16 (`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`), which we follow:
- A row without `prompt`: the prompt is the longest shared prefix of chosen and rejected (whole
  messages for message lists; characters for strings, a space before the divergence going to the
  completions), as `trl.extract_prompt`.
- Conversational rows: prompt ids = the chat template of the prompt messages with a generation
  prompt; prompt+chosen ids = the chat template of prompt + chosen messages (same for rejected).
- String rows: the EOS token's text is appended to chosen and rejected unless they end with it;
  prompt ids = tokenizer(prompt), prompt+chosen ids = tokenizer(prompt + chosen) (the strings are
  joined, then tokenized with the tokenizer's default special tokens: BOS for Llama-3, none for
  SmolLM2).
- The boundary: n = min(common prefix of prompt ids and prompt+chosen ids, same with rejected);
  prompt_ids = prompt ids[:n], chosen_ids = prompt+chosen ids[n:]. Normally n = len(prompt ids);
  when a template renders the prompt differently alone, or tokens merge across the boundary,
  the completion starts where they diverge (TRL warns once; so do we, and count it).
- Truncation (TRL's default truncation_mode 'keep_start'): prompt + completion keeps its first
  max_length tokens, which cuts the end of the completion; a row whose prompt alone has
  max_length tokens or more is dropped.
TRL 1.16 has no max_prompt_length. Ours (optional, ANITA used 512) keeps the last
max_prompt_length tokens of a longer prompt, as TRL's older `truncation_mode='keep_end'` did, before
the max_length rule above.

Rows whose `prompt` is a string while chosen and rejected are message lists (mlabonne/orpo-dpo-mix-40k,
HuggingFaceH4/ultrafeedback_binarized): when the lists start with the user turn, the conversation in
them is complete and the prompt is their shared message prefix (the `prompt` string, a copy of the
user turn, is not used); when they start with an assistant turn, `prompt` is the user turn before them.

Batch ([2B, T], rows 0..B-1 the chosen of the B pairs, rows B..2B-1 their rejected, each prompt +
completion right-padded to T = max_length): input_ids, loss_mask (1 on completion tokens),
segment_ids (1 on tokens, 0 padding), positions; int32. Process p of P materialises rows
[p*2B/P, (p+1)*2B/P) of the global batch, so the global [2B, T] layout holds across processes.

Packed batch (`packing=True`; B rows of T = `packed_row_length(max_length)` = 2 x max_length tokens, so
the longest pair the truncation above lets through, a prompt and two completions of up to max_length - P
tokens, fits one row, and a row holds the tokens of one padded pair): each pair laid out once as
[prompt][chosen][rejected], pairs placed first-fit into rows (never across rows; at most T // 2 per row):
  input_ids, loss_mask  as above (1 on both completions' tokens)
  segment_ids  the pair's 1-based index in its row, 0 = padding
  branch_ids   0 prompt, 1 chosen, 2 rejected (the model's attention: a completion never sees the other)
  positions    prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1 (as in its own sequence)
  prev_index   the index in the row of the token whose output predicts token t: t - 1, except the
               rejected completion's first token, predicted by the prompt's last token
So every completion token gets exactly the log-prob it has in the padded layout; the prompt is computed once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging

from anita_jax.data import batching
from anita_jax.data import encode
from anita_jax.data import parallel
from anita_jax.data import rows as data
from anita_jax.data.rows import Row
from anita_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """Token ids int32: prompt_ids [P], chosen_ids [C], rejected_ids [R] (completions only)."""

  prompt_ids: np.ndarray
  chosen_ids: np.ndarray
  rejected_ids: np.ndarray
  where: str = ""

  def preview(self, tokenizer) -> dict:
    """What the trainer consumes, as a JSON-ready dict (special tokens kept in the texts)."""
    ids = lambda x: [int(t) for t in x]  # noqa: E731
    prompt, chosen, rejected = ids(self.prompt_ids), ids(self.chosen_ids), ids(self.rejected_ids)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "text": tokenizer.decode(prompt + chosen, skip_special_tokens=False),
            "rejected_text": tokenizer.decode(prompt + rejected, skip_special_tokens=False)}


@dataclasses.dataclass
class PreferenceStats:
  rows: int = 0
  kept: int = 0
  truncated: int = 0  # prompt cut by max_prompt_length or a completion cut by max_length
  dropped: int = 0  # prompt of max_length tokens or more
  tokens: int = 0  # prompt + chosen + rejected tokens kept
  boundary_shifted: int = 0  # prompt ids not a prefix of prompt + completion ids
  first_shifted: str = ""  # FILE:ROW of the first such row

  def __str__(self) -> str:
    return (f"{self.rows} rows: {self.kept} kept ({self.truncated} truncated), {self.dropped} dropped "
            f"(prompt of max_length tokens or more); {self.tokens} tokens")


def _ids(tokenizer, text: str) -> list[int]:
  return [int(t) for t in tokenizer(text)["input_ids"]]


def encode_preference(row: Row | dict, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                      stats: PreferenceStats | None = None) -> PreferenceExample | None:
  """The pair's (prompt, chosen, rejected) ids as TRL 1.16 makes them, truncated; None when dropped."""
  row = row if isinstance(row, Row) else Row("row", 1, dict(row))
  stats = stats if stats is not None else PreferenceStats()
  kind, p, c, r = data.preference_parts(row)
  if kind == "chat":
    prompt = encode.chat_ids(tokenizer, p, add_generation_prompt=True, where=row.where)
    full_c = encode.chat_ids(tokenizer, p + c, where=row.where)
    full_r = encode.chat_ids(tokenizer, p + r, where=row.where)
  else:
    eos = tokenizer.eos_token or ""
    c, r = (x if x.endswith(eos) else x + eos for x in (c, r))
    prompt, full_c, full_r = _ids(tokenizer, p), _ids(tokenizer, p + c), _ids(tokenizer, p + r)
  n = min(data.shared_prefix(prompt, full_c), data.shared_prefix(prompt, full_r))
  stats.rows += 1
  if n < len(prompt):
    stats.first_shifted = stats.first_shifted or row.where
    stats.boundary_shifted += 1
  prompt, chosen, rejected = prompt[:n], full_c[n:], full_r[n:]
  truncated = False
  if max_prompt_length is not None and len(prompt) > max_prompt_length:
    prompt, truncated = prompt[len(prompt) - max_prompt_length:], True
  if len(prompt) >= max_length:
    stats.dropped += 1
    return None
  room = max_length - len(prompt)
  if len(chosen) > room or len(rejected) > room:
    chosen, rejected, truncated = chosen[:room], rejected[:room], True
  stats.truncated += truncated
  stats.kept += 1
  stats.tokens += len(prompt) + len(chosen) + len(rejected)
  as_array = lambda x: np.asarray(x, np.int32)  # noqa: E731
  return PreferenceExample(as_array(prompt), as_array(chosen), as_array(rejected), row.where)


def encode_pairs(rows: Sequence[Row], tokenizer, stats: PreferenceStats, *, max_length: int,
                 max_prompt_length: int | None = None) -> list[PreferenceExample]:
  """The kept pairs, in order, counted into `stats`: `encode_preferences`' work on a share of the rows."""
  examples = []
  for row in rows:
    if row.format not in ("preference", "auto"):
      raise UserError(f"{row.where}: the dpo stage needs preference rows (chosen + rejected), got format "
                      f"'{row.format}'")
    ex = encode_preference(row, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, stats=stats)
    if ex is not None:
      examples.append(ex)
  return examples


def encode_preferences(rows: Sequence[Row], tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                       workers: int = 1) -> tuple[list[PreferenceExample], PreferenceStats]:
  """Every row encoded; UserError if none is left. workers > 1: in that many processes, the same result."""
  if max_length < 2:
    raise UserError(f"max_length={max_length} must be at least 2")
  if max_prompt_length is not None and max_prompt_length < 1:
    raise UserError(f"max_prompt_length={max_prompt_length} must be at least 1")
  stats = PreferenceStats()
  examples = parallel.encode_rows(encode_pairs, rows, tokenizer, stats, workers=workers, max_length=max_length,
                                  max_prompt_length=max_prompt_length)
  if stats.boundary_shifted:  # once for the dataset, whatever the number of worker processes
    logging.warning("%s: the tokenized prompt is not a prefix of the tokenized prompt + completion; the "
                    "completion starts where they diverge (as TRL does): %d of %d rows", stats.first_shifted,
                    stats.boundary_shifted, stats.rows)
  if not examples:
    raise UserError(f"{data.describe_sources(rows)}: dataset left empty after filtering ({stats}; "
                    f"max_length={max_length}, max_prompt_length={max_prompt_length})")
  return examples, stats


def build_batch(examples: Sequence[PreferenceExample], pairs: Sequence[int], start: int, stop: int,
                max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows [start, stop) of the [2B, T] batch of `pairs`: row i < B is the chosen of pair i, row B + i its rejected."""
  b = len(pairs)
  shape = (stop - start, max_length)
  batch = {"input_ids": np.full(shape, pad_id, np.int32), "loss_mask": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
  for out, row in enumerate(range(start, stop)):
    if pairs[row % b] is None:  # an empty pair: padding rows only (`BatchIterator.eval_batches`)
      continue
    ex = examples[pairs[row % b]]
    completion = ex.chosen_ids if row < b else ex.rejected_ids
    p, n = len(ex.prompt_ids), len(ex.prompt_ids) + len(completion)
    batch["input_ids"][out, :p] = ex.prompt_ids
    batch["input_ids"][out, p:n] = completion
    batch["loss_mask"][out, max(p, 1):n] = 1  # a token at position 0 has nothing before it to predict it
    batch["segment_ids"][out, :n] = 1
    batch["positions"][out, :n] = np.arange(n)
  return batch


def packed_row_length(max_length: int) -> int:
  """Tokens of a packed row: room for the longest pair that `encode_preference(max_length=...)` keeps."""
  return 2 * max_length


def max_pairs_per_row(row_length: int) -> int:
  """The packer's bound on pairs per row: the number of per-pair slots a row of the step has."""
  return max(1, row_length // 2)


def pair_length(ex: PreferenceExample) -> int:
  return len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids)


def build_packed_batch(examples: Sequence[PreferenceExample], groups: Sequence[Sequence[int]], row_length: int,
                       pad_id: int = 0) -> dict[str, np.ndarray]:
  """One packed row per group of pair indices (see the module doc); an empty group is a padding row."""
  shape = (len(groups), row_length)
  batch = {"input_ids": np.full(shape, pad_id, np.int32), "loss_mask": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
           "branch_ids": np.zeros(shape, np.int32),
           "prev_index": np.broadcast_to(np.maximum(np.arange(row_length, dtype=np.int32) - 1, 0), shape).copy()}
  for r, group in enumerate(groups):
    if len(group) > max_pairs_per_row(row_length):
      raise ValueError(f"{len(group)} pairs in a row of {row_length} tokens")
    o = 0
    for segment, i in enumerate(group, 1):
      ex = examples[i]
      p, c, n = len(ex.prompt_ids), len(ex.chosen_ids), pair_length(ex)
      if o + n > row_length:
        raise ValueError(f"pairs of {o + n} tokens > the row's {row_length}")
      batch["input_ids"][r, o:o + n] = np.concatenate([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids])
      batch["segment_ids"][r, o:o + n] = segment
      batch["branch_ids"][r, o + p:o + p + c] = 1
      batch["branch_ids"][r, o + p + c:o + n] = 2
      batch["positions"][r, o:o + p + c] = np.arange(p + c)
      batch["positions"][r, o + p + c:o + n] = np.arange(p, n - c)
      # A completion's first token is predicted by the prompt's last one: none when the prompt is empty.
      batch["loss_mask"][r, o + p + (p == 0):o + p + c] = 1
      batch["loss_mask"][r, o + p + c + (p == 0):o + n] = 1
      if p and n > p + c:
        batch["prev_index"][r, o + p + c] = o + p - 1
      o += n
  return batch


def packed_preview(examples: Sequence[PreferenceExample], row_length: int, tokenizer) -> list[dict]:
  """The packed rows of `examples` (in order, first-fit) as JSON-ready dicts: each row's pairs (token spans
  [start, stop) of prompt, chosen, rejected, and their texts) and its per-token arrays up to its last pair."""
  groups = batching.pack_first_fit([pair_length(ex) for ex in examples], row_length, max_pairs_per_row(row_length))
  batch = build_packed_batch(examples, groups, row_length)
  out = []
  for r, group in enumerate(groups):
    o, pairs = 0, []
    for segment, i in enumerate(group, 1):
      ex = examples[i]
      p, c, n = len(ex.prompt_ids), len(ex.chosen_ids), pair_length(ex)
      decode = lambda x: tokenizer.decode([int(t) for t in x], skip_special_tokens=False)  # noqa: E731
      pairs.append({"segment": segment, "where": ex.where, "prompt": [o, o + p], "chosen": [o + p, o + p + c],
                    "rejected": [o + p + c, o + n], "prompt_text": decode(ex.prompt_ids),
                    "chosen_text": decode(ex.chosen_ids), "rejected_text": decode(ex.rejected_ids)})
      o += n
    out.append({"row": r, "tokens": o, "row_length": row_length, "pairs": pairs,
                **{k: [int(x) for x in v[r, :o]] for k, v in batch.items()}})
  return out


class PreferenceBatchIterator(batching.BatchIterator):
  """`BatchIterator` over pairs: global batches of `batch_size` pairs as [2B, T] rows, or with `packing` of
  `batch_size` packed rows of `packed_row_length(max_length)` tokens (see the module doc)."""

  def __init__(self, examples: Sequence[PreferenceExample], *, batch_size: int, max_length: int, seed: int = 0,
               pad_id: int = 0, num_processes: int = 1, process_index: int = 0, packing: bool = False):
    self.pair_packing = packing
    super().__init__(examples, batch_size=batch_size,
                     max_length=packed_row_length(max_length) if packing else max_length, seed=seed,
                     packing=packing, pad_id=pad_id, num_processes=num_processes, process_index=process_index)

  def _length(self, ex) -> int:
    if self.pair_packing:
      return pair_length(ex)
    return len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))

  def _rows_per_batch(self, batch_size: int) -> int:
    return batch_size if self.pair_packing else 2 * batch_size

  def groups(self, epoch: int) -> list[list[int]]:
    if not self.pair_packing:
      return super().groups(epoch)
    if self._cached is None or self._cached[0] != epoch:
      order = batching.epoch_rng(self.seed, epoch).permutation(len(self.examples))
      rows = batching.pack_first_fit(self._lengths[order].tolist(), self.max_length,
                                     max_pairs_per_row(self.max_length))
      self._cached = (epoch, [[int(order[j]) for j in g] for g in rows])
    return self._cached[1]

  def _build(self, groups, start, stop):
    if self.pair_packing:
      return build_packed_batch(self.examples, groups[start:stop], self.max_length, self.pad_id)
    return build_batch(self.examples, [g[0] if g else None for g in groups], start, stop, self.max_length,
                       self.pad_id)
