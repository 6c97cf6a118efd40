"""Prepared data (data.prepared, data.parallel, train.data): encoded once, read back by every later run.

The reference for the cached and the parallel examples is the one-process encoding (itself checked against
transformers' chat templates and TRL's preparation in test_data.py)."""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from test_gcs import BUCKET, gcs  # noqa: F401 - gcs is a fixture
from test_multihost import free_port

from anita_jax.data import encode, parallel, preference, prepared
from anita_jax.data import rows as D
from anita_jax.errors import UserError
from anita_jax.train import config as C
from anita_jax.train import data as TD
from anita_jax.train import objectives as OBJ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "anita_jax", "demo_data")
SFT, DPO = os.path.join(DEMO, "sft_train.jsonl"), os.path.join(DEMO, "dpo_train.jsonl")
# ChatML, refusing a conversation that mentions VIETATO: a row that loads but that encoding rejects.
STRICT_TEMPLATE = ("{% for m in messages %}{% if 'VIETATO' in m['content'] %}{{ raise_exception('forbidden "
                   "content') }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol():
  from anita_jax.convert.loading import embedded_default_path, load_tokenizer
  return load_tokenizer(embedded_default_path())


def config(demo_config, stage, path, **overrides):
  return C.replace(C.freeze(demo_config(stage)), **{"data.train": path, "data.eval": "", **overrides})


def as_lists(examples):
  return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(ex).items()} for ex in examples]


def batches(it):
  return [{k: v.tolist() for k, v in b.items()} for b in it.eval_batches()]


