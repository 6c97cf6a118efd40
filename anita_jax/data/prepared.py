"""Prepared data: a stage's encoded examples and their counts, saved once and read back by every later run.

Encoding a big dataset takes minutes; a resumed run, a restart after preemption and the next process of the
same stage read `DIR/<key>/` instead (DIR: the workdir's `prepared/`, local or gs://). The key is a sha256 of
everything the examples are a function of:
  - the rows' content, in order (`rows.fingerprint`: not their paths, so a copied dataset keeps its key),
  - the tokenizer: its whole definition (`backend_tokenizer.to_str()`: vocabulary, merges, normalizer,
    added and special tokens, post-processor), its special tokens and its chat template,
  - the fields that shape encoding (the caller's `fields`: stage, max_length, mask, format, ...),
  - the encoding code itself (the source of the data modules that turn rows into examples) and the
    transformers and tokenizers versions, so a fix in either encodes again rather than reading stale examples.
A slow (Python) tokenizer has no such definition to hash: its data is never cached (`key` is None).

Files, never pickle: `examples.npz` (np.savez; read with allow_pickle=False): per array field F of the example
type, `F` the examples' arrays concatenated (int32) and `F_offsets` [N + 1] (int64) where each starts; `row`
[N] (int32) the index of each example's row, which gives back its `where` from the rows of the reading run.
`stats.json`: the example and stats types, the counts, the number of examples; it is written after the arrays,
each atomically (`files.atomic_write`), so a directory without it is unfinished and read as absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence

import numpy as np

from anita_jax import files
from anita_jax.data import encode
from anita_jax.data import preference
from anita_jax.data import rows as D

VERSION = 1  # of the files' layout
ARRAYS, STATS = "examples.npz", "stats.json"
# The types a directory may hold, by name: reading never imports or builds anything else.
EXAMPLE_TYPES = {t.__name__: t for t in (encode.Example, preference.PreferenceExample)}
STATS_TYPES = {t.__name__: t for t in (encode.EncodeStats, preference.PreferenceStats)}
_CODE = (D, encode, preference)  # the modules whose code makes the examples


def tokenizer_fingerprint(tokenizer) -> str | None:
  """sha256 of what a fast tokenizer encodes with: its definition, special tokens and chat template; None for a
  slow tokenizer."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return None
  h = hashlib.sha256(backend.to_str().encode())
  extra = [type(tokenizer).__name__, tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None)]
  h.update(json.dumps(extra, sort_keys=True, default=str).encode())
  return h.hexdigest()


def _code_fingerprint() -> str:
  import tokenizers
  import transformers
  h = hashlib.sha256(f"{VERSION} {transformers.__version__} {tokenizers.__version__}".encode())
  for module in _CODE:
    with open(module.__file__, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def key(rows: Sequence[D.Row], tokenizer, fields: dict) -> str | None:
  """The directory name of these rows encoded by `tokenizer` with `fields` (JSON-able); None: not cacheable."""
  tok = tokenizer_fingerprint(tokenizer)
  if tok is None:
    return None
  parts = {"rows": D.fingerprint(rows), "tokenizer": tok, "fields": fields, "code": _code_fingerprint()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _row_indices(rows: Sequence[D.Row], examples: Sequence) -> np.ndarray:
  """Each example's row: examples are the kept rows in order, so each is the next row with its `where`."""
  out, j = np.zeros(len(examples), np.int32), 0
  for i, ex in enumerate(examples):
    while rows[j].where != ex.where:
      j += 1
    out[i], j = j, j + 1
  return out


def _array_fields(example_type) -> list[str]:
  return [f.name for f in dataclasses.fields(example_type) if f.name != "where"]


def save(directory: str, rows: Sequence[D.Row], examples: Sequence, stats) -> None:
  """Writes `examples` (encoded from `rows`) and `stats` into `directory` (see the module doc)."""
  example_type = type(examples[0])
  if example_type.__name__ not in EXAMPLE_TYPES or type(stats).__name__ not in STATS_TYPES:
    raise TypeError(f"cannot save {example_type.__name__} / {type(stats).__name__}")
  arrays = {"row": _row_indices(rows, examples)}
  for name in _array_fields(example_type):
    parts = [np.asarray(getattr(ex, name), np.int32) for ex in examples]
    arrays[name] = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)

  files.makedirs(directory)
  files.atomic_write(os.path.join(directory, ARRAYS), write)
  files.write_json(os.path.join(directory, STATS), {
      "version": VERSION, "example_type": example_type.__name__, "stats_type": type(stats).__name__,
      "stats": dataclasses.asdict(stats), "examples": len(examples), "rows": len(rows)})


def _read_arrays(path: str) -> dict[str, np.ndarray]:
  source = path if not files.is_remote(path) else io.BytesIO(files.read_bytes(path))
  with np.load(source, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def load(directory: str, rows: Sequence[D.Row]) -> tuple[list, object] | None:
  """(examples, stats) saved in `directory` for these rows, or None when there is no complete, readable copy."""
  meta_path = os.path.join(directory, STATS)
  if not files.isfile(meta_path):
    return None
  try:
    meta = json.loads(files.read_bytes(meta_path))
    example_type, stats_type = EXAMPLE_TYPES[meta["example_type"]], STATS_TYPES[meta["stats_type"]]
    arrays = _read_arrays(os.path.join(directory, ARRAYS))
    stats = stats_type(**meta["stats"])
    n, index = meta["examples"], arrays["row"]
    names = _array_fields(example_type)
    offsets = {k: arrays[f"{k}_offsets"] for k in names}
    if meta["version"] != VERSION or meta["rows"] != len(rows) or index.shape != (n,) or any(
        o.shape != (n + 1,) or o[-1] != arrays[k].size for k, o in offsets.items()):
      return None
  except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):  # unreadable: encode again
    return None
  split = {k: np.split(arrays[k], offsets[k][1:-1]) for k in names}
  examples = [example_type(**{k: split[k][i] for k in names}, where=rows[int(index[i])].where) for i in range(n)]
  return examples, stats
