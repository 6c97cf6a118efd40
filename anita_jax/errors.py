"""The one exception type for errors a user can cause."""


class UserError(Exception):
  """A problem with the user's input: a path, a row, a flag or a shape.

  The message names the file, the 1-based row or line where there is one, and
  the field, tensor or flag. Scripts print it as one `error:` line on stderr
  and exit non-zero (see `anita_jax.apps.cli`).
  """


class Preempted(Exception):
  """Training saved a checkpoint at a step boundary after SIGTERM and stopped; scripts exit 0."""
