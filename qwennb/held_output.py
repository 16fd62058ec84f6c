"""What a thread says while it works, held back and said later by whoever waits for it.

A notebook shows a thread's output in whichever cell runs at that moment, so the warnings of a load running in the
background (Python warnings, and the log records of diffusers, transformers and their peers) would land in an
unrelated cell. :func:`hold` keeps them while the thread runs; :meth:`Held.replay` says them, as they would have
been said, in the thread that waits (the cell that needs the model). Only the holding thread's output is held.

Example:
    >>> import threading, warnings
    >>> held = Held()
    >>> def work():
    ...     with hold(held):
    ...         warnings.warn("said on a thread")
    >>> t = threading.Thread(target=work); t.start(); t.join()
    >>> [str(w.message) for w in held.warnings]
    ['said on a thread']
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Loggers whose handlers are watched ("" is the root logger); their children's records pass through them.
LOGGERS = ("", "diffusers", "transformers", "huggingface_hub", "accelerate", "torch")

_lock = threading.RLock()
_holding: dict[int, Held] = {}  # thread ident -> what it has said so far
_watched: set[logging.Handler] = set()
_showwarning_before: Any = None


@dataclass
class Held:
    """The warnings and log records a thread produced while held, in order of kind."""

    warnings: list[warnings.WarningMessage] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)

    def replay(self) -> None:
        """Say everything held, in the calling thread, through the handlers it was meant for; then forget it."""
        said, self.warnings = self.warnings, []
        records, self.records = self.records, []
        for w in said:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        for record in records:
            logging.getLogger(record.name or None).handle(record)


def _showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
    held = _holding.get(threading.get_ident())
    if held is None:
        return _showwarning_before(message, category, filename, lineno, file, line)
    held.warnings.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
    return None


class _HoldFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        held = _holding.get(record.thread) if record.thread is not None else None
        if held is None:
            return True
        if not any(r is record for r in held.records):  # a record reaches several handlers as it propagates
            held.records.append(record)
        return False


_FILTER = _HoldFilter()


@contextlib.contextmanager
def hold(held: Held | None = None) -> Iterator[Held]:
    """Hold the calling thread's warnings and library log records in ``held`` (a new one if None) until the end
    of the block; other threads' output goes out as usual."""
    global _showwarning_before
    held = Held() if held is None else held
    ident = threading.get_ident()
    with _lock:
        if warnings.showwarning is not _showwarning:
            _showwarning_before = warnings.showwarning
            warnings.showwarning = _showwarning
        handlers = {h for name in LOGGERS for h in logging.getLogger(name or None).handlers}
        if logging.lastResort is not None:
            handlers.add(logging.lastResort)
        for h in handlers - _watched:
            h.addFilter(_FILTER)
        _watched.update(handlers)
        _holding[ident] = held
    try:
        yield held
    finally:
        with _lock:
            _holding.pop(ident, None)
            if not _holding:
                for h in _watched:
                    h.removeFilter(_FILTER)
                _watched.clear()
                if warnings.showwarning is _showwarning:
                    warnings.showwarning = _showwarning_before
