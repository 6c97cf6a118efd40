"""Crashes, preemption and divergence: the trainer and the exporter as a production job meets them.

Each interruption runs the real script in a subprocess with one fault planted by `_faulty.py` (a SIGKILL at a
chosen point, or a SIGTERM as Cloud TPU sends before preempting a VM); the next run resumes.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from anita_jax.train import loop as T
from anita_jax.train import workdir as W
from anita_jax.errors import UserError
from anita_jax.apps.report import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a script with one fault: FAULT=point:n acts on the n-th time the program reaches `point`.
FAULTY = textwrap.dedent('''
    import os, runpy, signal, sys
    point, n = os.environ["FAULT"].split(":")
    n, seen = int(n), {"count": 0}

    def reached():
      seen["count"] += 1
      return seen["count"] == n

    def die():
      os.kill(os.getpid(), signal.SIGKILL)

    if point in ("step", "sigterm"):  # just after the n-th step is dispatched (it is still running)
      from anita_jax.train import step as train
      compile_step = train.compile_step
      def patched(*args, **kwargs):
        step = compile_step(*args, **kwargs)
        def run(*a):
          out = step(*a)
          if reached():
            os.kill(os.getpid(), signal.SIGTERM) if point == "sigterm" else die()
          return out
        return run
      train.compile_step = patched
    elif point == "commit":  # a checkpoint fully written to its temporary directory, not yet renamed
      from orbax.checkpoint._src.path import atomicity
      finalize = atomicity.AtomicRenameTemporaryPath.finalize
      async def patched(self, *args, **kwargs):
        if reached():
          die()
        return await finalize(self, *args, **kwargs)
      atomicity.AtomicRenameTemporaryPath.finalize = patched
    elif point == "saved":  # right after a checkpoint is complete
      from anita_jax.train import checkpoint
      save = checkpoint.Checkpoints.save
      def patched(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if reached():
          die()
      checkpoint.Checkpoints.save = patched
    elif point == "metrics":  # half-way through writing a metrics.jsonl row
      from anita_jax.train import metrics
      write = metrics.MetricsWriter.write
      def patched(self, step, values):
        if reached():
          self._jsonl.write('{"step": %d, "loss": 1' % step)
          self._jsonl.flush()
          die()
        write(self, step, values)
      metrics.MetricsWriter.write = patched
    elif point == "export":  # after the first weight file of an export
      import safetensors.numpy
      save_file = safetensors.numpy.save_file
      def patched(*args, **kwargs):
        save_file(*args, **kwargs)
        if reached():
          die()
      safetensors.numpy.save_file = patched
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')

STEPS, EVERY = 12, 4


def env(fault=None):
  out = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out.pop("FAULT", None)
  if fault:
    out["FAULT"] = fault
  return out


def run(tmp_path, script, args, fault=None):
  faulty = tmp_path / "_faulty.py"
  faulty.write_text(FAULTY)
  command = [sys.executable] + ([str(faulty)] if fault else []) + [os.path.join(ROOT, "scripts", script)] + args
  return subprocess.run(command, env=env(fault), capture_output=True, text=True, timeout=900)


def train_args(model_dir, workdir):
  return ["--config=" + os.path.join(ROOT, "configs", "anita_demo.py") + ":sft", f"--workdir={workdir}",
          f"--config.model.path={model_dir}", "--config.data.eval=", "--config.data.max_length=128",
          "--config.data.max_rows=96", f"--config.train.steps={STEPS}", f"--config.checkpoint.every={EVERY}",
          "--config.train.log_every=1", "--config.train.warmup_steps=2", "--config.mesh.data=1"]


def adapters_of(workdir):
  return jax.tree.map(np.asarray, W.load_trained(workdir).state["params"])


def steps_on_disk(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.slow
def test_sigkill_at_five_points_and_sigterm_resume_exactly(tiny_hf_dir, tmp_path):
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  done = run(tmp_path, "train.py", train_args(tiny_hf_dir, straight))
  assert done.returncode == 0, done.stderr[-3000:]

  def crash(fault, expect_code=-9):
    result = run(tmp_path, "train.py", train_args(tiny_hf_dir, broken), fault)
    assert result.returncode == expect_code, (fault, result.stderr[-3000:])
    return result

  crash("step:3")  # inside step 3, before any checkpoint
  assert steps_on_disk(broken) == []
  crash("commit:1")  # step 4's checkpoint written but not committed: not taken for complete
  assert steps_on_disk(broken) == []
  crash("saved:1")  # step 4 committed, then killed
  assert steps_on_disk(broken) == [4]
  crash("metrics:3")  # resumed at 4; killed mid-row of step 7's metrics
  assert steps_on_disk(broken) == [4]
  preempted = crash("sigterm:2", expect_code=0)  # resumed at 4; SIGTERM in step 6: saved at 6, exit 0
  assert "SIGTERM received; saved the checkpoint of step 6" in preempted.stderr
  assert steps_on_disk(broken) == [4, 6]
  finished = crash(None, expect_code=0)
  assert "Traceback" not in finished.stderr
  timing = [line for line in finished.stderr.splitlines() if line.startswith("sft wall time: ")]
  assert len(timing) == 1, finished.stderr[-3000:]
  for phase in ("import", "data", "state", "compile + first step", "steps", "checkpoints"):
    assert f" {phase} " in timing[0], timing

  jax.tree.map(np.testing.assert_array_equal, adapters_of(broken), adapters_of(straight))
  # Every step logged once more after each resume; the last row of a step wins and equals the straight run.
  assert [(r["step"], r["loss"]) for r in read_metrics(broken)] == [(r["step"], r["loss"])
                                                                    for r in read_metrics(straight)]

  # An export killed after its first file leaves no output; the next one equals an uninterrupted export.
  out_straight, out_broken = str(tmp_path / "hf_straight"), str(tmp_path / "hf_broken")
  assert run(tmp_path, "export_hf.py", [f"--workdir={straight}", f"--output={out_straight}"]).returncode == 0
  killed = run(tmp_path, "export_hf.py", [f"--workdir={broken}", f"--output={out_broken}"], "export:1")
  assert killed.returncode == -9
  assert not os.path.exists(out_broken)
  assert run(tmp_path, "export_hf.py", [f"--workdir={broken}", f"--output={out_broken}"]).returncode == 0
  assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if ".tmp-" not in n)
  for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
    a, b = load_file(os.path.join(out_broken, name)), load_file(os.path.join(out_straight, name))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------------------------
# Divergence


@pytest.fixture(scope="module")
def poisoned(tiny_hf_dir, tmp_path_factory):
  """The tiny model with one token's embedding set to NaN, and text rows of which one holds that token."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
  clean = ["uno due tre quattro cinque", "il gatto dorme sul divano", "oggi piove a Milano", "la pasta è pronta"]
  rows = [f"{clean[i % 4]} {i}" for i in range(15)] + ["la zebra corre veloce"]
  common = {t for r in rows[:-1] for t in tokenizer(r)["input_ids"]}
  poison = next(t for t in tokenizer(rows[-1])["input_ids"] if t not in common)
  model_dir = tmp_path_factory.mktemp("poisoned")
  for name in os.listdir(tiny_hf_dir):
    shutil.copy(os.path.join(tiny_hf_dir, name), model_dir / name)
  weights = load_file(str(model_dir / "model.safetensors"))
  # Untied, so that only the input embedding of the poison token is NaN (a tied head would poison every row).
  weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
  weights["model.embed_tokens.weight"][poison] = np.nan
  save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
  config = json.loads((model_dir / "config.json").read_text())
  config["tie_word_embeddings"] = False
  (model_dir / "config.json").write_text(json.dumps(config))
  data = model_dir / "rows.jsonl"
  data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
  return str(model_dir), str(data)


