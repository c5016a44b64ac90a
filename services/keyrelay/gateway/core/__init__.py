"""The gateway's pure transform core: no sockets, no asyncio, no HTTP library.

Everything here takes bytes or JSON values and returns bytes or JSON values, so it
can be tested exhaustively and driven by any server:

- ``sse``                -- incremental SSE decoder (bytes in, raw events out) and encoder
- ``tool_names``         -- custom tool-name prefixing with deterministic aliases
- ``request_transform``  -- headers, query, ``system_preamble`` and tool prefixing
- ``response_transform`` -- JSON bodies and SSE streams mapped back to client names
- ``usage``              -- token usage extraction and the price table
- ``errors``             -- the Anthropic error shape and the gateway's own statuses
"""
