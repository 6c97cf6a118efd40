"""The data pipeline for `sft` and `lm`: rows from files or the hub, validated, tokenized, packed, batched.

Rows come from local JSON / JSONL / parquet files, directories of them, or hub datasets (through
`datasets`). Every row keeps its origin (`Row.where`: "FILE:LINE" for JSONL, "FILE:ROW" otherwise,
"ID[SPLIT]:ROW" for the hub), so every error names the file, the 1-based row and the field.

Formats (`fmt`), auto-detected per source from the first row's columns:
  preference         chosen + rejected (+ prompt): DPO, see `anita_jax.data.preference`
  messages           messages: [{role, content}, ...]
  prompt_completion  prompt + completion: strings (one user and one assistant turn) or message lists
  alpaca             instruction + output (+ input, + system)
  text               text: plain causal LM (the `lm` stage), no chat template

Token convention: `loss_mask[t] = 1` means token t is a target, scored against the model's output
at t - 1. So the first token of every sequence (packed or not) is never a target.

Batches (packing, shuffling, process shares, resumable state): `anita_jax.data.batching`, whose
`BatchIterator` is re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from anita_jax.data.batching import BatchIterator, build_batch, epoch_rng, pack  # noqa: F401 - part of this API
from anita_jax.errors import UserError

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "text", "preference")
ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".json", ".parquet")
# Special tokens that close a chat turn, and that close a document, in the order they are looked for.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
END_OF_TEXT_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>")


@dataclasses.dataclass(frozen=True)
class Row:
  """One raw row and where it came from. `format` is resolved by `load_rows`."""

  source: str
  number: int  # 1-based; the line number for JSONL
  data: dict
  format: str = "auto"

  @property
  def where(self) -> str:
    return f"{self.source}:{self.number}"


# ----------------------------------------------------------------------------------------------
# Loading


def _split_ranges(split: str, n: int, source: str) -> list[tuple[int, int]]:
  """[from, to) ranges that HF split syntax (`train`, `train[:100]`, `train[10%:]+train[-5:]`) selects."""
  import datasets
  try:
    instruction = datasets.ReadInstruction.from_spec(split)
  except (ValueError, AssertionError) as e:
    raise UserError(f"{source}: split '{split}' is not valid split syntax ({str(e).splitlines()[0]})") from None
  try:
    ranges = instruction.to_absolute({"train": n})
  except (ValueError, KeyError, AssertionError):
    raise UserError(f"{source}: a local file has only the split 'train' (got split '{split}')") from None
  return [(r.from_, r.to) for r in ranges]


def _read_jsonl(path: str, data: bytes) -> list[tuple[int, dict]]:
  rows = []
  for number, raw in enumerate(data.split(b"\n"), 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
    if number == 1:
      line = line.lstrip("\ufeff")
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
      raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    rows.append((number, row))
  return rows


def _read_json(path: str, data: bytes) -> list[tuple[int, dict]]:
  """A JSON array of objects (rows numbered 1..N), or JSON Lines with a .json name (numbered by line)."""
  if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
    try:
      return _read_jsonl(path, data)
    except UserError:
      try:
        whole = json.loads(data.decode("utf-8-sig"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        raise  # the JSON Lines error, with its line number
      kind = "object" if isinstance(whole, dict) else "value"
      raise UserError(f"{path}: one JSON {kind} over several lines: expected a JSON array of objects or "
                      "JSON Lines (one object per line)") from None
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
  try:
    array = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
  for number, row in enumerate(array, 1):
    if not isinstance(row, dict):
      raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
  return list(enumerate(array, 1))


def _read_parquet(path: str) -> list[tuple[int, dict]]:
  import pyarrow.parquet as pq
  try:
    table = pq.read_table(path)
  except Exception as e:  # noqa: BLE001 - any reader failure means the file is not usable parquet
    reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"{path}: not a readable parquet file ({reason})") from None
  return list(enumerate(table.to_pylist(), 1))


def _read_file(path: str) -> list[tuple[int, dict]]:
  if path.endswith(".parquet"):
    return _read_parquet(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  return _read_jsonl(path, data) if path.endswith(".jsonl") else _read_json(path, data)


def _local_files(source: str) -> list[str]:
  if os.path.isfile(source):
    if not source.endswith(EXTENSIONS):
      raise UserError(f"{source}: not a data file (expected {', '.join(EXTENSIONS)})")
    return [source]
  files = sorted(os.path.join(d, f) for d, _, names in os.walk(source) for f in names if f.endswith(EXTENSIONS))
  if not files:
    raise UserError(f"{source}: the directory holds no {', '.join(EXTENSIONS)} files")
  return files


def _looks_like_hub_id(source: str) -> bool:
  return (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.endswith(EXTENSIONS)
          and not source.startswith("."))


def _load_hub(source: str, split: str, config_name: str | None, max_rows: int | None) -> list[Row]:
  import datasets
  try:
    ds = datasets.load_dataset(source, config_name, split=split)
  except Exception as e:  # noqa: BLE001 - a missing network, id, config or split is the user's to fix
    reason = (str(e).splitlines() or [""])[0][:200]
    raise UserError(f"{source}: not a local path, and loading split '{split}' from the hub failed "
                    f"({type(e).__name__}: {reason})") from None
  if max_rows is not None:
    ds = ds.select(range(min(max_rows, len(ds))))
  name = f"{source}[{split}]"
  return [Row(name, number, dict(row)) for number, row in enumerate(ds.to_list(), 1)]


def load_rows(sources: str | Sequence[str], *, split: str = "train", config_name: str | None = None,
              fmt: str = "auto", max_rows: int | None = None) -> list[Row]:
  """Rows of every source, concatenated in order, each validated for its format.

  A source is a local .json / .jsonl / .parquet file, a directory of them (sorted, recursive: one
  split made of all its files, as `datasets` does), or a hub dataset id loaded with
  `datasets.load_dataset(id, config_name, split=split)`. A local source has the one split `train`,
  and slices of the split (`train[:100]`, `train[10%:20%]`) apply to it as to a hub dataset.
  `max_rows` caps each source after the split. `fmt='auto'` detects the format per source from the
  columns of its first row.
  """
  if fmt not in FORMATS:
    raise UserError(f"format '{fmt}': expected one of {', '.join(FORMATS)}")
  sources = [sources] if isinstance(sources, str) else list(sources)
  if not sources:
    raise UserError("no data sources given")
  rows: list[Row] = []
  for source in sources:
    if os.path.exists(source):
      raw = [Row(path, number, data) for path in _local_files(source) for number, data in _read_file(path)]
      raw = [r for start, stop in _split_ranges(split, len(raw), source) for r in raw[start:stop]]
      raw = raw[:max_rows] if max_rows is not None else raw
    elif _looks_like_hub_id(source):
      raw = _load_hub(source, split, config_name, max_rows)
    else:
      raise UserError(f"{source}: no such file or directory")
    if not raw:
      raise UserError(f"{source}: no rows in split '{split}'")
    source_fmt = detect_format(raw[0]) if fmt == "auto" else fmt
    for r in raw:
      validate_row(r, source_fmt)
    rows.extend(dataclasses.replace(r, format=source_fmt) for r in raw)
  return rows


# ----------------------------------------------------------------------------------------------
# Formats and validation


def detect_format(row: Row) -> str:
  keys = set(row.data)
  if {"chosen", "rejected"} <= keys:
    return "preference"
  if "messages" in keys:
    return "messages"
  if {"prompt", "completion"} <= keys:
    return "prompt_completion"
  if {"instruction", "output"} <= keys:
    return "alpaca"
  if "text" in keys:
    return "text"
  raise UserError(f"{row.where}: cannot tell the format from the columns {sorted(keys)}: expected messages, "
                  "prompt+completion, instruction+output, text or chosen+rejected (or set the format)")


def field(row: Row, name: str):
  if name not in row.data:
    raise UserError(f"{row.where}: field '{name}' is missing")
  return row.data[name]


def string(row: Row, name: str, value, *, optional: bool = False) -> str | None:
  """A non-empty string; with `optional`, None and blank strings mean absent."""
  if optional and (value is None or (isinstance(value, str) and not value.strip())):
    return None
  if not isinstance(value, str):
    raise UserError(f"{row.where}: field '{name}' must be a string, got {type(value).__name__}")
  if not value.strip():
    raise UserError(f"{row.where}: field '{name}' is empty")
  return value


def messages(row: Row, name: str, value) -> list[dict]:
  """A list of {role, content} (extra keys dropped), each content a non-empty string."""
  if not isinstance(value, list):
    raise UserError(f"{row.where}: field '{name}' must be a list of messages, got {type(value).__name__}")
  if not value:
    raise UserError(f"{row.where}: field '{name}' is an empty list")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise UserError(f"{row.where}: field '{name}[{i}]' must be an object with role and content, "
                      f"got {type(m).__name__}")
    for key in ("role", "content"):
      if key not in m:
        raise UserError(f"{row.where}: field '{name}[{i}].{key}' is missing")
    if m["role"] not in ROLES:
      raise UserError(f"{row.where}: field '{name}[{i}].role' is {m['role']!r}: expected one of {', '.join(ROLES)}")
    out.append({"role": m["role"], "content": string(row, f"{name}[{i}].content", m["content"])})
  return out


def check_order(row: Row, conversation: list[dict], names: list[str], *, last: str | None) -> None:
  """System only first; then user and assistant alternate from user; the last turn's role is `last`."""
  expected = "user"
  for i, (m, name) in enumerate(zip(conversation, names)):
    if m["role"] == "system":
      if i:
        raise UserError(f"{row.where}: field '{name}.role' is 'system': a system message may only come first")
      continue
    if m["role"] != expected:
      after = f"'{conversation[i - 1]['role']}'" if i else "the start"
      raise UserError(f"{row.where}: field '{name}.role' is '{m['role']}': expected '{expected}' after {after}")
    expected = "assistant" if expected == "user" else "user"
  if last and conversation[-1]["role"] != last:
    raise UserError(f"{row.where}: field '{names[-1]}': the conversation must end with an {last} turn "
                    f"(it ends with '{conversation[-1]['role']}')")


