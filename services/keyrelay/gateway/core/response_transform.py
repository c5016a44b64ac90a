"""Response transforms: tool names mapped back, usage read. No I/O.

Only two JSON paths are ever rewritten (DESIGN §2.1): ``content[i].name`` of a
``tool_use`` block in a JSON message, and ``content_block.name`` of a
``content_block_start`` event whose block is ``tool_use``. A ``"name"`` inside a
tool's input, a text, or an ``input_json_delta`` is never looked at. Names go
back through the request's own ``ToolNameTable``.

JSON (``inspect_response_json`` / ``transform_response_json``)
    The body is parsed once, for the usage and the names. Error bodies, bodies
    that are not JSON objects and bodies with nothing to rename are returned as
    the very same ``bytes`` object; a renamed body is re-serialised compactly.

SSE (``StreamTransformer``)
    ``feed(chunk) -> bytes`` returns the bytes to send to the client now:
    every event completed by the chunk, in order, each the moment its blank line
    arrives. The fast path never looks at single events: the decoder hands over
    the completed events as one span (``SSEDecoder.feed_span``), and when the
    span contains none of the names of the events worth reading (``message_``,
    plus ``content_block_start`` when there is a tool table) it is forwarded as
    it is. Otherwise it is cut into events, told apart by their ``event`` field
    (``event_type``, never by decoding their data):

    - ``content_block_start``: parsed only when there is a tool table; rewritten
      (re-encoded with LF line ends, ``event``/``id``/``retry`` kept, comments
      dropped) only if its ``content_block`` is a ``tool_use`` whose name maps
      to a different client name. An event whose data is not JSON is forwarded
      as it is.
    - ``message_start`` / ``message_delta``: their data is parsed for usage and
      the model (``UsageTracker``); their bytes are forwarded untouched.
    - everything else (``content_block_delta``, ``ping``, ``error``, comments,
      unknown events): forwarded byte-for-byte, unread.

    The stream is ended with an Anthropic ``error`` event (``api_error``), after
    the intact events that preceded the problem, when an event exceeds
    ``max_event_bytes`` (bounded memory against an endless line) or, with
    ``validate_utf8`` (the default), when an event is not valid UTF-8 (the
    Messages API only sends UTF-8; depending on their version the SDKs would
    fail on such bytes with a decoding error or show replacement characters,
    where an ``error`` event says what happened). After that the
    transformer is ``failed`` and ignores further input (``feed`` returns
    ``b""``): the caller should stop reading the upstream.

    A cut is never a success, and a partial event is never forwarded (the
    client's parser would glue the next bytes to it). ``abort(message)`` is
    the end of a stream whose upstream broke (a reset, a read timeout, a FIN
    where the HTTP framing promised more): the event in progress is dropped and
    an ``error`` event ends the stream. ``close()`` is the end the HTTP framing
    reported as complete; it too is a cut, with the same ending, when the
    stream stops in the middle of an event (a last event without its blank
    line is dropped, as a browser would) or before ``message_stop`` (nor an
    upstream ``error`` event as the last event): a stream framed "until the
    connection closes" ends at any FIN, and only the events tell a whole
    stream from a cut one. So the output of a stream is always whole events,
    a prefix of the upstream's, and at most one ``error`` event of the
    gateway's own, last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from keyrelay.gateway.core import fast_json
from keyrelay.gateway.core.errors import error_event
from keyrelay.gateway.core.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    SSEDecoder,
    encode_event,
    event_type,
    parse_event,
    split_blocks,
)
from keyrelay.gateway.core.tool_names import ToolNameTable
from keyrelay.gateway.core.usage import Usage, UsageTracker, usage_from_body

__all__ = [
    "JSONResponse",
    "StreamTransformer",
    "error_type_of",
    "first_event",
    "first_event_error_type",
    "inspect_response_json",
    "transform_response_json",
]

_CONTENT_BLOCK_START = b"content_block_start"
_MESSAGE_START = b"message_start"
_MESSAGE_DELTA = b"message_delta"
_MESSAGE_STOP = b"message_stop"
_ERROR = b"error"
_CR_BYTE = 0x0D
# The end of the last span forwarded is kept (a reference, or a copy of this many
# bytes): at the end of the stream, its last event tells whether it was an
# upstream ``error`` event.
_TAIL_BYTES = 2048


def _dumps(obj: object) -> str:
    """Compact JSON that is always encodable as UTF-8 (a lone surrogate, which
    JSON can carry as an escape, is written back as an escape)."""
    return fast_json.dumps(obj, fast=False, allow_nan=True).decode("utf-8")


def _loads(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def error_type_of(data: str | bytes | None) -> str | None:
    """``error.type`` of an Anthropic error object (an error answer's body, an
    ``error`` event's data), if ``data`` is one."""
    parsed = _loads(data) if data else None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else None


# -- JSON ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JSONResponse:
    """A non-streaming response after the transforms, with what was read from it."""

    body: bytes
    usage: Usage | None
    model: str | None


def _rename_content(content: list[object], tool_names: ToolNameTable) -> list[object] | None:
    renamed: list[object] | None = None
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            continue
        name = block.get("name")
        if not isinstance(name, str):
            continue
        client = tool_names.to_client(name)
        if client != name:
            if renamed is None:
                renamed = list(content)
            renamed[i] = {**block, "name": client}
    return renamed


def inspect_response_json(body: bytes, tool_names: ToolNameTable | None) -> JSONResponse:
    """Map ``tool_use`` names back and read usage and model, parsing ``body`` once."""
    try:
        obj, fast = fast_json.loads_flagged(body)
    except (ValueError, RecursionError):
        return JSONResponse(body, None, None)
    if not isinstance(obj, dict) or obj.get("type") == "error":
        return JSONResponse(body, None, None)
    model = obj.get("model")
    result_model = model if isinstance(model, str) else None
    usage = usage_from_body(obj)
    content = obj.get("content")
    if tool_names is not None and isinstance(content, list):
        renamed = _rename_content(content, tool_names)
        if renamed is not None:
            body = fast_json.dumps({**obj, "content": renamed}, fast=fast, allow_nan=True)
    return JSONResponse(body, usage, result_model)


def transform_response_json(body: bytes, tool_names: ToolNameTable | None) -> bytes:
    """``body`` with ``tool_use`` names mapped back; the same object if unchanged."""
    if tool_names is None:
        return body
    return inspect_response_json(body, tool_names).body


# -- SSE ----------------------------------------------------------------------


class StreamTransformer:
    """The SSE response transform of one request: ``feed(chunk) -> bytes``, ``close()``."""

    __slots__ = (
        "_decoder",
        "_error",
        "_needles",
        "_stopped",
        "_tail",
        "_tool_names",
        "_tracker",
        "_validate",
    )

    def __init__(
        self,
        tool_names: ToolNameTable | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        *,
        validate_utf8: bool = True,
    ) -> None:
        self._decoder = SSEDecoder(max_event_bytes)
        self._tool_names = tool_names
        self._tracker = UsageTracker()
        self._validate = validate_utf8
        self._error: str | None = None
        self._stopped = False  # a message_stop went out
        self._tail = b""  # the end of the last span that went out
        # Substrings that every event worth reading contains (in its name):
        # "message_" covers message_start, message_delta and message_stop.
        self._needles: tuple[bytes, ...] = (b"message_",)
        if tool_names is not None:
            self._needles += (_CONTENT_BLOCK_START,)

    @property
    def usage(self) -> Usage:
        """Usage so far (final once the stream has ended)."""
        return self._tracker.usage

    @property
    def usage_seen(self) -> bool:
        return self._tracker.seen

    @property
    def model(self) -> str | None:
        """The model named by ``message_start``, if one arrived."""
        return self._tracker.model

    @property
    def failed(self) -> bool:
        """True once the transformer ended the stream with an ``error`` event."""
        return self._error is not None

    @property
    def error(self) -> str | None:
        """Why the stream was ended (for logs), or ``None``."""
        return self._error

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send to the client for ``chunk`` (often ``b""``)."""
        if self._error is not None:
            return b""
        try:
            span = self._decoder.feed_span(chunk)
        except EventTooLarge as exc:
            return self._fail_after(list(exc.complete), self._too_large_message())
        if not span:
            return b""
        self._tail = span if len(span) <= _TAIL_BYTES else span[-_TAIL_BYTES:]
        if self._validate and not span.isascii():
            try:
                span.decode("utf-8")
            except UnicodeDecodeError:
                return self._forward(split_blocks(span))
        # Every event that needs reading has one of the needles in its bytes
        # (its event name), so a span without any is forwarded unread.
        found = [span.find(needle) for needle in self._needles]
        if max(found) < 0:
            return span
        return self._process_span(span, found)

    def close(self) -> bytes:
        """The end of the upstream body, complete by its HTTP framing: ``b""`` when
        the stream ended after ``message_stop`` (or with an upstream ``error``
        event); else the stream was cut, and the ``error`` event that ends it (a
        last event without its blank line is dropped)."""
        if self._error is not None:
            return b""
        # A last event without its blank line is dropped, never forwarded.
        blocks, dropped = self._decoder.close_whole()
        out = b""
        if blocks:  # a last event complete but held back (its blank line a final CR)
            self._tail = blocks[-1][-_TAIL_BYTES:]
            out = self._forward(blocks)
            if self._error is not None:
                return out
        if dropped:
            return out + self.abort(
                "the upstream stream ended in the middle of an event "
                f"({dropped} bytes of it dropped); the gateway ended the stream"
            )
        if not self._stopped and not self._ends_with_error():
            return out + self.abort(
                "the upstream stream ended before message_stop; the gateway ended the stream"
            )
        return out

    def abort(self, message: str, error_type: str = "api_error") -> bytes:
        """The upstream stream broke (``message`` says how): the ``error`` event
        that ends the stream. An event in progress is dropped; after this the
        transformer is ``failed``. ``b""`` if the stream had already ended with an
        ``error`` event of the gateway's."""
        if self._error is not None:
            return b""
        self._error = message
        return error_event(error_type, message)

    def _ends_with_error(self) -> bool:
        """Whether the last event forwarded was an upstream ``error`` event."""
        return self._final_error() is not None

    def _final_error(self) -> bytes | None:
        blocks = split_blocks(self._tail)
        return blocks[-1] if blocks and event_type(blocks[-1]) == _ERROR else None

    def upstream_error_type(self) -> str | None:
        """``error.type`` of the upstream ``error`` event forwarded last, if the
        stream so far ends with one (``overloaded_error`` cools a pool member);
        None for a stream that ended otherwise or that the gateway ended."""
        if self._error is not None or self._stopped:  # (stopped: message_stop went out)
            return None
        block = self._final_error()
        return None if block is None else error_type_of(parse_event(block).data)

    def _too_large_message(self) -> str:
        return (
            "the upstream sent a server-sent event larger than "
            f"{self._decoder.max_event_bytes} bytes; the gateway ended the stream"
        )

    def _forward(self, blocks: list[bytes]) -> bytes:
        """Validate (if asked) and process blocks that were not validated yet."""
        if self._validate:
            for i, raw in enumerate(blocks):
                if not raw.isascii():
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        return self._fail_after(
                            blocks[:i],
                            "the upstream sent a server-sent event that is not valid UTF-8; "
                            "the gateway ended the stream",
                        )
        return self._process(blocks)

    def _process_span(self, span: bytes, found: list[int]) -> bytes:
        """``_process(split_blocks(span))``, looking only at the blocks with a needle.

        ``found``: each needle's first offset in ``span`` (-1: none).

        A span can hold thousands of events (one read of a fast upstream) of which
        one or two need reading. With LF line ends (no CR anywhere in the span),
        every ``\n\n`` ends a block, so the block around a needle is found with
        two searches and everything between such blocks is forwarded as it is;
        a span with a CR is cut into all of its blocks instead. Each needle's
        next offset is kept, and searched again only once passed: the span is
        read once per needle, not once per block found.
        """
        if b"\r" in span:
            return self._process(split_blocks(span))
        needles = self._needles
        # (start, end, replacement) of the blocks rewritten: usually none (reading
        # usage changes nothing), and then the span goes out as it came, uncopied.
        rewrites: list[tuple[int, int, bytes]] = []
        pos = 0
        while True:
            hit = min((at for at in found if at >= 0), default=-1)
            if hit < 0:
                break
            start = span.rfind(b"\n\n", pos, hit)
            start = pos if start < 0 else start + 2
            end = span.find(b"\n\n", hit)
            end = len(span) if end < 0 else end + 2
            new = self._inspect(span[start:end])
            if new is not None:
                rewrites.append((start, end, new))
            pos = end
            for i, at in enumerate(found):
                if 0 <= at < pos:
                    found[i] = span.find(needles[i], pos)
        if not rewrites:
            return span
        view = memoryview(span)  # slices of a view copy nothing: the join is the one copy
        out: list[bytes | memoryview] = []
        pos = 0
        for start, end, new in rewrites:
            out += (view[pos:start], new)
            pos = end
        out.append(view[pos:])
        return b"".join(out)

    def _process(self, blocks: list[bytes]) -> bytes:
        """Forward blocks, reading and rewriting the few events that need it."""
        rewritten: list[bytes] | None = None
        for i, raw in enumerate(blocks):
            new = self._inspect(raw)
            if new is not None:
                if rewritten is None:
                    rewritten = list(blocks)
                rewritten[i] = new
        return b"".join(blocks if rewritten is None else rewritten)

    def _inspect(self, raw: bytes) -> bytes | None:
        """Read one block: its replacement, or ``None`` when it goes out unchanged."""
        name = event_type(raw)
        if name == _CONTENT_BLOCK_START:
            if self._tool_names is not None:
                new = self._rename(raw, self._tool_names)
                if new is not raw:
                    return new
        elif name in (_MESSAGE_DELTA, _MESSAGE_START):
            self._read_usage(raw)
        elif name == _MESSAGE_STOP:
            self._stopped = True
        return None

    def _read_usage(self, raw: bytes) -> None:
        data = parse_event(raw).data
        if data is not None:
            self._tracker.observe(_loads(data))

    @staticmethod
    def _rename(raw: bytes, tool_names: ToolNameTable) -> bytes:
        event = parse_event(raw)
        if event.data is None:
            return raw
        obj = _loads(event.data)
        if not isinstance(obj, dict) or obj.get("type") != "content_block_start":
            return raw
        block = obj.get("content_block")
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            return raw
        name = block.get("name")
        if not isinstance(name, str):
            return raw
        client = tool_names.to_client(name)
        if client == name:
            return raw
        obj["content_block"] = {**block, "name": client}
        return encode_event(event.event, _dumps(obj), event.id, retry=event.retry)

    def _fail_after(self, blocks: list[bytes], message: str) -> bytes:
        head = self._forward(blocks) if blocks else b""
        if self._error is not None:  # the head itself ended the stream
            return head
        self._error = message
        return head + error_event("api_error", message)


def first_event(head: bytes) -> bytes | None:
    """The first whole event of a stream that starts with ``head`` (a block with
    an ``event`` field; comments and blocks without one are passed over), or None
    while none has arrived whole."""
    end = head.find(b"\n\n")  # the common shape: LF line ends, the first block an event
    if end > 0 and _CR_BYTE not in head[:end]:
        block = head[: end + 2]
        if event_type(block) is not None:
            return block
    decoder = SSEDecoder(len(head) + 1)
    for block in decoder.feed_raw(head):
        if event_type(block) is not None:
            return block
    return None


def first_event_error_type(head: bytes) -> str | None:
    """``error.type`` when the first whole event in ``head`` is an ``error`` event
    (a 200 stream that opens with ``overloaded_error``, before any byte of it has
    reached the client), else None."""
    block = first_event(head)
    if block is None or event_type(block) != _ERROR:
        return None
    return error_type_of(parse_event(block).data)
