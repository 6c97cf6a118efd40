"""What every script shares: quiet logs, one `error:` line for user errors, absl plumbing."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from anita_jax.errors import UserError


def _quiet() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
    raise  # unreachable


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, with UserError and bad flags reported as one `error:` line (exit 2).

  A traceback is shown only with --verbosity=1 or higher.
  """

  def wrapped(argv):
    _quiet()
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserError as e:
      if logging.get_verbosity() >= 1:
        raise
      _fail(str(e))
    except KeyboardInterrupt:
      _fail("interrupted")

  app.run(wrapped, flags_parser=_parse_flags)
