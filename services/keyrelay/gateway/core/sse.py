"""Server-sent events: an incremental, bounded decoder and an encoder. No I/O.

The decoder works in two layers, so that a proxy pays only for what it reads.

Framing (``SSEDecoder.feed_raw``) cuts the byte stream into *blocks*: everything up
to and including the blank line that ends an event. It never decodes UTF-8 and
never looks inside a block; it only searches the buffer with ``bytes.find`` (or,
once a CR has been seen in the chunk, ``find`` for three byte pairs). Each
block comes back as the exact bytes received, so a proxy forwards untouched
events byte-for-byte and ``b"".join(blocks)`` is always exactly the input.
``SSEDecoder.feed_span`` returns the same blocks already joined, finding the end
of the last one with ``rfind`` from the end of the chunk (no per-event work at
all); a consumer that must look inside cuts the span with ``split_blocks``. A
chunk of whole blocks comes back as the very same object; otherwise the span
is one copy (the held head of its first block and the rest, joined once).

Parsing (``parse_event``, used by ``SSEDecoder.feed``) turns one block into an
``SSEEvent`` following the WHATWG rules ("Interpreting an event stream"). A proxy
that only needs the event name uses ``event_type(block)``, which reads it from
the first line in the common case without decoding anything else.

Line ends
    LF, CRLF and CR, mixed freely. Lines are split on bytes before any UTF-8
    decoding, so a multi-byte character or a CRLF may straddle two chunks. A
    block ends at the first line terminator that immediately follows another
    one; as a byte pattern that is the first ``\\n\\n``, ``\\r\\r`` or ``\\n\\r``
    (``\\r\\n`` alone is a single terminator). When a block's blank line is a
    CR that is the last byte fed so far, the block is held back until the next
    byte shows whether an LF belongs to it (httpx's ``LineDecoder`` keeps a
    trailing CR for the same reason); ``close()`` releases it.

Decisions where the WHATWG rules leave a proxy without an answer
    - Every block is returned, including blocks that would not dispatch an event
      in a browser: comment-only blocks (``: ping``), blocks with only
      ``event``/``id``/``retry`` fields, and a lone blank line (an empty block,
      ``raw == b"\\n"``). A proxy must forward those bytes too.
      ``SSEEvent.data is None`` tells "no ``data`` field" (a browser would not
      dispatch) from ``data == ""`` (a ``data:`` line with an empty value).
    - A final block without its blank line is returned by ``close()`` (a browser
      would drop it); its ``raw`` is whatever bytes were left. ``close_whole()``
      is the proxy's end instead: only a last block that was complete, and the
      length of one that was not (dropped: forwarded, the client's parser would
      glue whatever comes next to it).
    - Invalid UTF-8 does not stop the decoder: ``parse_event`` decodes with
      replacement characters (as the WHATWG decoder does) while ``raw`` keeps
      the exact bytes. Whether to accept such bytes is the consumer's choice
      (the gateway's ``StreamTransformer`` rejects them).
    - ``SSEEvent.id`` is the ``id`` field of this block (``None`` if absent), not
      the connection's persistent "last event ID".
    - A UTF-8 byte-order mark at the start of a block is ignored by the parser.
      (WHATWG ignores it only at the start of the stream, the one place where a
      sender may put it.)

Bounded memory
    A block longer than ``max_event_bytes`` (counting its terminating blank
    line) raises ``EventTooLarge``, as soon as the decoder knows: either when a
    complete block is too long, or when the incomplete block it holds already
    is. The decoder therefore never holds more than ``max_event_bytes`` plus
    the chunk being fed. Blocks completed earlier in the same ``feed`` call are
    attached to the exception (``complete``; ``events`` for ``feed``), so a
    proxy can still forward them, in order, before reporting the error. After
    any error the decoder refuses further input.

Exceptions::

    SSEError              -- decoder misuse (feed after close or after an error)
    └── EventTooLarge     -- a block (or one endless line) exceeds max_event_bytes
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "EventTooLarge",
    "SSEDecoder",
    "SSEError",
    "SSEEvent",
    "encode_event",
    "event_type",
    "parse_event",
    "split_blocks",
]

DEFAULT_MAX_EVENT_BYTES = 1 << 20

_LF = 0x0A
_CR = 0x0D

_BYTES_LINE_END = re.compile(rb"\r\n|\r|\n")
_TEXT_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"
_BOM_BYTES = b"\xef\xbb\xbf"


class SSEError(Exception):
    """The decoder cannot continue (misuse, or after an ``EventTooLarge``)."""


class EventTooLarge(SSEError):
    """A block, or a single line still waiting for its end, exceeds the limit.

    ``complete`` holds the raw blocks that the same ``feed``/``close`` call
    completed before the limit was hit (``events``: the same, parsed, when the
    call was ``feed``), so that nothing that arrived intact is lost.
    """

    def __init__(self, limit: int, complete: Sequence[bytes] = ()) -> None:
        super().__init__(f"server-sent event exceeds the limit of {limit} bytes")
        self.limit = limit
        self.complete: tuple[bytes, ...] = tuple(complete)
        self.events: tuple[SSEEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One block of an event stream, parsed, plus the exact bytes it came from.

    ``event`` / ``id``: the field's value, ``None`` when the block has no such
    field (a browser reports a missing or empty ``event`` as ``"message"``).
    ``data``: the ``data`` lines joined with LF, ``None`` when there is none.
    ``retry``: the ``retry`` field when it is all ASCII digits, else ``None``.
    ``raw``: the block's bytes, including its terminating blank line.
    """

    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    raw: bytes = b""


