"""How a failed token-store operation is named in logs and metrics. No I/O.

- ``redis_address(url)``: the Redis URL without what may be secret (username,
  password, query parameters, sentinel credentials), for a log line.
- ``store_operation(tb, module)``: the store method that was running when an
  exception was raised, read from its traceback: the outermost frame of the
  store's module (``get_account``, ``try_lock``, ...). The exception itself
  (redis-py's ``ConnectionError``, say) does not say which operation failed,
  and naming it at every call site would repeat each call's name beside it.
"""

from __future__ import annotations

import dataclasses
from types import TracebackType
from urllib.parse import urlsplit

from keyrelay.auth.core.redis_url import DirectUrl, RedisUrlError, parse_redis_url

UNKNOWN_OPERATION = "unknown"


def redis_address(url: str) -> str:
    """``redis://host:port/db``, ``unix:///path`` or ``redis+sentinel://hosts/service/db``:
    scheme, hosts, port and path only."""
    try:
        parsed = parse_redis_url(url)
    except RedisUrlError:
        return "(not a Redis URL)"
    if isinstance(parsed, DirectUrl):
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]  # the credentials end at the last '@'
        return f"{parts.scheme}://{host}{parts.path}"
    public = dataclasses.replace(
        parsed, username=None, password=None, sentinel_username=None, sentinel_password=None
    )
    return public.to_url()


def store_operation(tb: TracebackType | None, module: str | tuple[str, ...]) -> str:
    """The name of the outermost function of ``module`` (or of any of several) in the
    traceback ``tb`` (which runs from the frame that caught the exception down to
    where it was raised)."""
    modules = (module,) if isinstance(module, str) else module
    while tb is not None:
        code = tb.tb_frame.f_code
        if tb.tb_frame.f_globals.get("__name__") in modules:
            return code.co_name
        tb = tb.tb_next
    return UNKNOWN_OPERATION
