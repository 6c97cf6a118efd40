"""anita_jax.files: atomic writes (with fsync), the JSON Lines reader, comma lists."""

import json
import os

import numpy as np
import pytest

from anita_jax import files
from anita_jax.errors import UserError


# Atomic writes -------------------------------------------------------------------------------------

class Crash(Exception):
  pass


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
  path = tmp_path / "report.json"
  path.write_text("old contents")

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("half of the new")
    raise error

  with pytest.raises(error):
    files.atomic_write(str(path), write)
  assert os.listdir(tmp_path) == ["report.json"]
  assert path.read_text() == "old contents"


def test_a_failed_first_write_leaves_nothing(tmp_path):
  with pytest.raises(TypeError):
    files.write_json(str(tmp_path / "x.json"), {"a": object()})
  assert os.listdir(tmp_path) == []


def test_the_file_and_then_its_directory_are_fsynced(tmp_path, monkeypatch):
  synced, real = [], os.fsync

  def record(fd):
    st = os.fstat(fd)
    synced.append((st.st_dev, st.st_ino))
    real(fd)

  monkeypatch.setattr(os, "fsync", record)
  path = tmp_path / "out.txt"
  files.write_text(str(path), "ciao\n")
  key = lambda p: (os.stat(p).st_dev, os.stat(p).st_ino)  # noqa: E731
  # The renamed file keeps the inode fsynced as the temporary; the directory comes after the rename.
  assert synced == [key(path), key(tmp_path)]
  assert path.read_text() == "ciao\n"


def test_write_json_matches_json_dumps_and_replaces_the_old_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text("old")
  obj = {"b": [1, 2.5, None], "a": {"è": "à"}}
  files.write_json(str(path), obj)
  assert path.read_text(encoding="utf-8") == json.dumps(obj, indent=2, sort_keys=True) + "\n"
  files.write_json(str(path), obj, sort_keys=False, ensure_ascii=False)
  assert path.read_text(encoding="utf-8") == json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
  assert os.listdir(tmp_path) == ["config.json"]


def test_the_temporary_keeps_the_extension_for_writers_that_add_one(tmp_path):
  path = tmp_path / "reference_logps.npy"
  ref = np.arange(6, dtype=np.float32).reshape(3, 2)
  files.atomic_write(str(path), lambda tmp: np.save(tmp, ref, allow_pickle=False))
  assert os.listdir(tmp_path) == ["reference_logps.npy"]
  np.testing.assert_array_equal(np.load(path), ref)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_open_gives_whatever_the_writer_used(tmp_path, mask):
  # safetensors writes its file 0600 (through a temporary of its own); the result must look like open(..., "w")
  from safetensors.numpy import load_file, save_file
  old = os.umask(mask)
  try:
    assert files.umask() == mask
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() makes under this umask
      f.write("x")
    expected = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert expected == 0o666 & ~mask

    def private(tmp):
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    files.atomic_write(str(tmp_path / "private.bin"), private)
    files.atomic_write(str(tmp_path / "w.safetensors"), lambda tmp: save_file({"w": np.ones(3, np.float32)}, tmp))
    files.write_text(str(tmp_path / "t.txt"), "x")
    os.chmod(tmp_path / "t.txt", 0o600)
    files.write_json(str(tmp_path / "t.txt"), {})  # replacing a 0600 file: the new one has the usual mode
    for name in ("private.bin", "w.safetensors", "t.txt"):
      assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(expected), name
    np.testing.assert_array_equal(load_file(str(tmp_path / "w.safetensors"))["w"], np.ones(3, np.float32))
  finally:
    os.umask(old)


def test_fsync_tree_reaches_every_file_and_directory(tmp_path, monkeypatch):
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("x", "a/y", "a/b/z"):
    (tmp_path / name).write_text(name)
  synced = []
  monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino))
  files.fsync_tree(str(tmp_path))
  want = [os.stat(tmp_path / p).st_ino for p in ("a/b/z", "a/b", "a/y", "a", "x", ".")]
  assert sorted(synced) == sorted(want)
  assert synced[-1] == os.stat(tmp_path).st_ino  # the root last, after everything under it


# JSON Lines ----------------------------------------------------------------------------------------

def write(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def error(path, **kwargs) -> str:
  with pytest.raises(UserError) as e:
    files.read_jsonl(path, **kwargs)
  return str(e.value)


def test_rows_come_with_their_line_numbers(tmp_path):
  path = write(tmp_path / "a.jsonl", '\ufeff{"a": 1}\r\n\n  \n{"b": "x\u2028y"}\n{"c": null}'.encode())
  assert files.read_jsonl(path) == [(1, {"a": 1}), (4, {"b": "x\u2028y"}), (5, {"c": None})]
  assert files.read_jsonl(write(tmp_path / "empty.jsonl", b"")) == []


def test_errors_name_the_file_and_the_line(tmp_path):
  path = write(tmp_path / "bad.jsonl", b'{"a": 1}\n\n{"a": \n')
  assert error(path) == f"{path}:3: malformed JSON (Expecting value at column 7)"
  path = write(tmp_path / "list.jsonl", b'{"a": 1}\n[1, 2]\n')
  assert error(path) == f"{path}:2: expected a JSON object, got list"
  path = write(tmp_path / "latin1.jsonl", b'{"a": 1}\n{"a": "\xe8"}\n')
  assert error(path).startswith(f"{path}:2: not valid UTF-8 (invalid continuation byte at byte 7 of the line")
  assert error(str(tmp_path / "absent.jsonl")) == f"{tmp_path / 'absent.jsonl'}: no such file"
  assert error(str(tmp_path)) == f"{tmp_path}: cannot read (Is a directory)"


def test_a_cut_last_line_is_skipped_only_when_asked_and_only_at_the_end(tmp_path):
  path = write(tmp_path / "metrics.jsonl", b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
  assert files.read_jsonl(path, skip_cut_last_line=True) == [(1, {"step": 1}), (2, {"step": 2})]
  assert error(path).startswith(f"{path}:3: malformed JSON")
  path = write(tmp_path / "cut_utf8.jsonl", b'{"step": 1}\n{"text": "\xc3')  # cut inside a character
  assert files.read_jsonl(path, skip_cut_last_line=True) == [(1, {"step": 1})]
  path = write(tmp_path / "middle.jsonl", b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
  assert error(path, skip_cut_last_line=True).startswith(f"{path}:2: malformed JSON")
  path = write(tmp_path / "ended.jsonl", b'{"step": 1}\n{"step": 2, "lo\n')  # it has its newline: not cut
  assert error(path, skip_cut_last_line=True).startswith(f"{path}:2: malformed JSON")


def test_data_already_read_is_used_as_is(tmp_path):
  assert files.read_jsonl("rows.json", data=b'{"a": 1}\n') == [(1, {"a": 1})]


# Comma lists ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, want", [
    ("a,b", ["a", "b"]), (" a , b ,, ", ["a", "b"]), ("", []), (",", []), ("single", ["single"]),
    (("q_proj", " v_proj ", ""), ["q_proj", "v_proj"]), ([], []),
])
def test_split_list(value, want):
  assert files.split_list(value) == want


def test_hub_id_is_an_org_name_pair_that_is_not_a_local_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.hub_id("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
  (tmp_path / "runs" / "demo").mkdir(parents=True)
  for local_or_not_a_model in ("runs/demo", str(tmp_path), "./a/b", "~/a", "a/b.gguf", "a/b/c", "a", "", None):
    assert files.hub_id(local_or_not_a_model) is None, local_or_not_a_model