def write_rows(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  return str(path)


def sft_rows(n):
  """n distinct chat rows: the demo SFT rows, cycled, each answer numbered."""
  base = [json.loads(line) for line in open(SFT, encoding="utf-8")]
  out = []
  for i in range(n):
    row = copy.deepcopy(base[i % len(base)])
    row["messages"][-1]["content"] += f" ({i})"
    out.append(row)
  return out


def no_encoding(monkeypatch):
  """Makes any encoding by an objective fail: what runs under it reads prepared data."""
  def refuse(*args, **kwargs):
    raise AssertionError("encoded instead of reading the prepared data")
  for obj in set(OBJ.OBJECTIVES.values()):
    monkeypatch.setattr(obj, "encode", refuse)


@pytest.mark.parametrize("stage,path,overrides", [
    ("sft", SFT, {"data.mask": "all", "data.packing": True}),
    ("sft", SFT, {"data.mask": "assistant", "data.packing": False}),
    ("dpo", DPO, {"data.packing": True, "data.max_length": 128, "data.max_prompt_length": 64}),
    ("dpo", DPO, {"data.packing": False, "data.max_length": 128, "data.max_prompt_length": 64}),
])
def test_prepared_examples_and_batches_equal_fresh_ones(demo_config, smol, tmp_path, monkeypatch, stage, path,
                                                        overrides):
  c = config(demo_config, stage, path, **overrides)
  fresh, fresh_stats = OBJ.objective(stage).encode(c, D.load_rows([path]), smol)
  fresh_it, _ = TD.build_data(c, smol, batch_size=4)  # no workdir: encoded, nothing kept
  assert not os.path.exists(tmp_path / "prepared")
  TD.build_data(c, smol, batch_size=4, workdir=str(tmp_path))
  assert len(os.listdir(tmp_path / "prepared")) == 1
  no_encoding(monkeypatch)
  it, stats = TD.build_data(c, smol, batch_size=4, workdir=str(tmp_path))
  assert as_lists(it.examples) == as_lists(fresh)
  assert str(stats) == str(fresh_stats) and vars(stats) == vars(fresh_stats)
  assert batches(it) == batches(fresh_it)


def test_restart_reads_the_prepared_data_in_a_fifth_of_the_time(demo_config, smol, tmp_path, monkeypatch, capfd):
  path = write_rows(tmp_path / "rows.jsonl", sft_rows(3000))
  c = config(demo_config, "sft", path, **{"data.packing": True})
  workdir = str(tmp_path / "run")
  start = time.perf_counter()
  _, first_stats = TD.build_data(c, smol, workdir=workdir)
  first = time.perf_counter() - start
  assert "train data: encoded 3000 rows" in capfd.readouterr().err
  no_encoding(monkeypatch)
  start = time.perf_counter()
  it, stats = TD.build_data(c, smol, workdir=workdir)
  second = time.perf_counter() - start
  assert "train data: read the prepared examples from" in capfd.readouterr().err
  assert len(it.examples) == stats.kept == first_stats.kept == 3000
  assert second <= first / 5, (first, second)


def test_key_follows_content_tokenizer_template_and_fields(demo_config, smol, tmp_path):
  rows = D.load_rows([SFT])
  c = config(demo_config, "sft", SFT)
  key = prepared.key(rows, smol, TD.encoding_fields(c))
  assert prepared.key(rows, smol, TD.encoding_fields(c)) == key
  # The same rows under another path, the fields that only choose the rows, and packing (a batching choice):
  # the same key.
  copied = write_rows(tmp_path / "copy.jsonl", [json.loads(line) for line in open(SFT, encoding="utf-8")])
  assert prepared.key(D.load_rows([copied]), smol, TD.encoding_fields(C.replace(c, **{"data.train": copied}))) == key
  assert prepared.key(rows, smol, TD.encoding_fields(C.replace(c, **{"data.packing": not c.data.packing}))) == key
  edited = [json.loads(line) for line in open(SFT, encoding="utf-8")]
  edited[417]["messages"][-1]["content"] += "!"
  assert prepared.key(D.load_rows([write_rows(tmp_path / "edited.jsonl", edited)]), smol,
                      TD.encoding_fields(c)) != key
  template = copy.deepcopy(smol)
  template.chat_template = smol.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
  vocabulary = copy.deepcopy(smol)
  vocabulary.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
  for other in (template, vocabulary):
    assert prepared.key(rows, other, TD.encoding_fields(c)) != key
  d = c.data
  for field, value in (("data.max_length", d.max_length + 1),
                       ("data.mask", "assistant" if d.mask == "all" else "all"),
                       ("data.truncation", "drop" if d.truncation == "truncate" else "truncate"),
                       ("data.format", "messages" if d.format != "messages" else "auto"), ("stage", "lm")):
    assert prepared.key(rows, smol, TD.encoding_fields(C.replace(c, **{field: value}))) != key, field
  assert prepared.tokenizer_fingerprint(object()) is None  # a slow tokenizer: not cached


def test_changed_data_encodes_again_into_a_new_directory(demo_config, smol, tmp_path, capfd):
  rows = sft_rows(50)
  path = write_rows(tmp_path / "rows.jsonl", rows)
  c = config(demo_config, "sft", path)
  TD.build_data(c, smol, workdir=str(tmp_path / "run"))
  rows[10]["messages"][-1]["content"] = "Un'altra risposta."
  write_rows(tmp_path / "rows.jsonl", rows)
  capfd.readouterr()
  it, _ = TD.build_data(c, smol, workdir=str(tmp_path / "run"))
  assert "encoded 50 rows" in capfd.readouterr().err
  assert len(os.listdir(tmp_path / "run" / "prepared")) == 2
  assert smol.decode(it.examples[10].input_ids).count("Un'altra risposta.") == 1


@pytest.mark.parametrize("stage,path,fields", [
    ("sft", SFT, {"max_length": 128, "mask": "assistant"}),
    ("dpo", DPO, {"max_length": 128, "max_prompt_length": 48}),
])
def test_parallel_encoding_equals_one_process(smol, stage, path, fields):
  rows = D.load_rows([path])
  assert len(parallel.chunks(len(rows), 2)) >= 8  # several chunks a worker
  fn = encode.encode_dataset if stage == "sft" else preference.encode_preferences
  one, one_stats = fn(rows, smol, **fields)
  two, two_stats = fn(rows, smol, workers=2, **fields)
  assert as_lists(two) == as_lists(one) and vars(two_stats) == vars(one_stats)
  assert one_stats.truncated > 0  # the limits bite


def _bad_row_error(rows, tokenizer, workers):
  with pytest.raises(UserError) as e:
    encode.encode_dataset(rows, tokenizer, max_length=512, workers=workers)
  return str(e.value)


def forbidden_rows(n, bad):
  rows = sft_rows(n)
  for i in bad:
    rows[i - 1]["messages"][-1]["content"] += " VIETATO"
  return rows


def test_parallel_encoding_raises_the_first_bad_rows_error(smol, tmp_path):
  # Rejected by the chat template, found only when encoding: rows 150 and 450 of a file.
  path = write_rows(tmp_path / "rows.jsonl", forbidden_rows(600, (150, 450)))
  strict = copy.deepcopy(smol)
  strict.chat_template = STRICT_TEMPLATE
  rows = D.load_rows([path])
  one = _bad_row_error(rows, strict, 1)
  assert one.startswith(f"{path}:150: the chat template rejected the conversation (forbidden content"), one
  assert _bad_row_error(rows, strict, 2) == one
  # A field missing (rows made without load_rows' validation): `FILE:ROW: field ...` of the first of rows 200, 500.
  alpaca = [D.Row("data.jsonl", i, {"instruction": f"Domanda {i}?", "output": f"Risposta {i}."}, "alpaca")
            for i in range(1, 601)]
  for i in (199, 499):
    del alpaca[i].data["output"]
  one = _bad_row_error(alpaca, smol, 1)
  assert one == "data.jsonl:200: field 'output' is missing"
  assert _bad_row_error(alpaca, smol, 2) == one


_HOST = """
import hashlib, json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from anita_jax.convert.loading import embedded_default_path, load_tokenizer
from anita_jax.errors import UserError
from anita_jax.train import config as C
from anita_jax.train import data as TD
c = C.replace(C.StageConfig(), **{"data.train": sys.argv[3], "data.max_length": 128})
tokenizer = load_tokenizer(embedded_default_path())
tokenizer.chat_template = sys.argv[5]
try:
  it, stats = TD.build_data(c, tokenizer, workdir=sys.argv[4],
                            num_processes=2, process_index=int(sys.argv[2]))
except UserError as e:
  print("error:", e)
else:
  h = hashlib.sha256()
  for ex in it.examples:
    h.update(ex.input_ids.tobytes() + ex.loss_mask.tobytes() + ex.where.encode())
  print("examples:", len(it.examples), h.hexdigest())
"""


def _two_hosts(path, workdir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", _HOST, address, str(i), path, workdir, STRICT_TEMPLATE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
           for i in range(2)]
  out = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), out
  # Each process's one result line (the collectives print their own lines too), and its stderr.
  return [("".join(line for line in o.splitlines(True) if line.startswith(("examples:", "error:"))), e)
          for o, e in out]


