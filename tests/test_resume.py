"""Resuming a workdir: refused for any change to which batches a step sees or what it computes, allowed for a
longer run; the precomputed DPO reference keyed by its pairs; eval on its own schedule."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from anita_jax.data.preference import PreferenceExample
from anita_jax.errors import UserError
from anita_jax.train import config as C
from anita_jax.train import dpo
from anita_jax.train import loop as T
from anita_jax.train import resume as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "anita_jax", "demo_data")
LR = 5e-4


def _copy_rows(source: str, target, n: int) -> str:
  with open(os.path.join(DEMO, source)) as f:
    target.write_text("".join(f.readlines()[:n]))
  return str(target)


@pytest.fixture(scope="module")
def base(tiny_hf_dir, tmp_path_factory):
  """The fields every run here shares: 6 steps of 2 rows of 64 tokens, logged every 3, evaluated every 2."""
  data = tmp_path_factory.mktemp("data")
  return {"model.path": tiny_hf_dir, "data.train": _copy_rows("sft_train.jsonl", data / "train.jsonl", 16),
          "data.eval": _copy_rows("sft_eval.jsonl", data / "eval.jsonl", 4), "data.max_length": 64,
          "data.truncation": "truncate", "data.max_rows": 16, "train.batch_size": 2, "train.steps": 6,
          "train.log_every": 3, "train.eval_every": 2, "train.eval_on_start": False, "train.warmup_steps": 0,
          "train.lr": LR, "train.schedule": "linear", "lora.rank": 4, "checkpoint.every": 3, "mesh.data": 1}


def stage(demo_config, base, **overrides):
  c = demo_config("sft")
  c.update_from_flattened_dict({**base, **overrides})
  return c


@pytest.fixture(scope="module")
def trained(demo_config, base, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  T.train_and_evaluate(stage(demo_config, base), workdir)
  return workdir


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def script(workdir, base, **overrides):
  """scripts/train.py with the fields of `base` and `overrides` as flags: (exit code, stderr lines)."""
  flags = [f"--config.{k}={v}" for k, v in {**base, **overrides}.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           "--config=" + os.path.join(ROOT, "configs", "anita_demo.py") + ":sft",
                           f"--workdir={workdir}"] + flags, env=env, capture_output=True, text=True, timeout=600)
  return result.returncode, result.stderr.strip().splitlines()


def test_eval_runs_on_its_own_schedule(trained):
  rows = metric_rows(trained)
  assert [r["step"] for r in rows if "loss" in r] == [1, 3, 6]
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]
  for r in rows:
    if "eval_loss" in r:
      assert np.isfinite(r["eval_loss"]) and r["eval_loss"] > 0
  assert rows[-1]["learning_rate"] == pytest.approx(LR * (1 - 5 / 6))  # linear to 0 at step 6


@pytest.mark.parametrize("field, old, new", [
    ("train.batch_size", 2, 4), ("train.grad_accum", 1, 2), ("train.seed", 0, 1), ("train.lr", LR, 1e-3),
    ("train.schedule", "linear", "cosine"), ("train.weight_decay", 0.01, 0.0), ("train.epochs", 1, 2),
    ("data.max_length", 64, 48), ("data.packing", True, False), ("dpo.beta", 0.1, 0.2), ("lora.dropout", 0.0, 0.1),
    ("model.dtype", "float32", "bfloat16")])
def test_a_change_to_what_a_step_sees_or_computes_is_refused(demo_config, base, trained, field, old, new):
  before = open(os.path.join(trained, "config.json")).read()
  with pytest.raises(UserError) as e:
    T.train_and_evaluate(stage(demo_config, base, **{field: new}), trained)
  assert str(e.value) == (f"{trained}/config.json: this workdir was trained with {field}={old!r}, not {new!r}; "
                          "use a new --workdir or the original setting")
  assert open(os.path.join(trained, "config.json")).read() == before


def test_changed_data_content_is_refused_and_a_moved_copy_is_not(demo_config, base, trained, tmp_path):
  moved = shutil.copy(base["data.train"], tmp_path / "moved.jsonl")
  c = C.freeze(stage(demo_config, base, **{"data.train": str(moved)}))
  R.check(c, trained, R.data_fingerprints(c))  # the same rows under another path

  for field in ("data.train", "data.eval"):
    lines = open(base[field]).read().splitlines(keepends=True)
    row = json.loads(lines[1])
    row["messages"][-1]["content"] += " Ecco."
    edited = tmp_path / f"edited_{field}.jsonl"
    edited.write_text("".join(lines[:1] + [json.dumps(row) + "\n"] + lines[2:]))
    with pytest.raises(UserError) as e:
      T.train_and_evaluate(stage(demo_config, base, **{field: str(edited)}), trained)
    message = str(e.value)
    assert message.startswith(f"{trained}/data_fingerprint.json: this workdir was trained on other {field} rows: "
                              f"the content of {edited} changed (sha256 "), message
    assert "\n" not in message

  with pytest.raises(UserError, match=r"config.json: this workdir was trained with data.eval='.*eval.jsonl', not ''"):
    T.train_and_evaluate(stage(demo_config, base, **{"data.eval": ""}), trained)


def test_fields_that_do_not_change_the_steps_may_change(demo_config, base, trained):
  c = C.freeze(stage(demo_config, base, **{"train.steps": 9, "train.log_every": 1, "train.eval_every": 0,
                                           "train.eval_on_start": True, "checkpoint.every": 1, "checkpoint.keep": 5,
                                           "mesh.data": 2, "model.remat": "full", "train.on_nonfinite": "skip"}))
  R.check(c, trained, R.data_fingerprints(c))


def test_changes_through_the_script_are_one_error_line(base, trained, tmp_path):
  code, lines = script(trained, base, **{"train.batch_size": 4})
  assert code == 2 and lines == [f"error: {trained}/config.json: this workdir was trained with train.batch_size=2, "
                                 "not 4; use a new --workdir or the original setting"], lines
  edited = tmp_path / "edited.jsonl"
  edited.write_text(open(base["data.train"]).read().replace("zaino", "sacco"))
  code, lines = script(trained, base, **{"data.train": str(edited)})
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith(f"error: {trained}/data_fingerprint.json: this workdir was trained on other data.train "
                             "rows: the content of"), lines


def test_a_longer_run_resumes(demo_config, base, trained, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  T.train_and_evaluate(stage(demo_config, base, **{"train.steps": 8}), workdir)
  rows = metric_rows(workdir)[len(metric_rows(trained)):]
  assert [(r["step"], "loss" in r, "eval_loss" in r) for r in rows] == [(8, True, True)]
  assert rows[0]["learning_rate"] == pytest.approx(LR * (1 - 7 / 8))  # the schedule now ends at step 8
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())[-1] == 8


def test_an_invalid_eval_every_is_one_error_line(demo_config, tmp_path):
  code, lines = script(str(tmp_path / "w"), {}, **{"train.eval_every": -1})
  assert code == 2 and lines == ["error: config field 'train.eval_every'=-1: must be >= 0"], lines
  assert not os.path.exists(tmp_path / "w")
  c = C.replace(C.freeze(demo_config("sft")), **{"train.eval_every": 1.5})
  with pytest.raises(UserError, match=r"^config field 'train.eval_every'=1.5: must be an integer >= 0$"):
    C.validate(c)


def _pair(prompt, chosen, rejected):
  return PreferenceExample(np.array(prompt), np.array(chosen), np.array(rejected))


def test_the_precomputed_reference_is_keyed_by_its_pairs(tmp_path, monkeypatch):
  calls = []

  def reference_logps(stage, examples, batch_size, max_length, pad_id):  # a new value on each computation
    calls.append(len(examples))
    return np.full((len(examples), 2), -float(len(calls)), np.float32)

  monkeypatch.setattr(dpo, "reference_logps", reference_logps)
  c = C.freeze(C.stage_config("dpo"))
  stage = types.SimpleNamespace(config=c)
  it = types.SimpleNamespace(examples=[_pair([1], [2], [3]), _pair([4], [5, 6], [7])], pad_id=0)
  workdir = str(tmp_path)

  def reference():
    return dpo.cached_reference(stage, it, workdir)[0, 0]

  assert (reference(), reference()) == (-1, -1) and calls == [2]  # computed once, then read back
  it.examples[1] = _pair([4], [5], [6, 7])  # the same tokens, another boundary
  assert reference() == -2
  stage.config = C.replace(c, **{"model.dtype": "bfloat16"})  # another reference model
  assert reference() == -3
  np.save(os.path.join(workdir, dpo.REFERENCE_FILE), np.zeros((2, 2), np.float32))  # replaced behind its key
  assert (reference(), reference()) == (-4, -4)
  os.remove(os.path.join(workdir, dpo.REFERENCE_KEY_FILE))  # a run killed between the two writes
  assert reference() == -5 and calls == [2] * 5
