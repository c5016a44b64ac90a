"""The gateway's I/O edge: the ASGI app, the upstream client, metrics."""
