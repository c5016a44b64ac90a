"""Structured JSON logs: one object per line, fields passed with ``extra=``.

Nothing here knows about tokens; the rule is at the call sites: log account
ids, generations and provider error codes, never a token, code or key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, Final

import orjson

# uvicorn adds ``color_message`` (the message with ANSI colour codes) for its own
# terminal formatter: in a JSON line it is noise.
_RESERVED: Final = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "color_message",
}
# Set once when tracing is enabled (keyrelay.otel): the current trace and span id.
_trace_ids: Callable[[], tuple[str, str] | None] | None = None


def set_trace_ids(source: Callable[[], tuple[str, str] | None] | None) -> None:
    """Adds ``trace_id``/``span_id`` of the current span to every line (None: stop)."""
    global _trace_ids  # noqa: PLW0603  # chosen once at startup; the formatter reads it
    _trace_ids = source


def _entry(
    ts: float, level: str, logger: str, msg: str, fields: Iterable[tuple[str, Any]]
) -> dict[str, Any]:
    """One line's object: the fixed keys, the fields (not those starting with ``_``),
    then the current trace and span ids when tracing is on."""
    entry: dict[str, Any] = {"ts": round(ts, 3), "level": level, "logger": logger, "msg": msg}
    for key, value in fields:
        if not key.startswith("_"):
            entry[key] = value
    if _trace_ids is not None:
        ids = _trace_ids()  # formatting runs where the record was logged: same context
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
    return entry


_COMPACT: Final = (",", ":")  # the spacing of json_line's orjson output


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            ((k, v) for k, v in vars(record).items() if k not in _RESERVED),
        )
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=_COMPACT)


# Values orjson would write its own way go to ``default=str``, as in JsonFormatter.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)


def json_line(logger: str, level: str, msg: str, fields: dict[str, Any]) -> bytes:
    """The JSON object ``JsonFormatter`` writes for ``logging.getLogger(logger).<level>(
    msg, extra=fields)``, newline included, without a ``LogRecord``: for a line per
    request. The same keys in the same order with the same values, serialised by
    orjson (~1 us against the stdlib's ~10): compact, non-ASCII as UTF-8 rather
    than ``\\u`` escapes. What orjson refuses (an integer beyond 64 bits, a lone
    surrogate) falls back to the formatter's own ``json.dumps``.

    ``fields`` must not use ``LogRecord`` attribute names (``extra=`` refuses
    them too); keys starting with ``_`` are left out, as there."""
    entry = _entry(time.time(), level, logger, msg, fields.items())
    try:
        return orjson.dumps(entry, default=str, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError
        line = json.dumps(entry, default=str, separators=_COMPACT) + "\n"
        return line.encode("ascii")  # ensure_ascii: ASCII


class LineWriter:
    """Lines for a binary stream, written in batches: at the latest ``interval``
    seconds after the first unwritten line (a timer on the running event loop),
    as soon as ``limit`` bytes wait, and on ``flush()`` (call it at shutdown).
    Without a running loop every line is written at once.

    One ``write()`` + ``flush()`` per batch instead of per line; the price is
    that a line may reach the stream up to ``interval`` later than it was made
    (and after lines that ``logging`` wrote meanwhile).
    """

    __slots__ = ("_interval", "_limit", "_parts", "_size", "_stream", "_timer")

    def __init__(self, stream: BinaryIO, *, interval: float = 0.1, limit: int = 64 << 10) -> None:
        self._stream = stream
        self._interval = interval
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, line: bytes) -> None:
        self._parts.append(line)
        self._size += len(line)
        if self._size >= self._limit:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as logging, never raise
            pass


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; URLs can carry codes in query strings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime
