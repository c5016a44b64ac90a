"""The gateway worker: a stateless Messages API proxy with stream-safe transforms."""
