"""The one exception type for mistakes a user can make (bad config key, missing file, malformed row, ...).

The CLI prints its message as a single line and exits with status 2, without a traceback. Library code raises
it (or a subclass of `ValueError`, which it is) so Python callers get an ordinary exception.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the key, file or row at fault."""

    exit_code = 2


def require_directory(path, what: str):
    """`path` as a Path if it is a directory; else a `UserError` saying `what` it should be and whether it is a
    file (a common slip: naming a file inside the directory) or missing."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        raise UserError(f"{what} {path} is a file, not a directory (name the directory that holds it)")
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist")
    return path


def first_line(err: BaseException) -> str:
    """The first line of an exception's message: third-party errors (safetensors, transformers) can span many
    lines, and a `UserError` that quotes one must stay a single line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
