"""Two processes on localhost (4 CPU devices each, CPU collectives) as the hosts of one slice.

That they train exactly like one process with 8 devices is checked with the workdir in a bucket, stopped and
resumed (test_gcs.py); here, preemption of one host."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_args(model_dir, workdir, extra=()):
  return [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
          f"--config={os.path.join(ROOT, 'configs', 'anita_demo.py')}:sft", f"--workdir={workdir}",
          f"--config.model.path={model_dir}", "--config.data.eval=", "--config.data.max_length=128",
          "--config.train.batch_size=8", "--config.train.steps=4", "--config.train.log_every=1",
          "--config.train.warmup_steps=0", "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.checkpoint.every=2", *extra]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_both_and_resumes(tiny_hf_dir, tmp_path):
  """Cloud TPU preempts a slice by sending SIGTERM to its hosts, not always at once: one signalled
  process is enough for every process to agree on a step, save it collectively and exit 0; the
  re-run resumes from that step and finishes."""
  import signal
  import time
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  workdir = str(tmp_path / "run")

  def launch(steps):
    port = free_port()
    return [subprocess.Popen(train_args(tiny_hf_dir, workdir, [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
        f"--config.train.steps={steps}", "--config.checkpoint.every=1000"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]

  procs = launch(400)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert "SIGTERM received; saved the checkpoint of step" in err, err[-3000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 400, saved

  procs = launch(saved[0] + 2)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  steps = [json.loads(line)["step"] for line in open(metrics)]
  assert steps[-1] == saved[0] + 2 and steps[-2] == saved[0] + 1, steps
