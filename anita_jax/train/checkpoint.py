"""orbax checkpoints of a training stage: trainable parameters, optimizer state, step, data position.

The frozen base is not saved: it is reloaded (and re-quantized) from the
stage's base model. A checkpoint becomes visible only once orbax has finished
writing it (temporary directory, then rename; on gs:// a commit marker written
last), so a crash mid-save never leaves a checkpoint that is taken for complete.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from anita_jax import files
from anita_jax.errors import UserError


class Checkpoints:

  def __init__(self, workdir: str, keep: int):
    # orbax writes a gs:// workdir itself (tensorstore and etils.epath); there a step is complete once its
    # commit_success.txt is written, as object stores have no atomic rename.
    self.directory = os.path.join(files.absolute(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data_state)), force=force)
      self._manager.wait_until_finished()
    except OSError as e:  # a full disk, a quota, a lost mount: the earlier checkpoints are untouched
      raise UserError(f"{self.directory}: saving the checkpoint of step {step} failed "
                      f"({e.strerror or e}); the checkpoints before it are intact") from e

  def restore(self, step: int, like) -> tuple[object, dict]:
    """(state laid out and sharded like `like`, data state) of checkpoint `step`."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              data=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"])

  def restore_params(self, step: int, like) -> dict:
    """Only the trainable parameters of checkpoint `step`, laid out like `like`: no optimizer state is read."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
    return out["state"]["params"]

  def close(self) -> None:
    self._manager.close()
