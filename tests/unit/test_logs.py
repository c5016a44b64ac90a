"""Structured JSON logs: one object per line, ``extra=`` fields, exception types."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from keyrelay.logs import JsonFormatter, LineWriter, configure_logging, json_line


def _record(
    msg: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    *,
    level: int = logging.INFO,
    exc_info: Any = None,
    extra: dict[str, Any] | None = None,
) -> logging.LogRecord:
    logger = logging.getLogger("keyrelay.test")
    return logger.makeRecord(
        logger.name, level, __file__, 1, msg, args, exc_info, extra=extra or None
    )


def _format(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def test_basic_fields() -> None:
    record = _record(level=logging.WARNING)
    entry = _format(record)
    assert entry["msg"] == "hello world"
    assert entry["level"] == "warning"
    assert entry["logger"] == "keyrelay.test"
    assert entry["ts"] == pytest.approx(record.created, abs=0.001)


def test_no_logrecord_internals_leak_into_the_entry() -> None:
    entry = _format(_record())
    for internal in ("args", "msg_args", "pathname", "lineno", "exc_info", "levelno", "thread"):
        assert internal not in entry
    assert set(entry) == {"ts", "level", "logger", "msg"}


def test_extra_fields_are_included() -> None:
    entry = _format(_record(extra={"account": "alice", "generation": 7, "ok": True}))
    assert entry["account"] == "alice"
    assert entry["generation"] == 7
    assert entry["ok"] is True


def test_private_extra_fields_are_skipped() -> None:
    entry = _format(_record(extra={"_internal": "x", "public": "y"}))
    assert "_internal" not in entry
    assert entry["public"] == "y"


def test_non_json_extra_values_are_stringified() -> None:
    class Thing:
        def __str__(self) -> str:
            return "a-thing"

    entry = _format(_record(extra={"thing": Thing(), "raw": b"\x00"}))
    assert entry["thing"] == "a-thing"
    assert entry["raw"] == "b'\\x00'"


def test_multiline_message_stays_on_one_line() -> None:
    entry = _format(_record("line one\nline two", ()))
    assert entry["msg"] == "line one\nline two"


def test_exception_type_and_traceback_are_included() -> None:
    try:
        raise KeyError("missing")
    except KeyError:
        record = _record("failed", (), level=logging.ERROR, exc_info=sys.exc_info())
    entry = _format(record)
    assert entry["exc_type"] == "KeyError"
    assert "Traceback" in entry["exc"]
    assert entry["msg"] == "failed"


def test_no_exception_fields_without_an_exception() -> None:
    entry = _format(_record(exc_info=(None, None, None)))
    assert "exc_type" not in entry
    assert "exc" not in entry


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    saved_level = root.level
    saved_levels = {n: logging.getLogger(n).level for n in ("httpx", "httpcore")}
    saved_converter = logging.Formatter.converter
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        logging.Formatter.converter = saved_converter


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_writes_one_json_object_per_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("debug")
    log = logging.getLogger("keyrelay.test.configured")
    log.debug("first", extra={"account": "alice"})
    log.info("second\nwith a newline", extra={"generation": 3})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("third")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    assert [e["msg"] for e in entries] == ["first", "second\nwith a newline", "third"]
    assert [e["level"] for e in entries] == ["debug", "info", "error"]
    assert entries[0]["account"] == "alice"
    assert entries[1]["generation"] == 3
    assert entries[2]["exc_type"] == "ZeroDivisionError"


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_sets_the_level_and_replaces_handlers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("warning")
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    logging.getLogger("keyrelay.test.configured").info("dropped")
    logging.getLogger("keyrelay.test.configured").warning("kept")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["kept"]
    # Calling it again does not stack handlers (no duplicate lines).
    configure_logging("info")
    assert len(root.handlers) == 1
    assert logging.Formatter.converter is time.gmtime


@pytest.mark.usefixtures("restore_logging")
def test_httpx_request_logs_are_raised_to_warning(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    configure_logging("debug")
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("httpcore").level == logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: POST https://idp.example/token?code=abc")
    logging.getLogger("httpx").warning("httpx warning")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["httpx warning"]


@dataclasses.dataclass
class _Point:
    x: int
    y: int


def test_json_line_is_the_formatters_line() -> None:
    fields: dict[str, Any] = {
        "request_id": "req_kr_0123",
        "route": "plain",
        "billing": None,
        "status": 200,
        "stream": False,
        "model": "claude-é",  # escaped as the formatter escapes it
        "duration_ms": 1.25,
        "usage": {"input": 3, "output": 4},
        "cost_usd": 1.5e-05,
        "error": "line one\nline two",
        "thing": b"\x00",  # not JSON: stringified as there
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),  # str(), not orjson's ISO form
        "point": _Point(1, 2),  # str(), not orjson's object
        "_private": "left out",
    }
    line = json_line("keyrelay.gateway.access", "info", "request", fields)
    assert line.endswith(b"}\n")
    assert line.count(b"\n") == 1
    logger = logging.getLogger("keyrelay.gateway.access")
    record = logger.makeRecord(logger.name, logging.INFO, "", 0, "request", (), None, extra=fields)
    record.created = json.loads(line)["ts"]  # the one field that depends on the clock
    # The same object, keys in the same order (orjson's spacing and escapes differ).
    fast = json.loads(line)
    formatted = json.loads(JsonFormatter().format(record))
    assert list(fast.items()) == list(formatted.items())
    assert list(fast)[:4] == ["ts", "level", "logger", "msg"]


def test_formatter_spacing_matches_json_line_for_ascii_lines() -> None:
    fields = {"request_id": "req_kr_1", "status": 200, "usage": {"input": 3}}
    line = json_line("keyrelay.x", "info", "request", fields)
    record = logging.getLogger("keyrelay.x").makeRecord(
        "keyrelay.x", logging.INFO, "", 0, "request", (), None, extra=fields
    )
    record.created = json.loads(line)["ts"]
    assert JsonFormatter().format(record).encode() + b"\n" == line


def test_uvicorns_colour_copy_of_the_message_is_left_out() -> None:
    record = logging.getLogger("uvicorn.error").makeRecord(
        "uvicorn.error", logging.INFO, "", 0, "Started server process [%d]", (7,), None,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )  # fmt: skip
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "Started server process [7]"
    assert "color_message" not in entry


def test_json_line_falls_back_to_the_stdlib_for_what_orjson_refuses() -> None:
    fields = {"big": 2**70, "text": "\ud800"}
    line = json_line("keyrelay.test", "info", "m", fields)
    record = logging.getLogger("keyrelay.test").makeRecord(
        "keyrelay.test", logging.INFO, "", 0, "m", (), None, extra=fields
    )
    record.created = json.loads(line)["ts"]
    assert line == (JsonFormatter().format(record) + "\n").encode()


class _Stream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_line_writer_without_a_loop_writes_each_line() -> None:
    stream = _Stream()
    writer = LineWriter(stream)
    writer.write(b"one\n")
    assert stream.getvalue() == b"one\n"
    assert stream.flushes == 1


async def test_line_writer_batches_until_its_timer_or_flush() -> None:
    stream = _Stream()
    writer = LineWriter(stream, interval=0)
    writer.write(b"one\n")
    writer.write(b"two\n")
    assert stream.getvalue() == b""
    for _ in range(3):
        await asyncio.sleep(0)  # the timer (interval 0) runs on a next loop iteration
    assert stream.getvalue() == b"one\ntwo\n"
    assert stream.flushes == 1
    writer.write(b"three\n")
    writer.flush()  # at shutdown
    assert stream.getvalue() == b"one\ntwo\nthree\n"
    writer.flush()  # nothing left: no write
    assert stream.flushes == 2


async def test_line_writer_writes_when_the_buffer_fills() -> None:
    stream = _Stream()
    writer = LineWriter(stream, interval=3600, limit=8)
    writer.write(b"1234\n")
    assert stream.getvalue() == b""
    writer.write(b"5678\n")
    assert stream.getvalue() == b"1234\n5678\n"
    writer.flush()
    assert stream.flushes == 1


def test_line_writer_never_raises_on_a_closed_stream() -> None:
    stream = _Stream()
    stream.close()
    LineWriter(stream).write(b"lost\n")
