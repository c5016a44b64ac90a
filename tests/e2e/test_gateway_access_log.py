"""The access lines of a real ``keyrelay gateway serve``: written in batches, none lost.

The process writes them without ``logging`` (``keyrelay.logs.LineWriter``), flushed
at most 100 ms after a request and at shutdown; ``log_level`` still applies.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyrelay.gateway.config import parse_gateway_config
from keyrelay.logs import LineWriter
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import (
    API_KEY_KEY,
    UPSTREAM_API_KEY,
    GatewayProcess,
    gateway_config_data,
    gateway_env,
    start_gateway,
)

# uvicorn ends a graceful stop by raising the signal it caught again.
STOPPED = (0, -signal.SIGTERM)
SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


def access_lines(log: str) -> list[dict[str, Any]]:
    entries = []
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "keyrelay.gateway.access":
                entries.append(entry)
    return entries


def api_key_only(upstream: FakeUpstream, **gateway: Any) -> dict[str, Any]:
    data = gateway_config_data(upstream.url, None, **gateway)
    data["keys"] = [key for key in data["keys"] if key["name"] == "apikey"]
    return data


def api_key_gateway(tmp_path: Path, upstream: FakeUpstream, **gateway: Any) -> GatewayProcess:
    process = GatewayProcess.write(tmp_path, "gateway", api_key_only(upstream, **gateway))
    process.spawn()
    return process.wait_ready()


async def post(gateway: GatewayProcess) -> str:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": API_KEY_KEY})
    assert response.status_code == 200
    return response.headers["x-keyrelay-request-id"]


async def test_access_lines_reach_stderr_while_running_and_on_sigterm(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    gateway = api_key_gateway(tmp_path, upstream)
    try:
        first = await post(gateway)
        # A running gateway writes the line soon after (a wait with a deadline, not timed).
        for _ in range(400):
            if access_lines(gateway.log()):
                break
            await asyncio.sleep(0.05)
        (entry,) = access_lines(gateway.log())
        assert entry["request_id"] == first
        assert entry["level"] == "info"
        assert entry["msg"] == "request"
        assert entry["status"] == 200
        assert entry["billing"] == "metered"
        assert entry["usage"]["input"] == 25
        # A line still in the buffer when SIGTERM arrives is written on the way out.
        second = await post(gateway)
    finally:
        assert gateway.stop() in STOPPED
    log = gateway.log()
    assert [e["request_id"] for e in access_lines(log)] == [first, second]
    for secret in (API_KEY_KEY, UPSTREAM_API_KEY):
        assert secret not in log


async def test_lines_still_waiting_are_written_at_shutdown(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyrelay.gateway.access")
    stream = io.BytesIO()
    config = parse_gateway_config(api_key_only(upstream), gateway_env())
    gateway = await start_gateway(config, access_writer=LineWriter(stream, interval=3600))
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            response = await http.post(
                "/v1/messages", json=SIMPLE, headers={"x-api-key": API_KEY_KEY}
            )
        assert stream.getvalue() == b""  # an hour's timer: still waiting
    finally:
        await gateway.stop()
    (entry,) = access_lines(stream.getvalue().decode())
    assert entry["request_id"] == response.headers["x-keyrelay-request-id"]
    assert not [r for r in caplog.records if r.name == "keyrelay.gateway.access"]  # not twice


async def test_no_access_lines_above_info(tmp_path: Path, upstream: FakeUpstream) -> None:
    gateway = api_key_gateway(tmp_path, upstream, log_level="warning")
    try:
        await post(gateway)
    finally:
        assert gateway.stop() in STOPPED
    assert access_lines(gateway.log()) == []
