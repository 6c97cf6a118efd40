"""Rows: loaded from files or the hub, their format detected, validated.

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

Tokenization: `anita_jax.data.encode`. Batches (packing, shuffling, process shares, resumable
state): `anita_jax.data.batching`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence

from anita_jax import files
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


def _read_json(path: str, data: bytes) -> list[tuple[int, dict]]:
  """A JSON array of objects (rows numbered 1..N), or JSON Lines with a .json name (numbered by line)."""
  if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
    try:
      return files.read_jsonl(path, data=data)
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


def _read_parquet(path: str, name: str) -> list[tuple[int, dict]]:
  import pyarrow.parquet as pq
  try:
    table = pq.read_table(path)
  except Exception as e:  # noqa: BLE001 - any reader failure means the file is not usable parquet
    reason = (str(e).splitlines() or [type(e).__name__])[0][:200].replace(path, name)
    raise UserError(f"{name}: not a readable parquet file ({reason})") from None
  return list(enumerate(table.to_pylist(), 1))


def _read_file(path: str, name: str) -> list[tuple[int, dict]]:
  """The rows of the local file `path`; errors name `name`, the file as the user gave it (its gs:// URL for
  the local copy of one)."""
  if path.endswith(".parquet"):
    return _read_parquet(path, name)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{name}: cannot read ({e.strerror})") from None
  return files.read_jsonl(name, data=data) if path.endswith(".jsonl") else _read_json(name, data)


def _local_files(local: str, source: str) -> list[str]:
  """The data files of `local` (a file, or a directory searched recursively), sorted; errors name `source`,
  what `local` is a copy of."""
  if os.path.isfile(local):
    if not local.endswith(EXTENSIONS):
      raise UserError(f"{source}: not a data file (expected {', '.join(EXTENSIONS)})")
    return [local]
  files = sorted(os.path.join(d, f) for d, _, names in os.walk(local) for f in names if f.endswith(EXTENSIONS))
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
  split made of all its files, as `datasets` does), either of them on gs:// (read from a local copy), or a
  hub dataset id loaded with
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
    if files.is_remote(source) or os.path.exists(source):
      # gs://...: read from a local copy; rows and errors are named by the source's own paths either way
      local = files.local_copy(source) if files.is_remote(source) else source
      named = [(path, source + path[len(local):]) for path in _local_files(local, source)]
      raw = [Row(name, number, data) for path, name in named for number, data in _read_file(path, name)]
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


def fingerprint(rows: Sequence[Row]) -> str:
  """sha256 of the rows' contents and formats, in order: what changes if any row a run reads changes.

  Keyed on content, not on paths or modification times, so the same file copied to gs:// or renamed keeps its
  fingerprint and an edited file in place does not.
  """
  h = hashlib.sha256()
  for r in rows:
    h.update(json.dumps([r.format, r.data], sort_keys=True, ensure_ascii=False, default=str).encode())
    h.update(b"\n")
  return h.hexdigest()


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


def shared_prefix(a: Sequence, b: Sequence) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def _extract_prompt_text(row: Row, chosen: str, rejected: str) -> tuple[str, str, str]:
  """trl.extract_prompt on strings: the shared character prefix, a space before the divergence excluded."""
  n = shared_prefix(chosen, rejected)
  if n == 0 or n == min(len(chosen), len(rejected)):
    raise UserError(f"{row.where}: field 'prompt' is missing and chosen and rejected "
                    f"{'share no prefix' if n == 0 else 'do not diverge'}, so there is no prompt to extract")
  if chosen[n - 1] == " ":
    n -= 1
  return chosen[:n], chosen[n:], rejected[n:]


def preference_parts(row: Row) -> tuple[str, object, object, object]:
  """('chat', prompt msgs, chosen msgs, rejected msgs) or ('text', prompt, chosen, rejected), validated."""
  chosen, rejected = field(row, "chosen"), field(row, "rejected")
  prompt = row.data.get("prompt")
  if isinstance(chosen, str) and isinstance(rejected, str):
    string(row, "chosen", chosen)
    string(row, "rejected", rejected)
    if prompt is None:
      return ("text", *_extract_prompt_text(row, chosen, rejected))
    return "text", string(row, "prompt", prompt), chosen, rejected
  if not isinstance(chosen, list):
    raise UserError(f"{row.where}: field 'chosen' must be a string or a list of messages, got {type(chosen).__name__}")
  if not isinstance(rejected, list):
    raise UserError(f"{row.where}: field 'rejected' must be a list of messages like field 'chosen', "
                    f"got {type(rejected).__name__}")
  c, r = messages(row, "chosen", chosen), messages(row, "rejected", rejected)
  c_names, r_names = field_names(c, "chosen"), field_names(r, "rejected")
  if isinstance(prompt, list):
    p, p_names = messages(row, "prompt", prompt), field_names(prompt, "prompt")
  elif prompt is not None and not isinstance(prompt, str):
    raise UserError(f"{row.where}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
  elif c[0]["role"] == "assistant" and r[0]["role"] == "assistant":
    if prompt is None:
      raise UserError(f"{row.where}: field 'prompt' is missing and chosen starts with an assistant turn")
    p, p_names = [{"role": "user", "content": string(row, "prompt", prompt)}], ["prompt"]
  else:
    n = shared_prefix(c, r)
    if n == 0:
      raise UserError(f"{row.where}: field 'chosen': chosen and rejected share no first turn, so there is no prompt")
    p, p_names = c[:n], c_names[:n]
    c, c_names, r, r_names = c[n:], c_names[n:], r[n:], r_names[n:]
    for name, part in (("chosen", c), ("rejected", r)):
      if not part:
        raise UserError(f"{row.where}: field '{name}' has no turn after the prompt it shares with the other")
  check_order(row, p + c, p_names + c_names, last="assistant")
  check_order(row, p + r, p_names + r_names, last="assistant")
  return "chat", p, c, r


def validate_row(row: Row, fmt: str) -> None:
  if fmt == "text":
    string(row, "text", field(row, "text"))
  elif fmt == "preference":
    preference_parts(row)
  elif fmt in FORMATS[1:]:
    conversation(row, fmt)
  else:
    raise UserError(f"format '{fmt}': expected one of {', '.join(FORMATS)}")


def describe_sources(rows: Sequence[Row]) -> str:
  names = sorted({r.source for r in rows})
  return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "the dataset"
