"""Files: written whole or not at all, JSON Lines read with errors naming the line, comma lists.

The one way the package does each of these. It sits beside `errors` at the bottom of the layers
and imports only the standard library and `errors`.

- `atomic_write(path, write)`: `write` fills a sibling temporary file, which is fsynced, renamed
  over `path` and its directory fsynced. A crash at any point leaves either the old file or the
  new one, never a mix; after a power loss the new one is there once `atomic_write` has returned.
  The file gets the mode `open(path, "w")` gives (0644 under umask 022), whatever mode the writer
  gave its temporary file (safetensors writes 0600 ones). A URL `path`: `write` fills a local
  temporary file, uploaded as one object once it is complete.
  `write_text` and `write_json` are the common cases.
- `fsync_file` / `fsync_tree`: the flushes `atomic_write` does, for directories written whole
  (`convert.export.atomic_dir`).
- `read_jsonl(path)`: the rows of a JSON Lines file with their 1-based line numbers; every
  problem is a `UserError` naming the file and the line.
- `split_list(value)`: "a, b,,c" -> ["a", "b", "c"] (config fields and flags that hold lists).
- `hub_id(path)`: `path` when it names a Hugging Face Hub model rather than a local file, else None.
- Object stores: every path above and below may be a URL (`gs://bucket/run`, or anything fsspec opens):
  `is_remote`, `absolute`, `exists` / `isfile` / `isdir`, `listdir`, `makedirs`, `read_bytes`, `upload_dir`,
  `local_copy`.
  A URL file is written whole or not at all too (an object store replaces an object atomically), through a
  local temporary file; a URL directory is read through a local copy made once per process. fsspec (and
  gcsfs for gs://) are imported only when a URL is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from anita_jax.errors import UserError


# Writing -----------------------------------------------------------------------------------------

def fsync_file(path: str) -> None:
  """Flushes the file or directory `path` to disk (a directory's fsync makes its renames durable)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """Flushes every file under `root`, then each directory from the deepest up to `root` itself."""
  for directory, _, names in os.walk(root, topdown=False):
    for name in names:
      fsync_file(os.path.join(directory, name))
    fsync_file(directory)


def temporary_path(path: str) -> str:
  """The sibling temporary name `atomic_write` uses: `dir/name.tmp-PID.ext`.

  It keeps the extension, so writers that go by it (`np.save` adds ".npy" otherwise) write
  exactly this file, and the same directory, so the final rename never crosses file systems.
  """
  root, ext = os.path.splitext(path)
  return f"{root}.tmp-{os.getpid()}{ext}"


def umask() -> int:
  """The process's umask, read without changing it where Linux shows it (os.umask can only read it by
  setting it, for all threads)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def default_mode() -> int:
  """The permission bits of a new file made by open(path, "w"): 0o666 less the umask."""
  return 0o666 & ~umask()


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
  """Replaces `path` with what `write(tmp)` puts into the temporary file `tmp`, atomically.

  `tmp` is fsynced, renamed over `path` (os.replace) and the directory fsynced. On any exception
  (KeyboardInterrupt included) `tmp` is removed and an existing `path` is left as it was. The
  directory must exist. The file's mode is `default_mode()`. A URL: see `_upload`.
  """
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="anita-upload-") as directory:
      tmp = os.path.join(directory, os.path.basename(path))
      write(tmp)
      _upload(tmp, path)
    return
  tmp = temporary_path(path)
  try:
    write(tmp)
    os.chmod(tmp, default_mode())
    fsync_file(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  fsync_file(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str) -> None:
  """`text` into `path` as UTF-8, atomically (see `atomic_write`)."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  atomic_write(path, write)


def write_json(path: str, obj: Any, *, sort_keys: bool = True, ensure_ascii: bool = True) -> None:
  """`obj` as indented JSON (indent 2, a final newline) into `path`, atomically.

  sort_keys=False keeps the order of `obj` where it carries meaning (a report); ensure_ascii=False
  writes non-ASCII text as itself rather than as \\u escapes. An object JSON cannot encode raises
  TypeError before any file is touched.
  """
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n")


# Reading -----------------------------------------------------------------------------------------

def read_jsonl(path: str, *, data: bytes | None = None, skip_cut_last_line: bool = False) -> list[tuple[int, dict]]:
  """(1-based line number, row) for each non-blank line of the JSON Lines file `path`.

  Every row must be a JSON object. Lines end at "\\n" ("\\r\\n" also reads); a UTF-8 byte-order
  mark before the first line is ignored. Errors are one `UserError`, `PATH:LINE: problem`
  (`PATH: problem` when the file cannot be read).

  data: the file's bytes, when the caller has read them already.
  skip_cut_last_line: a last line without its newline that does not parse is ignored instead of
    refused: what an appending writer killed mid-line leaves.
  """
  if data is None:
    try:
      data = read_bytes(path)
    except FileNotFoundError:
      raise UserError(f"{path}: no such file") from None
    except OSError as e:
      raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
  lines = data.split(b"\n")
  rows = []
  for number, raw in enumerate(lines, 1):
    cut = skip_cut_last_line and number == len(lines)  # `raw` is not "" only when the file ends without "\n"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      if cut:
        break
      raise UserError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
    if number == 1:
      line = line.lstrip("\ufeff")
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if cut:
        break
      raise UserError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
      raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    rows.append((number, row))
  return rows


# Lists -------------------------------------------------------------------------------------------

def split_list(value: str | Iterable[str]) -> list[str]:
  """The items of a comma-separated string, stripped, empty ones dropped.

  A list or tuple (an absl list flag, a config field set from Python) is taken item by item the
  same way.
  """
  items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
  return [s.strip() for s in items if s.strip()]


def hub_id(path: str | None) -> str | None:
  """`path` if it names a Hugging Face Hub model: org/name, and no local file or directory of that name.

  How a model PATH is resolved (`convert.loading`), and what metadata meant for other machines may name
  (a local path would mean nothing there)."""
  if not path or os.path.exists(path):
    return None
  if path.count("/") == 1 and not path.startswith((".", "/", "~")) and not path.endswith(".gguf"):
    return path
  return None


# Object stores --------------------------------------------------------------------------------------

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_remote(path) -> bool:
  """True for a URL such as gs://bucket/dir (not file://, which is a local path)."""
  return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith("file://")


def _fs(url: str):
  """(fsspec file system, path within it) of a URL."""
  import fsspec
  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    raise UserError(f"{url}: cannot open this URL ({e}); for gs:// install gcsfs (requirements.txt)") from None


def absolute(path: str) -> str:
  """`os.path.abspath` of a local path; a URL as it is."""
  return path if is_remote(path) else os.path.abspath(path)


def _ask(path: str, local: Callable[[str], bool], name: str) -> bool:
  """`local(path)` for a local path, else the fsspec file system's method `name` on the URL."""
  if not is_remote(path):
    return local(path)
  fs, p = _fs(path)
  return getattr(fs, name)(p)


def exists(path: str) -> bool:
  return _ask(path, os.path.exists, "exists")


def isfile(path: str) -> bool:
  return _ask(path, os.path.isfile, "isfile")


def isdir(path: str) -> bool:
  """A local directory, or a URL prefix with at least one object under it (object stores have no empty
  directories)."""
  return _ask(path, os.path.isdir, "isdir")


def makedirs(path: str) -> None:
  """`os.makedirs(path, exist_ok=True)`; nothing to do for a URL (its objects make their prefix)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names directly under a local directory or a URL prefix, sorted; [] when there is none. A URL is
  listed afresh (fsspec's listing cache would miss objects another process wrote)."""
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = _fs(path)
  fs.invalidate_cache(p)
  try:
    return sorted(os.path.basename(q.rstrip("/")) for q in fs.ls(p, detail=False))
  except FileNotFoundError:
    return []


def read_bytes(path: str) -> bytes:
  """The file's bytes (FileNotFoundError when there is none)."""
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  fs, p = _fs(path)
  with fs.open(p, "rb") as f:
    return f.read()


def _upload(local: str, url: str) -> None:
  fs, p = _fs(url)
  try:
    fs.put_file(local, p)
  except OSError as e:
    raise UserError(f"{url}: cannot write ({e})") from e


def upload_dir(local: str, url: str) -> None:
  """Copies the local directory `local` to the URL `url`, file by file; files named `config.json` last,
  so a reader that goes by them never finds a model whose weights are still on their way. Objects under
  `url` that `local` does not have are then deleted."""
  names = sorted((os.path.relpath(os.path.join(d, n), local) for d, _, ns in os.walk(local) for n in ns),
                 key=lambda n: (os.path.basename(n) == "config.json", n))
  fs, root = _fs(url)
  for name in names:
    _upload(os.path.join(local, name), url.rstrip("/") + "/" + name)
  if fs.isdir(root):
    keep = {root.rstrip("/") + "/" + n for n in names}
    stale = [p for p in fs.find(root) if p not in keep]
    if stale:
      fs.rm(stale)


@functools.lru_cache(maxsize=16)
def local_copy(url: str) -> str:
  """A local copy of the file or directory `url`, downloaded once per process into a temporary directory
  (removed at exit): what readers that need local files (safetensors, GGUF, tokenizers) open."""
  import atexit
  fs, p = _fs(url)
  if not fs.exists(p):
    raise UserError(f"{url}: no such file or directory")
  directory = tempfile.mkdtemp(prefix="anita-download-")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  out = os.path.join(directory, os.path.basename(p.rstrip("/")) or "root")
  try:
    if fs.isdir(p):
      fs.get(p.rstrip("/") + "/", out, recursive=True)
    else:
      fs.get_file(p, out)
  except OSError as e:
    raise UserError(f"{url}: cannot read ({e})") from e
  return out