def nan_config(demo_config, poisoned, mode):
  model_dir, data = poisoned
  c = demo_config("lm")
  c.model.path, c.data.train, c.data.eval = model_dir, data, ""
  c.data.packing, c.data.max_length = False, 32
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.warmup_steps = 2, 8, 4, 0
  c.train.on_nonfinite = mode
  c.checkpoint.every, c.checkpoint.keep = 1, 20
  c.lora.rank = 4
  c.mesh.data = 1
  return c


def test_nonfinite_step_stops_or_is_skipped(demo_config, poisoned, tmp_path):
  skip = str(tmp_path / "skip")
  T.train_and_evaluate(nan_config(demo_config, poisoned, "skip"), skip)
  rows = read_metrics(skip)
  assert rows[-1]["step"] == 8 and rows[-1]["skipped_steps"] == 1.0
  for leaf in jax.tree.leaves(adapters_of(skip)):
    assert np.isfinite(leaf).all()
  assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(adapters_of(skip)))

  stop = str(tmp_path / "stop")
  with pytest.raises(UserError, match=r"step (\d+): the loss or gradient is not finite") as info:
    T.train_and_evaluate(nan_config(demo_config, poisoned, "stop"), stop)
  bad = int(info.value.args[0].split(":")[0].split()[1])
  # The checkpoints end at the last good step, and hold finite values.
  assert steps_on_disk(stop) == list(range(1, bad))
  if bad > 1:
    for leaf in jax.tree.leaves(adapters_of(stop)):
      assert np.isfinite(leaf).all()