def field_names(value, name: str) -> list[str]:
  return [f"{name}[{i}]" for i in range(len(value))]


def conversation(row: Row, fmt: str) -> list[dict]:
  """The validated chat of a messages / prompt_completion / alpaca row, ending with an assistant turn."""
  if fmt == "messages":
    chat = messages(row, "messages", field(row, "messages"))
    names = field_names(chat, "messages")
  elif fmt == "prompt_completion":
    chat, names = [], []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
      value = field(row, name)
      if isinstance(value, list):
        part = messages(row, name, value)
        chat, names = chat + part, names + field_names(part, name)
      else:
        chat.append({"role": role, "content": string(row, name, value)})
        names.append(name)
  elif fmt == "alpaca":
    system = string(row, "system", row.data.get("system"), optional=True)
    instruction = string(row, "instruction", field(row, "instruction"))
    extra = string(row, "input", row.data.get("input"), optional=True)
    output = string(row, "output", field(row, "output"))
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction + ("\n\n" + extra if extra else "")},
        {"role": "assistant", "content": output}]
    names = (["system"] if system else []) + ["instruction", "output"]
  else:
    raise UserError(f"{row.where}: format '{fmt}' is not a chat format")
  check_order(row, chat, names, last="assistant")
  return chat


def validate_row(row: Row, fmt: str) -> None:
  if fmt == "text":
    string(row, "text", field(row, "text"))
  elif fmt == "preference":
    from anita_jax.data import preference
    preference.preference_parts(row)
  elif fmt in FORMATS[1:]:
    conversation(row, fmt)
  else:
    raise UserError(f"format '{fmt}': expected one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------
# Tokenization


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


def describe_sources(rows: Sequence[Row]) -> str:
  names = sorted({r.source for r in rows})
  return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "the dataset"


def encode_dataset(rows: Sequence[Row], tokenizer, *, max_length: int, mask: str = "all",
                   truncation: str = "truncate", fmt: str | None = None) -> tuple[list[Example], EncodeStats]:
  """Every row encoded (each with its own format unless `fmt` is given); UserError if none is left."""
  if max_length < 2:
    raise UserError(f"max_length={max_length} must be at least 2")
  stats = EncodeStats()
  examples = []
  for row in rows:
    out = encode_example(row, fmt or row.format, tokenizer, mask=mask, max_length=max_length,
                         truncation=truncation, stats=stats)
    if out is not None:
      examples.append(Example(np.asarray(out[0], np.int32), np.asarray(out[1], np.int32), row.where))
  if not examples:
    raise UserError(f"{describe_sources(rows)}: dataset left empty after filtering ({stats}; max_length={max_length}, "
                    f"truncation='{truncation}', mask='{mask}')")
  return examples, stats


def preview_records(examples: Sequence, tokenizer) -> list[dict]:
  """What the trainer consumes, per example, as JSON-ready dicts (special tokens kept in `text`)."""
  from anita_jax.data import preference
  records = []
  for ex in examples:
    if isinstance(ex, preference.PreferenceExample):
      records.append(preference.preview_record(ex, tokenizer))
      continue
    ids = [int(t) for t in ex.input_ids]
    records.append({"input_ids": ids, "loss_mask": [int(t) for t in ex.loss_mask],
                    "text": tokenizer.decode(ids, skip_special_tokens=False)})
  return records


def preview_main(c, num_examples: int) -> None:
  """scripts/preview_data.py: the first examples of data.train as the trainer encodes them, as JSON lines."""
  import json
  import sys

  from anita_jax.convert import loading
  from anita_jax.data import preference
  from anita_jax.train import config as stage_config
  from anita_jax.train import workdir
  stage_config.validate(c)
  tokenizer = loading.load_tokenizer(c.model.tokenizer or workdir.model_path(c.model.path))
  rows = load_rows([s.strip() for s in c.data.train.split(",") if s.strip()], split=c.data.split,
                   config_name=c.data.config_name, fmt=c.data.format,
                   max_rows=num_examples if c.data.max_rows is None else min(num_examples, c.data.max_rows))
  if c.stage == "dpo":
    examples, stats = preference.encode_preferences(rows, tokenizer, max_length=c.data.max_length,
                                                    max_prompt_length=c.data.max_prompt_length)
  else:
    fmt = "text" if c.stage == "lm" and c.data.format == "auto" else None
    examples, stats = encode_dataset(rows, tokenizer, max_length=c.data.max_length, mask=c.data.mask,
                                     truncation=c.data.truncation, fmt=fmt)
  for record in preview_records(examples[:num_examples], tokenizer):
    print(json.dumps(record, ensure_ascii=False))
  print(f"{stats}", file=sys.stderr)