@pytest.mark.slow
def test_two_hosts_encode_once_and_share(tmp_path):
  path = write_rows(tmp_path / "rows.jsonl", sft_rows(40))
  (out0, err0), (out1, err1) = _two_hosts(path, str(tmp_path / "run"))
  assert "encoded 40 rows" in err0 and "encoded" not in err1 and "read the prepared examples" in err1
  assert out0.startswith("examples: 40 ") and out1 == out0
  # Process 0 alone encodes; its error (a row the chat template rejects) is every process's.
  bad = write_rows(tmp_path / "bad.jsonl", forbidden_rows(40, (8,)))
  (out0, _), (out1, err1) = _two_hosts(bad, str(tmp_path / "run"))
  assert out0.startswith(f"error: {bad}:8: the chat template rejected") and out1 == out0, (out0, out1)
  assert "encoded" not in err1


def test_prepared_files_are_arrays_and_json(demo_config, smol, tmp_path):
  c = config(demo_config, "dpo", DPO)
  _, stats = TD.build_data(c, smol, workdir=str(tmp_path))
  (directory,) = (tmp_path / "prepared").iterdir()
  assert sorted(p.name for p in directory.iterdir()) == [prepared.ARRAYS, prepared.STATS]
  with np.load(directory / prepared.ARRAYS, allow_pickle=False) as z:
    assert sorted(z.files) == ["chosen_ids", "chosen_ids_offsets", "prompt_ids", "prompt_ids_offsets",
                               "rejected_ids", "rejected_ids_offsets", "row"]
    assert z["row"].tolist() == list(range(400))  # no pair dropped at max_length 1024
  meta = json.loads((directory / prepared.STATS).read_text())
  assert meta["example_type"] == "PreferenceExample" and meta["stats"] == vars(stats)
  # Unfinished (the arrays without their stats.json): read as absent, so encoded again.
  (directory / prepared.STATS).unlink()
  assert prepared.load(str(directory), D.load_rows([DPO])) is None


@pytest.mark.slow
def test_a_resumed_stage_reads_its_prepared_data(demo_config, tiny_hf_dir, tmp_path, capfd):
  from anita_jax.train import loop
  c = demo_config("sft")
  c.model.path, c.quant.type = tiny_hf_dir, "none"
  c.data.train, c.data.eval = write_rows(tmp_path / "rows.jsonl", sft_rows(200)), ""
  c.data.max_length, c.train.batch_size, c.train.steps, c.checkpoint.every = 128, 8, 2, 1
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(c, workdir, stop_after=1)
  first = capfd.readouterr().err
  assert "train data: encoded 200 rows" in first and "read the prepared" not in first
  loop.train_and_evaluate(c, workdir)
  second = capfd.readouterr().err
  assert "train data: read the prepared examples" in second and "encoded" not in second
  assert os.listdir(os.path.join(workdir, "prepared")) and " data " in second.splitlines()[-1]


def test_prepared_data_in_a_gs_workdir(gcs, demo_config, smol, monkeypatch, capfd):  # noqa: F811
  c = config(demo_config, "dpo", DPO, **{"data.packing": True})
  workdir = f"gs://{BUCKET}/prepared-test"
  fresh_it, fresh_stats = TD.build_data(c, smol, workdir=workdir)
  assert "saved the encoded examples to gs://" in capfd.readouterr().err
  no_encoding(monkeypatch)
  it, stats = TD.build_data(c, smol, workdir=workdir)
  assert "read the prepared examples from gs://" in capfd.readouterr().err
  assert as_lists(it.examples) == as_lists(fresh_it.examples) and vars(stats) == vars(fresh_stats)
