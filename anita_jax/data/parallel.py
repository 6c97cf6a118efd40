"""Encoding rows in several processes: the same examples, in the same order, as one process makes.

Worker processes, not the tokenizer's batch encoding: most of a row's cost is Python (rendering the chat
template, locating assistant turns, the prompt/completion boundary of a pair) around single-text tokenizer
calls, which batch encoding cannot spread over cores; processes run the very per-row code of one process on
shares of the rows, so their result equals it by construction. The 'spawn' start method: the parent may have
initialized JAX, which must not be forked.

`encode_rows(fn, rows, tokenizer, stats, workers=N, **kwargs)` splits `rows` into consecutive chunks, calls
`fn(chunk, tokenizer, chunk_stats, **kwargs)` on each in a pool of N processes (each receives the tokenizer
once), and concatenates the chunks' examples in row order, adding each chunk's counts into `stats`. A chunk
that raises raises in the parent, and the first chunk in row order that does so is the one whose error is
raised: the error of the first bad row, as in one process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence

# Rows a chunk holds at most: small enough for every worker to get several (an even finish), large enough that
# sending a chunk and its examples costs little beside encoding it.
CHUNK_ROWS = 1000

_tokenizer = None  # a worker's copy, set once by `_start`


def _start(tokenizer) -> None:
  global _tokenizer
  _tokenizer = tokenizer
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism; no thread pools on top


def _encode_chunk(fn: Callable, rows: Sequence, stats_type: type, kwargs: dict) -> tuple[list, object]:
  stats = stats_type()
  return fn(rows, _tokenizer, stats, **kwargs), stats


def add_stats(total, part) -> None:
  """Adds the counts of `part` into `total` (dataclasses of one type: int fields add up, a str field keeps the
  first non-empty value, as one process reading the rows in order would)."""
  for f in dataclasses.fields(total):
    ours, theirs = getattr(total, f.name), getattr(part, f.name)
    setattr(total, f.name, ours or theirs if isinstance(ours, str) else ours + theirs)


def chunks(n: int, workers: int) -> list[range]:
  """Consecutive row ranges covering range(n): at least 4 per worker when rows allow, none over CHUNK_ROWS."""
  size = max(1, min(CHUNK_ROWS, -(-n // (4 * workers))))
  return [range(start, min(start + size, n)) for start in range(0, n, size)]


def encode_rows(fn: Callable, rows: Sequence, tokenizer, stats, *, workers: int = 1, **kwargs) -> list:
  """`fn(rows, tokenizer, stats, **kwargs)`, in `workers` processes when > 1 (see the module doc).

  fn: a module-level function (workers import it by name) returning the kept examples of its rows in order.
  """
  if workers <= 1 or len(rows) < 2:
    return fn(rows, tokenizer, stats, **kwargs)
  ranges = chunks(len(rows), workers)
  examples: list = []
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(ranges)), mp_context=context, initializer=_start,
                                              initargs=(tokenizer,)) as pool:
    futures = [pool.submit(_encode_chunk, fn, [rows[i] for i in r], type(stats), kwargs) for r in ranges]
    try:
      for future in futures:  # in row order: the first failing chunk holds the first bad row
        part, part_stats = future.result()
        examples.extend(part)
        add_stats(stats, part_stats)
    except BaseException:
      for future in futures:
        future.cancel()
      raise
  return examples
