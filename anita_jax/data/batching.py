"""Packing and batching: fixed-shape numpy batches, deterministic in (seed, epoch), sharded over processes.

Batch (a dict of numpy int32 arrays, B rows of this process, T = max_length):
  input_ids    [B, T]  token ids, padding = pad_id
  loss_mask    [B, T]  1 where the token is a target (scored against the output at t - 1)
  segment_ids  [B, T]  1, 2, ... per packed sequence in a row; 0 = padding
  positions    [B, T]  0, 1, ... restarting with each sequence; 0 on padding
A model attends only within a segment; a target whose previous token lies in another segment does
not exist, because the first token of every sequence has loss_mask 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anita_jax.errors import UserError


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
  """Greedy next-fit: indices in order into rows of at most max_length tokens; no index is split."""
  rows: list[list[int]] = []
  used = max_length + 1
  for i, n in enumerate(lengths):
    if n > max_length:
      raise ValueError(f"sequence {i} has {n} tokens > max_length={max_length}")
    if used + n > max_length:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += n
  return rows


def pack_first_fit(lengths: Sequence[int], max_length: int, max_per_row: int | None = None) -> list[list[int]]:
  """First-fit: each index, in order, into the first row (in opening order) with room for it, a new row
  when none has; rows of at most max_length tokens and max_per_row indices; no index is split.

  A max-tree over the rows' free room finds that row in O(log n) per index.
  """
  size = 1
  while size < max(len(lengths), 1):
    size *= 2
  free = [max_length] * (2 * size)  # node i: the most room left in any row under it; leaves: rows 0..size-1
  count = [0] * size
  rows: list[list[int]] = []
  for i, n in enumerate(lengths):
    if n > max_length:
      raise ValueError(f"sequence {i} has {n} tokens > max_length={max_length}")
    node = 1
    while node < size:
      node = 2 * node if free[2 * node] >= n else 2 * node + 1
    row = node - size
    if row == len(rows):
      rows.append([])
    rows[row].append(i)
    count[row] += 1
    free[node] = -1 if max_per_row is not None and count[row] >= max_per_row else free[node] - n
    node //= 2
    while node:
      free[node] = max(free[2 * node], free[2 * node + 1])
      node //= 2
  return rows


def build_batch(examples: Sequence, groups: Sequence[Sequence[int]], max_length: int,
                pad_id: int = 0) -> dict[str, np.ndarray]:
  """One row per group of example indices, the examples of a group packed left to right."""
  shape = (len(groups), max_length)
  batch = {"input_ids": np.full(shape, pad_id, np.int32), "loss_mask": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
  for r, group in enumerate(groups):
    offset = 0
    for segment, i in enumerate(group, 1):
      ex = examples[i]
      n = len(ex.input_ids)
      batch["input_ids"][r, offset:offset + n] = ex.input_ids
      batch["loss_mask"][r, offset:offset + n] = ex.loss_mask
      batch["loss_mask"][r, offset] = 0  # nothing before a sequence's first token predicts it
      batch["segment_ids"][r, offset:offset + n] = segment
      batch["positions"][r, offset:offset + n] = np.arange(n)
      offset += n
  return batch


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))


class BatchIterator:
  """Endless global batches of `batch_size` rows, deterministic in (seed, epoch).

  Each epoch shuffles the examples (PCG64 seeded by (seed, epoch)), packs them when `packing`
  (else one example per row), and cuts the rows into batches, dropping the last incomplete one.
  Process p of P materialises only rows [p*B/P, (p+1)*B/P) of each global batch. `state()` is
  (epoch, index of the next batch in that epoch); `restore(state)` continues with that batch.
  With packing the number of rows, hence of steps, can differ slightly between epochs.
  """

  def __init__(self, examples: Sequence, *, batch_size: int, max_length: int, seed: int = 0,
               packing: bool = False, pad_id: int = 0, num_processes: int = 1, process_index: int = 0):
    if not examples:
      raise UserError("no examples to batch")
    if batch_size < 1:
      raise UserError(f"batch_size={batch_size} must be at least 1")
    rows = self._rows_per_batch(batch_size)
    if rows % num_processes:
      raise UserError(f"batch_size={batch_size} ({rows} rows) is not divisible by the {num_processes} processes")
    if not 0 <= process_index < num_processes:
      raise UserError(f"process_index={process_index} is not in [0, {num_processes})")
    self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
    self.seed, self.packing, self.pad_id = seed, packing, pad_id
    self.num_processes, self.process_index = num_processes, process_index
    self._lengths = np.asarray([self._length(ex) for ex in examples])
    if self._lengths.max() > max_length:
      raise UserError(f"an example has {self._lengths.max()} tokens > max_length={max_length}")
    self._epoch, self._index = 0, 0
    self._cached: tuple[int, list[list[int]]] | None = None
    self.steps_in_epoch(0)  # fail now, not at the first step, if there is no full batch

  def _length(self, ex) -> int:
    return len(ex.input_ids)

  def _rows_per_batch(self, batch_size: int) -> int:
    return batch_size

  def _build(self, groups: list[list[int]], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the global batch made of `groups`."""
    return build_batch(self.examples, groups[start:stop], self.max_length, self.pad_id)

  def groups(self, epoch: int) -> list[list[int]]:
    """Example indices of each row of the epoch, in order."""
    if self._cached is None or self._cached[0] != epoch:
      order = epoch_rng(self.seed, epoch).permutation(len(self.examples))
      if self.packing:
        groups = [[int(order[j]) for j in g] for g in pack(self._lengths[order].tolist(), self.max_length)]
      else:
        groups = [[int(i)] for i in order]
      self._cached = (epoch, groups)
    return self._cached[1]

  def steps_in_epoch(self, epoch: int) -> int:
    steps = len(self.groups(epoch)) // self.batch_size
    if steps == 0:
      raise UserError(f"{len(self.examples)} examples make {len(self.groups(epoch))} rows: not one full batch of "
                      f"batch_size={self.batch_size}")
    return steps

  def steps_for_epochs(self, epochs: int) -> int:
    """Steps in epochs 0 .. epochs - 1: the length of a `train.epochs` run."""
    return sum(self.steps_in_epoch(e) for e in range(epochs))

  def state(self) -> tuple[int, int]:
    return self._epoch, self._index

  def restore(self, state: Sequence[int]) -> None:
    epoch, index = (int(x) for x in state)
    if epoch < 0 or index < 0:
      raise UserError(f"data state {tuple(state)}: epoch and batch index must be >= 0")
    self._epoch, self._index = epoch, index

  def eval_batches(self):
    """Every row of epoch 0 once, in batches of `batch_size`; the last batch is filled up with empty
    rows (no tokens, no targets), so an evaluation scores every example."""
    groups = list(self.groups(0))
    groups += [[]] * (-len(groups) % self.batch_size)
    share = self._rows_per_batch(self.batch_size) // self.num_processes
    for start in range(0, len(groups), self.batch_size):
      yield self._build(groups[start:start + self.batch_size], self.process_index * share,
                        (self.process_index + 1) * share)

  def __iter__(self):
    return self

  def next_groups(self) -> list[list[int]]:
    """The example groups (rows) of the batch `next` returns, without advancing: what precomputed per-example
    values (DPO's reference log-probs) are looked up by."""
    epoch, index = self._epoch, self._index
    while index >= self.steps_in_epoch(epoch):
      epoch, index = epoch + 1, 0
    return self.groups(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

  def __next__(self) -> dict[str, np.ndarray]:
    batch_groups = self.next_groups()
    while self._index >= self.steps_in_epoch(self._epoch):
      self._epoch, self._index = self._epoch + 1, 0
    share = self._rows_per_batch(self.batch_size) // self.num_processes
    self._index += 1
    return self._build(batch_groups, self.process_index * share, (self.process_index + 1) * share)
