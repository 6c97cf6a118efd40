"""A stage's data: rows loaded, encoded by its objective (or read back prepared), batched.

With a workdir, the encoded examples are kept in WORKDIR/prepared/KEY/ (`data.prepared`): the first run
encodes (in worker processes, `data.parallel`) and saves them; a resumed run, a restart after preemption
and the next process read them. Several processes (hosts): process 0 alone encodes and saves, the others
wait for it at a barrier and read its files, so no host encodes what another already has; a bad row fails
every host with process 0's message. A workdir that is not shared between hosts (its files not visible after
the barrier) makes each host encode for itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import jax
from jax.experimental import multihost_utils

from anita_jax import files
from anita_jax.data import prepared
from anita_jax.data import rows as D
from anita_jax.errors import UserError
from anita_jax.train import config as C
from anita_jax.train import objectives as OBJ

PREPARED_DIR = "prepared"
ERROR_FILE = "error.json"  # process 0's encoding error, for the other processes to raise
MAX_WORKERS = 32  # encoding processes at most: each holds its own tokenizer and transformers (a few 100 MB)
ROWS_PER_WORKER = 2000  # fewer rows than this a process: starting one (a few seconds) costs more than it saves


def encode_workers(rows: int) -> int:
  """Processes to encode `rows` rows with: the usable cores, fewer for a small dataset."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(cores, MAX_WORKERS, rows // ROWS_PER_WORKER))


def encoding_fields(c: C.StageConfig) -> dict:
  """What of the config shapes the encoded examples of given rows: the stage and the data fields, less those
  that only choose the rows (their content is keyed on its own) and `packing` (batching lays the same examples
  out either way)."""
  not_encoding = ("train", "eval", "config_name", "split", "eval_split", "max_rows", "packing")
  return {"stage": c.stage, **{k: v for k, v in C.to_dict(c)["data"].items() if k not in not_encoding}}


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _encode(c, obj, rows, tokenizer, source: str):
  start, workers = time.time(), encode_workers(len(rows))
  out = obj.encode(c, rows, tokenizer, workers=workers)
  _log(f"{source} data: encoded {len(rows)} rows in {time.time() - start:.1f} s "
       f"({workers} process{'es' if workers > 1 else ''})")
  return out


def _read(directory: str, rows, source: str):
  start, out = time.time(), prepared.load(directory, rows)
  if out is not None:
    _log(f"{source} data: read the prepared examples from {directory} in {time.time() - start:.1f} s")
  return out


def _encode_and_save(c, obj, rows, tokenizer, source: str, directory: str):
  examples, stats = _encode(c, obj, rows, tokenizer, source)
  prepared.save(directory, rows, examples, stats)
  _log(f"{source} data: saved the encoded examples to {directory}")
  return examples, stats


def _shared(c, obj, rows, tokenizer, source: str, directory: str, name: str):
  """Several processes: process 0 encodes and saves (or records its error), the others then read."""
  out, error = None, None
  if jax.process_index() == 0:
    out = _read(directory, rows, source)
    if out is None:
      try:
        out = _encode_and_save(c, obj, rows, tokenizer, source, directory)
      except Exception as e:  # noqa: BLE001 - recorded for the other processes, raised below
        error = e
        with contextlib.suppress(Exception):  # whatever happens, the barrier below is reached
          files.makedirs(directory)
          files.write_json(os.path.join(directory, ERROR_FILE), {"error": str(e), "type": type(e).__name__})
  multihost_utils.sync_global_devices(f"anita prepared data {name}")
  if error is not None:
    raise error
  if out is not None:
    return out
  out = _read(directory, rows, source)
  if out is not None:
    return out
  error_path = os.path.join(directory, ERROR_FILE)
  if files.isfile(error_path):
    recorded = json.loads(files.read_bytes(error_path))
    if recorded["type"] == UserError.__name__:
      raise UserError(recorded["error"])
    raise RuntimeError(f"process 0 failed to prepare the {source} data: {recorded['type']}: {recorded['error']}")
  _log(f"{source} data: {directory} (process 0's prepared data) is not visible here; encoding on this host too "
       "(a workdir shared by all hosts, such as gs://, avoids it)")
  return _encode(c, obj, rows, tokenizer, source)


def encoded(c: C.StageConfig, rows, tokenizer, *, workdir: str | None = None, source: str = "train"):
  """(examples, stats) of `rows` as the stage's objective encodes them, through WORKDIR/prepared when given."""
  obj = OBJ.objective(c.stage)
  name = prepared.key(rows, tokenizer, encoding_fields(c)) if workdir else None
  if name is None:
    return _encode(c, obj, rows, tokenizer, source)
  directory = os.path.join(workdir, PREPARED_DIR, name)
  if jax.process_count() > 1:
    return _shared(c, obj, rows, tokenizer, source, directory, name)
  out = _read(directory, rows, source)
  return out if out is not None else _encode_and_save(c, obj, rows, tokenizer, source, directory)


def load_source(c: C.StageConfig, source: str = "train") -> list:
  """The rows of data.train (source="train") or data.eval (source="eval"), as `build_data` encodes them."""
  split = c.data.split if source == "train" else c.data.eval_split
  return D.load_rows(files.split_list(getattr(c.data, source)), split=split, config_name=c.data.config_name,
                     fmt=c.data.format, max_rows=c.data.max_rows)


def build_data(c: C.StageConfig, tokenizer, *, source: str = "train", num_processes: int = 1,
               process_index: int = 0, batch_size: int | None = None, workdir: str | None = None,
               rows: list | None = None):
  """(iterator, stats) of data.train (source="train") or data.eval (source="eval"), as the objective encodes it.

  workdir: keep the encoded examples in WORKDIR/prepared, or read them from there (see the module doc).
  rows: the source's rows when the caller has loaded them already (`load_source`).
  """
  rows = load_source(c, source) if rows is None else rows
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  examples, stats = encoded(c, rows, tokenizer, workdir=workdir, source=source)
  it = OBJ.objective(c.stage).iterator(examples, c, batch_size=batch_size or c.train.batch_size,
                                        seed=c.train.seed, pad_id=pad, num_processes=num_processes,
                                        process_index=process_index)
  return it, stats
