"""The one exception type for mistakes a user can make (bad config key, missing file, malformed row, ...), and
the one way a program reports it.

The CLI prints its message as a single line and exits with status 2, without a traceback. Library code raises
it (or a subclass of `ValueError`, which it is) so Python callers get an ordinary exception. `report_error` is how
a program (the `craft` command, examples/accelerate/train_craft.py) shows that line, once per launch.

Imports stay light (the standard library only): every `craft` module imports this one.
"""

import os
import sys


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


RANK_ZERO_GRACE_S = 5.0


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a multi-process launch (the launcher sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def report_error(line: str) -> None:
    """Show a program's error ``line`` (a `UserError`'s) once, also in a multi-process launch; the caller then exits
    with `UserError.exit_code`.

    Under a launcher (`torchrun`, `deepspeed`, `accelerate launch`) every rank fails with the same error, but only
    rank 0 prints the line; it also writes it to the error file the launcher reads (TORCHELASTIC_ERROR_FILE, set
    by torch's elastic agent, which `torchrun` and `accelerate launch` use), so the launcher's failure summary
    (`ChildFailedError`) names the cause as its root cause. A launcher terminates the other ranks as soon as one
    fails, so the other ranks give rank 0 `RANK_ZERO_GRACE_S` seconds to print and exit first; a SIGTERM
    meanwhile still ends them with status 2. Outside a launcher: the line on stderr.
    """
    import time

    if is_rank_zero():
        print(line, file=sys.stderr, flush=True)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            import json

            with open(error_file, "w") as handle:
                json.dump({"message": line, "timestamp": int(time.time())}, handle)
        return
    import signal

    def ended(signum, frame):
        raise SystemExit(UserError.exit_code)

    signal.signal(signal.SIGTERM, ended)
    time.sleep(RANK_ZERO_GRACE_S)
