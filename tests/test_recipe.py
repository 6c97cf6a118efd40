"""scripts/anita.py end to end on a small model: outputs, skip/resume after a kill during DPO, export = generate."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_args(model_dir, workdir):
  args = [sys.executable, os.path.join(ROOT, "scripts", "anita.py"), f"--workdir={workdir}",
          f"--config.sft.model.path={model_dir}"]
  for stage, steps in (("sft", 3), ("dpo", 4), ("lm", 2)):
    args += [f"--config.{stage}.train.steps={steps}", f"--config.{stage}.checkpoint.every=1",
             f"--config.{stage}.train.log_every=1", f"--config.{stage}.data.max_rows=48",
             f"--config.{stage}.mesh.data=4"]
  # dpo: packed pairs (the demo's default), 4 rows so that the 4 data shards each get one
  return args + ["--config.dpo.train.batch_size=4", "--config.report.max_new_tokens=8", "--config.report.max_rows=4"]


def env():
  out = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  return out


def adapter(workdir):
  return load_file(os.path.join(workdir, "hf", "adapter", "adapter_model.safetensors"))


@pytest.mark.slow
def test_recipe_outputs_export_and_resume_after_kill_in_dpo(tiny_hf_dir, tmp_path):
  import torch
  import transformers
  straight = str(tmp_path / "straight")
  result = subprocess.run(recipe_args(tiny_hf_dir, straight), env=env(), capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("sft/DONE.json", "dpo/DONE.json", "lm/DONE.json", "hf/config.json", "hf/adapter/adapter_config.json",
               "gguf/model-f16.gguf", "gguf/Modelfile", "report.json", "report.md", "training_curves.png"):
    assert os.path.isfile(os.path.join(straight, name)), name
  report = json.load(open(os.path.join(straight, "report.json")))
  assert [row["model"] for row in report["models"]] == ["base", "sft", "dpo", "lm"]
  assert all(len(row["answers"]) == 4 for row in report["models"])  # report.max_rows
  md = open(os.path.join(straight, "report.md"), encoding="utf-8").read()
  assert f"llama-cli -m {os.path.join(straight, 'gguf', 'model-f16.gguf')}" in md
  assert f"ollama create anita -f {os.path.join(straight, 'gguf', 'Modelfile')}" in md

  # DIR/hf in transformers answers exactly as generate.py on the final workdir.
  prompt = "Qual è la capitale d'Italia?"
  ours = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                         f"--model={os.path.join(straight, 'lm')}", f"--prompt={prompt}", "--temperature=0",
                         "--max_new_tokens=16"], env=env(), capture_output=True, text=True, timeout=600)
  assert ours.returncode == 0, ours.stderr[-2000:]
  hf = os.path.join(straight, "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
  out = model.generate(**ids, max_new_tokens=16, do_sample=False)
  assert ours.stdout == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(recipe_args(tiny_hf_dir, killed), env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 900
  dpo_ckpt = os.path.join(killed, "dpo", "checkpoints", "2")
  while not os.path.isdir(dpo_ckpt) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isfile(os.path.join(killed, "sft", "DONE.json"))
  assert not os.path.isfile(os.path.join(killed, "dpo", "DONE.json"))
  sft_done = os.path.getmtime(os.path.join(killed, "sft", "DONE.json"))
  result = subprocess.run(recipe_args(tiny_hf_dir, killed), env=env(), capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sft: finished earlier, skipped" in result.stderr
  assert os.path.getmtime(os.path.join(killed, "sft", "DONE.json")) == sft_done  # SFT was not redone
  ours, theirs = adapter(killed), adapter(straight)
  assert sorted(ours) == sorted(theirs)
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
