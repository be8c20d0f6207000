"""Quiet runs: the `craft` commands print their own lines only, unless `--verbose` is given.

The third-party libraries a run loads talk on their own: DeepSpeed logs the accelerator it picked and prints its
pipeline layout, seed settings, topology and the build of its shared-memory op with bare `print` calls;
bitsandbytes logs that an optional Hub kernel package is missing at import. None of it is actionable for a user, and
all of it hides the progress bar and the one-line errors. Two mechanisms, both undone by `--verbose`:

* `silence_loggers()` adds a filter that keeps only ERROR and above to the named loggers of those libraries. It
  must run before they are imported: DeepSpeed writes to a handler bound to the `sys.stdout` of import time, and
  bitsandbytes logs during its import. Filters survive the libraries' own `setLevel` calls.
* `swallow_stdout()` sends `print` output to /dev/null while third-party setup code runs (craft itself writes to
  stderr there: progress bar, warnings, errors). Warnings and errors, which go to stderr, stay visible.
"""

from __future__ import annotations

import contextlib
import logging
import os

# Loggers of libraries that log information, not problems, at WARNING level. bitsandbytes logs from child loggers
# (`bitsandbytes.backends.cpu.ops`), which inherit the parent's level but not its filters; DeepSpeed sets its own
# level when it creates its logger, but keeps filters added before.
NOISY_LOGGERS = ("DeepSpeed", "bitsandbytes")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _ErrorsOnly()


def silence_loggers(verbose: bool) -> None:
    """Keep only errors from `NOISY_LOGGERS` and their children (nothing is changed with `verbose`)."""
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.addFilter(_FILTER)
        logger.setLevel(logging.ERROR)


@contextlib.contextmanager
def swallow_stdout(verbose: bool):
    """Discard what is printed to stdout inside the block (nothing is changed with `verbose`)."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
