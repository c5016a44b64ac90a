"""The `keyrelay.auth.v1` wire contract: generated code (`make gen`) and what protos cannot say."""

# Initial-metadata key of a ``WatchEvents`` stream: the event id the stream starts
# after. Sent before any event, so a watcher that saw none can still resume exactly.
EVENTS_CURSOR_METADATA = "keyrelay-events-cursor"