# ----------------------------------------------------------------------------------------------
# Bad input to the trainer


def small_sft(demo_config, model_dir, **overrides):
  c = demo_config("sft")
  c.model.path, c.data.eval = model_dir, ""
  c.data.max_length, c.data.max_rows = 128, 16
  c.train.batch_size, c.train.steps, c.train.log_every = 2, 2, 1
  c.checkpoint.every = 1
  c.mesh.data = 1
  c.update_from_flattened_dict(overrides)
  return c


def test_full_disk_while_checkpointing_keeps_earlier_checkpoints(demo_config, tiny_hf_dir, tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity
  workdir = str(tmp_path / "w")
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self, *args, **kwargs):
    if self._final_path.name == "2":  # the checkpoint of step 2
      raise OSError(errno.ENOSPC, "No space left on device")
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  with pytest.raises(UserError, match=r"checkpoints: saving the checkpoint of step 2 failed \(No space left on "
                                      r"device\); the checkpoints before it are intact"):
    T.train_and_evaluate(small_sft(demo_config, tiny_hf_dir), workdir)
  assert steps_on_disk(workdir) == [1]
  monkeypatch.undo()
  T.train_and_evaluate(small_sft(demo_config, tiny_hf_dir), workdir)  # resumes from step 1
  assert steps_on_disk(workdir) == [1, 2]


def test_resume_with_another_model_or_lora_shape_is_refused(demo_config, tiny_hf_dir, tmp_path):
  workdir = str(tmp_path / "w")
  T.train_and_evaluate(small_sft(demo_config, tiny_hf_dir, **{"train.steps": 1}), workdir)
  for override, field in (({"lora.rank": 4}, "lora.rank"), ({"model.path": str(tmp_path / "another")}, "model.path"),
                          ({"quant.type": "int4"}, "quant.type")):
    with pytest.raises(UserError, match=rf"config.json: this workdir was trained with {field}="):
      T.train_and_evaluate(small_sft(demo_config, tiny_hf_dir, **override), workdir)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(demo_config, tiny_hf_dir, tmp_path):
  small = tmp_path / "small_vocab"
  shutil.copytree(tiny_hf_dir, small)
  config = json.loads((small / "config.json").read_text())
  config["vocab_size"] = 32000
  (small / "config.json").write_text(json.dumps(config))
  weights = load_file(str(small / "model.safetensors"))
  weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:32000]
  save_file(weights, str(small / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError, match=r"small_vocab: the tokenizer has 49152 tokens but the model's vocab_size is "
                                      r"32000"):
    T.train_and_evaluate(small_sft(demo_config, str(small)), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("flag, message", [
    ("--config.train.lrr=1e-4", "error: --config.train.lrr: unknown config field 'lrr'"),
    ("--config.train.steps=many", "error: flag --config.train.steps=many: invalid literal for int()"),
    ("--config.trainn.lr=1", "error: --config.trainn.lr: unknown config field 'trainn' (did you mean 'train'?)"),
    ("--config.train.schedule=cosinus", "error: config field 'train.schedule'='cosinus': expected one of"),
])
def test_unknown_config_fields_and_wrong_types_are_one_error_line(tmp_path, flag, message):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           "--config=" + os.path.join(ROOT, "configs", "anita_demo.py") + ":sft",
                           f"--workdir={tmp_path / 'w'}", flag], env=env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


NO_FILE = "error: --config: cannot load the config file ([Errno 2] No such file or directory: "


@pytest.mark.parametrize("script, config, overrides, message", [
    ("train.py", "anita_dem.py:sft", [], NO_FILE),
    # an override reaches the config of the file that did not load while absl still parses the flags
    ("train.py", "anita_dem.py:sft", ["--config.train.steps=2"], NO_FILE),
    ("anita.py", "anita_dem.py", ["--config.sft.train.steps=2"], NO_FILE),
    ("train.py", "anita_demo.py:dop", [], "error: --config=CONFIGS/anita_demo.py:dop: unknown stage 'dop': "),
    ("train.py", "anita_demo.py:dop", ["--config.train.steps=2"], "error: --config=CONFIGS/anita_demo.py:dop: "),
    ("anita.py", "anita_demo.py:dop", [], "error: --config=CONFIGS/anita_demo.py:dop: unknown stage 'dop': "),
    ("anita.py", "anita_8b.py:sfft", [], "error: --config=CONFIGS/anita_8b.py:sfft: unknown stage 'sfft': "),
], ids=["file", "file-override", "recipe-file-override", "stage", "stage-override", "recipe-stage", "8b-stage"])
def test_a_misspelt_config_file_or_stage_is_one_error_line(tmp_path, script, config, overrides, message):
  configs = os.path.join(ROOT, "configs")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), f"--config={configs}/{config}",
                           f"--workdir={tmp_path / 'w'}"] + overrides, env=env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message.replace("CONFIGS", configs)), result.stderr[-2000:]
  file = os.path.join(configs, config.split(":")[0])
  if os.path.isfile(file):  # the stages the file has, by name (sft, dpo, lm; no ARG = the recipe)
    assert re.search(r"has sft, dpo, lm \(and, without :ARG, the whole recipe", lines[0]), lines[0]
  else:
    assert lines[0].endswith(f"'{file}')")  # the file as given
  assert not os.path.exists(tmp_path / "w")