class SSEDecoder:
    """Incremental SSE decoder: ``feed(bytes) -> [events]`` and ``close()``.

    ``feed``/``close`` return parsed ``SSEEvent`` objects; ``feed_raw`` and
    ``close_raw`` return only the raw blocks (framing, no decoding at all);
    ``feed_span`` returns those blocks joined. They share one state, so a
    caller may mix them.
    """

    __slots__ = ("_closed", "_failed", "_held", "_last", "_max", "_pending")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be at least 1")
        self._max = max_event_bytes
        # Bytes of the block in progress (everything after the last block).
        self._pending = bytearray()
        # The last byte fed; the stream starts "after a line end".
        self._last = b"\n"
        # True when _pending is a complete block whose blank line is a CR that
        # was the last byte fed: an LF, if it comes next, still belongs to it.
        self._held = False
        self._closed = False
        self._failed = False

    @property
    def max_event_bytes(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes held for the block in progress (for tests and metrics)."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete, parsed."""
        try:
            blocks = self.feed_raw(data)
        except EventTooLarge as exc:
            exc.events = tuple(parse_event(block) for block in exc.complete)
            raise
        return [parse_event(block) for block in blocks]

    def close(self) -> list[SSEEvent]:
        """End of stream: return the last event if it had no blank line."""
        try:
            blocks = self.close_raw()
        except EventTooLarge as exc:
            exc.events = tuple(parse_event(block) for block in exc.complete)
            raise
        return [parse_event(block) for block in blocks]

    def feed_raw(self, data: bytes) -> list[bytes]:
        """Add bytes; return the raw blocks they complete, in order."""
        if not self._accepts(data):
            return []
        return self._frame(self._glue(data))

    def feed_span(self, data: bytes) -> bytes:
        """Add bytes; return the blocks they complete as one ``bytes``.

        The same as ``b"".join(self.feed_raw(data))``, but it finds the end of
        the last complete block with ``rfind`` (one with LF line ends, three
        otherwise) instead of cutting every block: a proxy that inspects
        nothing in the span forwards it at the cost of a few searches per
        chunk. Cut a span into blocks with ``split_blocks``.
        """
        if not self._accepts(data):
            return b""
        if not self._held and _CR not in data and self._last != b"\r":
            return self._feed_lf_span(data)
        buf = self._glue(data)
        if self._held:
            return b"".join(self._frame(buf))
        # Every pair ("\n\n", "\r\r", "\n\r") ends a block, so the last pair
        # ends the last complete block (index 0 of buf is the byte before data).
        held = False
        if _CR not in buf:
            last = buf.rfind(b"\n\n")
            end = last + 2
        else:
            last = _last_pair(buf, len(buf))
            end, held = _block_end(buf, last)
        pending = self._pending
        if last < 0 or end <= 1:
            # No block ends in data (at most one held back for its lookahead).
            pending += data
            if len(pending) > self._max:
                self._fail([])
            self._held = held
            return b""
        if pending:
            # One copy: the held head of the first block and the rest, joined.
            span = b"".join((pending, memoryview(buf)[1:end]))
            pending.clear()
        else:
            span = buf[1:end]
        if len(span) > self._max:
            self._check_blocks(span)
        if end < len(buf):
            pending += buf[end:]
            if len(pending) > self._max:
                self._fail(split_blocks(span))
            self._held = held
        return span

    def _feed_lf_span(self, data: bytes) -> bytes:
        """``feed_span`` for data without a CR after a byte that is not one (the
        common case): only a ``\n\n`` ends a block, and no copy of ``data`` is
        made to find one that straddles the previous chunk."""
        last = data.rfind(b"\n\n")
        if last >= 0:
            end = last + 2
        elif data[0] == _LF and self._last == b"\n":
            end = 1  # the blank line's first LF ended the previous chunk
        else:
            end = 0
        self._last = data[-1:]
        pending = self._pending
        if not end:  # no block ends in data
            pending += data
            if len(pending) > self._max:
                self._fail([])
            return b""
        whole = end == len(data)
        if pending:
            # One copy: the held head of the first block and the rest, joined.
            span = b"".join((pending, data if whole else memoryview(data)[:end]))
            pending.clear()
        else:
            span = data if whole else data[:end]
        if len(span) > self._max:
            self._check_blocks(span)
        if not whole:
            pending += memoryview(data)[end:]
            if len(pending) > self._max:
                self._fail(split_blocks(span))
        return span

    def _accepts(self, data: bytes) -> bool:
        """Raise if no more input is taken; False for nothing to add."""
        if self._failed:
            raise SSEError("the SSE decoder failed earlier and accepts no more input")
        if self._closed:
            raise SSEError("feed() after close()")
        return bool(data)

    def _glue(self, data: bytes) -> bytes:
        """``data`` with one byte of context in front."""
        # The byte before the new data lets a single search find blank lines
        # that straddle the previous chunk.
        buf = self._last + data
        self._last = data[-1:]
        return buf

    def _frame(self, buf: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos = 1  # start of the block in progress, as an index into buf
        if self._held:
            self._held = False
            pending = self._pending
            if buf[1] == _LF:
                pending.append(_LF)
                pos = 2
            self._emit(bytes(pending), out)
            pending.clear()
        pos = self._scan_lf(buf, pos, out) if _CR not in buf else self._scan_any(buf, pos, out)
        if pos < len(buf):
            self._pending += buf[pos:]
            if len(self._pending) > self._max:
                self._fail(out)
        return out

    def _check_blocks(self, span: bytes) -> None:
        """Raise ``EventTooLarge`` if one of the blocks of ``span`` is too long."""
        blocks = split_blocks(span)
        for i, block in enumerate(blocks):
            if len(block) > self._max:
                self._fail(blocks[:i])

    def _emit(self, block: bytes, out: list[bytes]) -> None:
        if len(block) > self._max:
            self._fail(out)
        out.append(block)

    def _scan_lf(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Cut blocks out of ``buf`` (no CR in it: a blank line is ``\\n\\n``)."""
        find = buf.find
        pending = self._pending
        limit = self._max
        while (i := find(b"\n\n", pos - 1)) >= 0:
            end = i + 2
            if pending:
                block = b"".join((pending, memoryview(buf)[pos:end]))
                pending.clear()
            else:
                block = buf[pos:end]
            if len(block) > limit:
                self._fail(out)
            out.append(block)
            pos = end
        return pos

    def _scan_any(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Cut blocks out of ``buf`` with any line ends; may hold the last one.

        A blank line starts at the second byte of the first ``\\n\\n``,
        ``\\r\\r`` or ``\\n\\r``. The next position of each pattern is
        remembered and searched again only once the scan has passed it, so a
        CRLF stream costs one ``find`` per event (``\\n\\r``), not three.
        """
        find = buf.find
        pending = self._pending
        size = len(buf)
        nn = rr = nr = -1
        while True:
            start = pos - 1
            if nn < start:
                nn = find(b"\n\n", start)
                if nn < 0:
                    nn = size
            if rr < start:
                rr = find(b"\r\r", start)
                if rr < 0:
                    rr = size
            if nr < start:
                nr = find(b"\n\r", start)
                if nr < 0:
                    nr = size
            second = min(nn, rr, nr) + 1  # the first byte of the blank line
            if second > size:
                return pos
            if buf[second] == _CR:
                if second + 1 == size:
                    # Maybe the first half of a CRLF: hold the block back.
                    pending += buf[pos:]
                    if len(pending) > self._max:
                        self._fail(out)
                    self._held = True
                    return size
                end = second + 2 if buf[second + 1] == _LF else second + 1
            else:
                end = second + 1
            if pending:
                block = b"".join((pending, memoryview(buf)[pos:end]))
                pending.clear()
            else:
                block = buf[pos:end]
            self._emit(block, out)
            pos = end

    def close_whole(self) -> tuple[list[bytes], int]:
        """End of stream, whole blocks only: ``(blocks, dropped)``.

        ``blocks``: the last block if it was complete (its blank line a CR at the
        very end, held back for a possible LF); ``dropped``: the length of a last
        block without its blank line, which is discarded (a cut stream: a
        browser would not dispatch it, and a proxy must not forward it)."""
        held = self._held
        blocks = self.close_raw()
        if held or not blocks:
            return blocks, 0
        return [], len(blocks[0])

    def close_raw(self) -> list[bytes]:
        """End of stream: return the last raw block if it had no blank line."""
        if self._failed:
            raise SSEError("the SSE decoder failed earlier and accepts no more input")
        if self._closed:
            return []
        self._closed = True
        self._held = False
        if not self._pending:
            return []
        block = bytes(self._pending)
        self._pending.clear()
        return [block]

    def _fail(self, complete: list[bytes]) -> NoReturn:
        self._failed = True
        self._pending.clear()
        raise EventTooLarge(self._max, complete)


def _last_pair(buf: bytes, stop: int) -> int:
    """Index of the last line-end pair lying wholly in ``buf[:stop]``, or -1."""
    return max(
        buf.rfind(b"\n\n", 0, stop), buf.rfind(b"\r\r", 0, stop), buf.rfind(b"\n\r", 0, stop)
    )


def _block_end(buf: bytes, last: int) -> tuple[int, bool]:
    """Where the block ending with the pair at ``last`` ends, for ``feed_span``.

    Returns ``(end, held)``. When that block's blank line is a CR at the very
    end of ``buf`` it cannot be cut yet: ``end`` is then the end of the block
    before it (``<= 1`` if none ends in ``buf``) and ``held`` is true.
    """
    if last < 0:
        return last, False
    second = last + 1  # the first byte of the blank line
    size = len(buf)
    if buf[second] != _CR:
        return second + 1, False
    if second + 1 < size:
        return (second + 2 if buf[second + 1] == _LF else second + 1), False
    previous = _last_pair(buf, second)
    if previous < 0:
        return 0, True
    second = previous + 1  # < size - 1: its lookahead byte is in buf
    if buf[second] != _CR:
        return second + 1, True
    return (second + 2 if buf[second + 1] == _LF else second + 1), True


def split_blocks(span: bytes) -> list[bytes]:
    """Cut a span of complete blocks (from ``feed_span``) into its blocks.

    Gives the blocks ``feed_raw`` would have returned: a span always starts
    right after a block, and a fresh decoder's "after a line end" start state
    finds the same blank lines there.
    """
    if not span:
        return []
    decoder = SSEDecoder(len(span))
    return decoder.feed_raw(span) + decoder.close_raw()


def event_type(raw: bytes) -> bytes | None:
    """The value of a block's ``event`` field as bytes, without parsing the rest.

    ``None`` when the block has no ``event`` field. The common shape
    (``event: NAME\\n`` first, LF line ends, no second ``event`` line) costs two
    searches and a slice; anything else falls back to a byte-level line scan.
    If a block has several ``event`` lines the last one wins, as in a browser.
    """
    if raw.startswith(b"event: ") and _CR not in raw:
        end = raw.find(b"\n", 7)
        if end > 0 and raw.find(b"\nevent", end) < 0:
            return raw[7:end]
    return _event_type_slow(raw)


def _event_type_slow(raw: bytes) -> bytes | None:
    name: bytes | None = None
    if raw.startswith(_BOM_BYTES):
        raw = raw[3:]
    for line in _BYTES_LINE_END.split(raw):
        if line.startswith(b"event"):
            rest = line[5:]
            if not rest:
                name = b""
            elif rest[0] == 0x3A:  # ":"
                name = rest[2:] if rest.startswith(b": ") else rest[1:]
    return name


def parse_event(raw: bytes) -> SSEEvent:
    """Parse one raw block (as returned by ``feed_raw``) into an ``SSEEvent``.

    Invalid UTF-8 becomes U+FFFD in the parsed fields; ``raw`` is kept as is.
    """
    text = raw.decode("utf-8", "replace")
    if text.startswith(_BOM):
        text = text[1:]
    lines = _TEXT_LINE_END.split(text) if "\r" in text else text.split("\n")
    event: str | None = None
    data: list[str] | None = None
    event_id: str | None = None
    retry: int | None = None
    for line in lines:
        if not line or line[0] == ":":
            continue  # the blank line at the end, or a comment
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            if data is None:
                data = [value]
            else:
                data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            if "\0" not in value:
                event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)
        # Any other field name is ignored.
    return SSEEvent(
        event=event,
        data=None if data is None else "\n".join(data),
        id=event_id,
        retry=retry,
        raw=raw,
    )


def encode_event(
    event: str | None,
    data: str,
    id: str | None = None,
    *,
    retry: int | None = None,
) -> bytes:
    """Encode one event with LF line ends and a terminating blank line.

    Every line break in ``data`` (LF, CRLF or CR) starts a new ``data:`` line,
    so decoding gives back ``data`` with its line breaks as LF. ``event`` and
    ``id`` must be single lines (``id`` without NUL); ``retry`` is in ms.
    """
    parts: list[str] = []
    if event is not None:
        if "\n" in event or "\r" in event:
            raise ValueError("an SSE event name cannot contain a line break")
        parts.append(f"event: {event}\n")
    if id is not None:
        if "\n" in id or "\r" in id or "\0" in id:
            raise ValueError("an SSE id cannot contain a line break or NUL")
        parts.append(f"id: {id}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError("an SSE retry must be a non-negative number of ms")
        parts.append(f"retry: {retry}\n")
    lines = _TEXT_LINE_END.split(data) if "\r" in data else data.split("\n")
    for line in lines:
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")
