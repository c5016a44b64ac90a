"""Structured JSON logs: one object per line, ``extra=`` fields, exception types."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from keyrelay.logs import JsonFormatter, configure_logging


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
