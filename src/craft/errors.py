"""The one exception type for mistakes a user can make (bad config key, missing file, malformed row, ...).

The CLI prints its message as a single line and exits with status 2, without a traceback. Library code raises
it (or a subclass of `ValueError`, which it is) so Python callers get an ordinary exception.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the key, file or row at fault."""

    exit_code = 2


def first_line(err: BaseException) -> str:
    """The first line of an exception's message: third-party errors (safetensors, transformers) can span many
    lines, and a `UserError` that quotes one must stay a single line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