def test_aot_compile_starts_libtpu_quietly_and_still_shows_its_errors(tmp_path):
  # A topology libtpu itself refuses: its start-up has happened (on this CPU host, without metadata server)
  # by the time it answers, and its answer is the one line; its "could not determine TPU accelerator type"
  # warning and the INVALID_ARGUMENT about a placeholder worker hostname are gone.
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "aot_compile.py"),
                           "--config=" + os.path.join(ROOT, "configs", "anita_demo.py") + ":sft",
                           "--topology=v5e:3x3", "--nocross_check", f"--output={tmp_path / 'aot.json'}"],
                          env=env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: --topology=v5e:3x3: libtpu refused it (INVALID_ARGUMENT: Topology layout \"v5e:3x3\""), result.stderr
  assert not (tmp_path / "aot.json").exists()


def test_a_gguf_type_the_recipe_cannot_write_is_refused_before_training(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "anita.py"), f"--workdir={tmp_path / 'w'}",
                           "--config.export.gguf=f16,q4_k_m"], env=env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: config field 'export.gguf'='f16,q4_k_m': --type=q4_k_m: K-quants are made by llama.cpp"), result.stderr
  assert "llama-quantize" in lines[0]
  assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------------------------
# Safety


def test_tokenizer_code_in_a_checkpoint_is_never_run(tiny_hf_dir, tmp_path):
  from anita_jax.convert import loading
  model_dir = tmp_path / "model"
  shutil.copytree(tiny_hf_dir, model_dir)
  config = json.loads((model_dir / "tokenizer_config.json").read_text())
  config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
  (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
  marker = tmp_path / "code_ran"
  (model_dir / "tokenization_evil.py").write_text(
      f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
  tokenizer = loading.load_tokenizer(str(model_dir))
  assert len(tokenizer) == 49152 and not marker.exists()


def test_training_writes_only_inside_its_workdir(demo_config, tiny_hf_dir, tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  (data / "rows.jsonl").write_text("".join(
      json.dumps({"messages": [{"role": "user", "content": f"../../{i}"},
                               {"role": "assistant", "content": f"/etc/passwd {i}"}]}) + "\n" for i in range(8)))
  monkeypatch.chdir(tmp_path)
  before = {p for p in tmp_path.rglob("*")}
  c = small_sft(demo_config, tiny_hf_dir, **{"data.train": str(data / "rows.jsonl")})
  T.train_and_evaluate(c, str(tmp_path / "w"))
  created = {p for p in tmp_path.rglob("*")} - before
  assert created and all(p.is_relative_to(tmp_path / "w") for p in created), sorted(created)[:5]
