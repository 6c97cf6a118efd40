"""The training core: mesh invariance, exact resume, accumulation, the optimizer's footprint, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from anita_jax.train import config as C
from anita_jax.train import loop as T
from anita_jax.train import state as ST
from anita_jax.train import publish
from anita_jax.train import workdir as W
from anita_jax.train.checkpoint import Checkpoints
from anita_jax.errors import UserError


def sft_config(demo_config, model_dir, **overrides):
  c = demo_config("sft")
  c.model.path = model_dir
  c.data.eval = ""
  c.data.max_length = 128
  c.data.packing = True
  c.train.batch_size = 8
  c.train.steps = 5
  c.train.log_every = 1
  c.train.warmup_steps = 0
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.checkpoint.every = 1000
  c.update_from_flattened_dict(overrides)
  return c


def losses_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def adapters_of(workdir):
  return jax.tree.map(np.asarray, W.load_trained(workdir).state["params"])


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_sft_losses_and_adapters_agree_across_meshes(demo_config, tiny_hf_dir, tmp_path):
  runs = {}
  for mesh in ["1x1x1", "8x1x1", "1x8x1", "2x2x2", "1x4x2"]:
    d, f, t = (int(x) for x in mesh.split("x"))
    c = sft_config(demo_config, tiny_hf_dir, **{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t})
    T.train_and_evaluate(c, str(tmp_path / mesh))
    runs[mesh] = (losses_of(str(tmp_path / mesh)), adapters_of(str(tmp_path / mesh)))
  ref_losses, ref_adapters = runs["1x1x1"]
  assert len(ref_losses) == 5 and ref_losses[-1] < ref_losses[0]
  for mesh, (got, adapters) in runs.items():
    assert rel(got, ref_losses) <= 1e-5, (mesh, got, ref_losses)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(ref_adapters)):
      assert rel(a, b) <= 1e-4, mesh


@pytest.mark.slow
def test_resume_is_exact_and_continues_on_another_mesh(demo_config, tiny_hf_dir, tmp_path):
  straight = str(tmp_path / "straight")
  T.train_and_evaluate(sft_config(demo_config, tiny_hf_dir, **{"train.steps": 20}), straight)
  resumed = str(tmp_path / "resumed")
  c = sft_config(demo_config, tiny_hf_dir, **{"train.steps": 20, "checkpoint.every": 10})
  c10 = sft_config(demo_config, tiny_hf_dir, **{"train.steps": 20, "checkpoint.every": 10})
  # Stop after 10 steps: run a config whose loop ends at 10, with the same schedule length.
  T.train_and_evaluate(c10, resumed, stop_after=10)
  T.train_and_evaluate(c, resumed)
  assert losses_of(resumed) == losses_of(straight)
  jax.tree.map(np.testing.assert_array_equal, adapters_of(resumed), adapters_of(straight))

  other = str(tmp_path / "other_mesh")
  T.train_and_evaluate(c10, other, stop_after=10)
  moved = sft_config(demo_config, tiny_hf_dir, **{"train.steps": 20, "checkpoint.every": 10, "mesh.data": 2,
                                                  "mesh.fsdp": 2, "mesh.tensor": 2})
  T.train_and_evaluate(moved, other)
  assert rel(losses_of(other), losses_of(straight)) <= 1e-5


def test_gradient_accumulation_equals_one_big_batch(demo_config, tiny_hf_dir, tmp_path):
  big = sft_config(demo_config, tiny_hf_dir, **{"train.steps": 3, "data.packing": False, "mesh.data": 4})
  small = sft_config(demo_config, tiny_hf_dir, **{"train.steps": 3, "data.packing": False, "mesh.data": 4,
                                                  "train.batch_size": 4, "train.grad_accum": 2})
  T.train_and_evaluate(big, str(tmp_path / "big"))
  T.train_and_evaluate(small, str(tmp_path / "small"))
  assert rel(losses_of(str(tmp_path / "small")), losses_of(str(tmp_path / "big"))) <= 1e-5


def test_optimizer_state_only_for_trainable_leaves_and_frozen_untouched(demo_config, tiny_hf_dir, tmp_path,
                                                                        monkeypatch):
  c = sft_config(demo_config, tiny_hf_dir, **{"train.steps": 10})
  stage = ST.build_stage(c, W.base_model_path(C.freeze(c)))
  frozen_before = jax.tree.map(np.asarray, stage.frozen)
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(stage.state["params"]))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(stage.state["opt_state"]) if x.ndim > 0)
  assert opt_bytes == 2 * trainable_bytes  # AdamW: mu and nu, nothing for frozen leaves
  leaves = [str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(stage.state["params"])[0]]
  assert set(leaves) == {"lora_a", "lora_b"}
  T.train_and_evaluate(c, str(tmp_path / "w"))

  # Loading the workdir as a model (generation, evaluation, export) builds and reads no optimizer state.
  def no_optimizer(*args, **kwargs):
    raise AssertionError("an optimizer was built to load a model")

  def no_full_restore(*args, **kwargs):
    raise AssertionError("the optimizer state was read from the checkpoint")

  monkeypatch.setattr(ST, "make_optimizer", no_optimizer)
  monkeypatch.setattr(Checkpoints, "restore", no_full_restore)
  stage2 = W.load_trained(str(tmp_path / "w"))
  assert set(stage2.state) == {"step", "params"} and stage2.state["step"] == 10
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, stage2.frozen), frozen_before)
  assert not np.array_equal(np.asarray(stage2.state["params"]["layers"]["mlp"]["up_proj"]["lora_b"]), 0)
  model, params, _, _ = W.load_model(str(tmp_path / "w"), scan_layers=False)
  np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["up_proj"]["lora_b"]),
                                np.asarray(stage2.state["params"]["layers"]["mlp"]["up_proj"]["lora_b"][1]))


@pytest.mark.parametrize("override, message", [
    ({"mesh.data": 3}, "does not divide the 8 devices"),
    ({"train.batch_size": 4}, "not divisible by mesh.data x mesh.fsdp = 8"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"quant.block_size": 48}, "quant.block_size"),
    ({"lora.targets": "q_proj,attn"}, "unknown target module 'attn'"),
])
def test_bad_settings_fail_before_any_checkpoint(demo_config, tiny_hf_dir, tmp_path, override, message):
  with pytest.raises(UserError, match=message):
    T.train_and_evaluate(sft_config(demo_config, tiny_hf_dir, **override), str(tmp_path / "w"))
  assert not os.path.isdir(tmp_path / "w" / "checkpoints") or not os.listdir(tmp_path / "w" / "checkpoints")


def test_exporting_a_workdir_without_checkpoint_is_an_error(demo_config, tiny_hf_dir, tmp_path):
  empty = tmp_path / "w"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text(json.dumps(sft_config(demo_config, tiny_hf_dir).to_dict()))
  with pytest.raises(UserError, match="no checkpoint to load"):
    publish.export_hf(str(empty), str(tmp_path / "out"))
  with pytest.raises(UserError, match="not a training workdir"):
    publish.export_hf(str(tmp_path), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
