"""The ``keyrelay`` command.

Service verbs (``auth serve``) load a TOML config; the people verbs
(``connect``, ``disconnect``, ``accounts``) talk to a running auth service over
gRPC with an admin service token, found in ``--token-file`` or
``KEYRELAY_ADMIN_TOKEN``, at ``--auth`` or ``KEYRELAY_AUTH_ADDRESS``.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import http.server
import json
import os
import queue
import sys
import threading
import time
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc

from keyrelay.auth.config import load_auth_config
from keyrelay.auth.core.authorize import is_loopback_redirect
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.configfile import ConfigError
from keyrelay.logs import configure_logging

DEFAULT_AUTH_ADDRESS = "127.0.0.1:50051"


class CliError(Exception):
    """A message for the person at the terminal; exit status 1."""


# -- service verbs -----------------------------------------------------------


def cmd_auth_serve(args: argparse.Namespace) -> int:
    from keyrelay.auth.rpc.server import serve

    path = args.config or os.environ.get("KEYRELAY_CONFIG")
    if not path:
        raise CliError("no config: pass --config FILE or set KEYRELAY_CONFIG")
    config = load_auth_config(path, os.environ)
    configure_logging(config.log_level)
    asyncio.run(serve(config))
    return 0


def cmd_gateway_serve(args: argparse.Namespace) -> int:
    from keyrelay.gateway.config import load_gateway_config
    from keyrelay.gateway.server import serve

    path = args.config or os.environ.get("KEYRELAY_CONFIG")
    if not path:
        raise CliError("no config: pass --config FILE or set KEYRELAY_CONFIG")
    config = load_gateway_config(path, os.environ)
    configure_logging(config.log_level)
    serve(config)
    return 0


def cmd_keys_config_entry(args: argparse.Namespace) -> int:
    from keyrelay.gateway.keys import config_entry, new_key

    if args.pool is not None:
        raise CliError(
            "--config-entry prints a [[keys]] block for an account; for a pool, write "
            'pool = "NAME" in the block instead of account (see the README\'s gateway config)'
        )
    if args.account is None:
        raise CliError("--config-entry needs --account")
    if args.mode or args.profile or args.upstream or _limits_given(args) or args.expires:
        raise CliError(
            "--config-entry prints a [[keys]] block with the defaults; set mode, profile, "
            "upstream and limits in the block itself (see the README's gateway config)"
        )
    key = new_key()
    say(f"gateway key (shown once; give it to the client as its API key):\n\n  {key}\n")
    say(
        "add this block to the gateway config (`keyrelay gateway serve --config FILE`), or,\n"
        "with `keyrelay dev`, to .keyrelay/routes.toml; then restart the gateway:\n"
    )
    say(config_entry(key, account=args.account, name=args.name or args.account))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from keyrelay.dev import run_dev

    return run_dev(
        Path(args.state_dir),
        auth_port=args.auth_port,
        gateway_port=args.gateway_port,
        account=args.account,
        upstream_url=args.upstream,
        web_port=args.web_port,
    )


# -- people verbs ------------------------------------------------------------


Metadata = tuple[tuple[str, str | bytes], ...]


def _stub(args: argparse.Namespace) -> tuple[auth_pb2_grpc.AuthServiceStub, Metadata]:
    token = os.environ.get("KEYRELAY_ADMIN_TOKEN", "")
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    if not token:
        raise CliError("no admin token: set KEYRELAY_ADMIN_TOKEN or pass --token-file FILE")
    address = args.auth or os.environ.get("KEYRELAY_AUTH_ADDRESS", DEFAULT_AUTH_ADDRESS)
    if args.ca_file:
        creds = grpc.ssl_channel_credentials(Path(args.ca_file).read_bytes())
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    return auth_pb2_grpc.AuthServiceStub(channel), (("authorization", f"Bearer {token}"),)


def _rpc_error(exc: grpc.RpcError) -> CliError:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        return CliError(f"cannot reach the auth service: {details}")
    return CliError(f"{code.name}: {details}")


def _when(ts: int) -> str:
    if not ts:
        return "-"
    left = ts - int(time.time())
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    return f"{stamp} ({'in ' + str(left) + 's' if left >= 0 else 'expired'})"


_STATUS_NAMES = {
    auth_pb2.Account.CONNECTED: "connected",
    auth_pb2.Account.DISCONNECTED: "disconnected",
}


def format_accounts(accounts: Sequence[auth_pb2.Account]) -> str:
    rows = [("ACCOUNT", "STATUS", "PROVIDER", "TOKEN EXPIRES", "LAST ERROR")]
    for a in accounts:
        status = _STATUS_NAMES.get(a.status, "unknown")
        note = a.last_error or (a.disconnect_reason if status == "disconnected" else "")
        rows.append(
            (a.account_id, status, a.provider, _when(a.access_token_expires_at), note or "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]
        for row in rows
    )


def cmd_accounts(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    try:
        reply = stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=md, timeout=10)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    print(format_accounts(reply.accounts) if reply.accounts else "no accounts yet")
    return 0


def cmd_disconnect(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    try:
        account = stub.Disconnect(
            auth_pb2.DisconnectRequest(account_id=args.account), metadata=md, timeout=30
        )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    print(f"{account.account_id}: disconnected")
    return 0


class _RedirectCatcher(http.server.BaseHTTPRequestHandler):
    """Answers the provider's redirect on the loopback port and hands the URL over."""

    inbox: queue.Queue[str]
    path_expected: str

    def do_GET(self) -> None:
        if urlsplit(self.path).path != self.path_expected:
            self.send_error(404)
            return
        self.inbox.put(f"http://{self.headers.get('host', 'localhost')}{self.path}")
        body = b"keyrelay: you can close this tab and return to the terminal.\n"
        self.send_response(200)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return  # the query string carries the code: keep it out of the terminal


def _catch_redirect(redirect_uri: str, inbox: queue.Queue[str]) -> http.server.HTTPServer | None:
    parts = urlsplit(redirect_uri)
    handler = type(
        "Catcher", (_RedirectCatcher,), {"inbox": inbox, "path_expected": parts.path or "/"}
    )
    try:
        server = http.server.HTTPServer((parts.hostname or "127.0.0.1", parts.port or 80), handler)
    except OSError as exc:
        print(f"(cannot listen for the redirect on {parts.netloc}: {exc.strerror}; paste instead)")
        return None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


_STDIN_ENDED = ""


def _read_pastes(inbox: queue.Queue[str]) -> None:
    """Every line typed or pasted goes to ``inbox``; then _STDIN_ENDED."""
    for line in sys.stdin:
        if line.strip():
            inbox.put(line)
    inbox.put(_STDIN_ENDED)


def say(text: str = "") -> None:
    """Prints and flushes: a wrapper reading our output through a pipe sees each line
    at once, not when the process exits (connect waits minutes for a code)."""
    print(text, flush=True)


# SubmitCode errors after which the same flow still takes a code: a paste that is
# not a code, or whose state belongs to another flow. Anything else used the flow up.
_PASTE_AGAIN = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


def cmd_connect(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    try:
        flow = stub.StartFlow(
            auth_pb2.StartFlowRequest(
                account_id=args.account,
                provider=args.provider,
                redirect_uri=args.redirect_uri or "",
            ),
            metadata=md,
            timeout=10,
        )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    redirect_uri = parse_qs(urlsplit(flow.authorize_url).query).get("redirect_uri", [""])[0]
    inbox: queue.Queue[str] = queue.Queue()
    catcher = _catch_redirect(redirect_uri, inbox) if is_loopback_redirect(redirect_uri) else None
    say(f"Open this URL to grant access to {args.account}:\n\n  {flow.authorize_url}\n")
    if args.open:
        webbrowser.open(flow.authorize_url)
    if catcher is not None:
        say("Waiting for the redirect... (or paste the code / redirected URL and press Enter)")
    else:
        say("Then paste the code, or the whole URL you were redirected to, and press Enter:")
    threading.Thread(target=_read_pastes, args=(inbox,), daemon=True).start()
    try:
        account = _submit_until_accepted(stub, md, flow, inbox, catching=catcher is not None)
    finally:
        if catcher is not None:
            catcher.shutdown()
            catcher.server_close()
    scopes = " ".join(account.scopes) or "-"
    say(f"{account.account_id}: connected to {account.provider} (scopes: {scopes})")
    return 0


def _submit_until_accepted(
    stub: auth_pb2_grpc.AuthServiceStub,
    md: Metadata,
    flow: auth_pb2.StartFlowResponse,
    inbox: queue.Queue[str],
    *,
    catching: bool,
) -> auth_pb2.Account:
    """Submits each paste (or the caught redirect) until one is accepted; a paste that
    is not a code asks for another, until the flow expires (or Ctrl-C)."""
    while True:
        try:
            pasted = inbox.get(timeout=max(0.1, flow.expires_at - time.time()))
        except queue.Empty:
            raise CliError(
                "the connection expired before a code arrived; run `keyrelay connect` again"
            ) from None
        if pasted == _STDIN_ENDED:
            if catching:
                continue  # the browser's redirect can still come
            raise CliError("standard input ended before a code was pasted; run connect again")
        try:
            account: auth_pb2.Account = stub.SubmitCode(
                auth_pb2.SubmitCodeRequest(flow_id=flow.flow_id, code=pasted.strip()),
                metadata=md,
                timeout=60,
            )
        except grpc.RpcError as exc:
            if exc.code() not in _PASTE_AGAIN:
                raise _rpc_error(exc) from None
            say(f"That did not work: {exc.details()}")
            say("Paste the code or the redirected URL again and press Enter (Ctrl-C to stop):")
            continue
        return account


# -- gateway keys at runtime ---------------------------------------------------


def parse_budget(text: str) -> auth_pb2.KeyBudget:
    """``5usd/month``, ``0.50usd/day``, ``2000000tokens/month`` -> a KeyBudget."""
    amount, _, period = text.strip().lower().partition("/")
    for unit in ("usd", "tokens"):
        if amount.endswith(unit):
            number = amount[: -len(unit)].strip().lstrip("$")
            break
    else:
        raise CliError(f"--budget {text!r}: write AMOUNT usd|tokens / day|month, e.g. 5usd/month")
    try:
        value = float(number)
    except ValueError:
        raise CliError(f"--budget {text!r}: {number!r} is not a number") from None
    if period not in ("day", "month"):
        raise CliError(f"--budget {text!r}: the period is day or month, e.g. 5usd/month")
    return auth_pb2.KeyBudget(amount=value, unit=unit, period=period)


_DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400}


def parse_expiry(text: str, now: float) -> int:
    """``never`` -> 0; ``30d``, ``12h``, ``90m`` from ``now``; or a UTC date
    ``2027-01-31`` (its start) / time ``2027-01-31T12:00`` -> Unix seconds."""
    value = text.strip().lower()
    if value == "never":
        return 0
    if value[:-1].isdigit() and value[-1:] in _DURATION_UNITS:
        return int(now) + int(value[:-1]) * _DURATION_UNITS[value[-1]]
    for layout in ("%Y-%m-%d", "%Y-%m-%dt%H:%M", "%Y-%m-%dt%H:%M:%S"):
        try:
            return calendar.timegm(time.strptime(value.rstrip("z"), layout))
        except ValueError:
            continue
    raise CliError(f"--expires {text!r}: write never, 30d, 12h, 90m or a UTC date like 2027-01-31")


def _limit_flag(value: str, flag: str) -> int | None:
    """A limit flag's value: a whole number, or ``none`` (no limit)."""
    if value.strip().lower() == "none":
        return None
    if not value.strip().isdigit():
        raise CliError(f"{flag} {value!r}: a whole number above 0, or none for no limit")
    return int(value)


def _limits_given(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, name, None) is not None for name in ("rpm", "tpm", "concurrent", "budget")
    ) or bool(getattr(args, "no_limits", False))


def _limits(args: argparse.Namespace, base: auth_pb2.KeyLimits | None = None) -> auth_pb2.KeyLimits:
    """The key's limits: ``base`` (the key's as it is) with the flags given applied."""
    limits = auth_pb2.KeyLimits()
    if base is not None and not getattr(args, "no_limits", False):
        limits.CopyFrom(base)
    for flag, field in (
        ("rpm", "requests_per_minute"),
        ("tpm", "tokens_per_minute"),
        ("concurrent", "concurrent_requests"),
    ):
        given = getattr(args, flag)
        if given is None:
            continue
        value = _limit_flag(given, "--" + flag)
        if value is None:
            limits.ClearField(field)  # type: ignore[arg-type]
        else:
            setattr(limits, field, value)
    if args.budget is not None:
        if args.budget.strip().lower() == "none":
            limits.ClearField("budget")
        else:
            limits.budget.CopyFrom(parse_budget(args.budget))
    return limits


def key_route(args: argparse.Namespace, base: auth_pb2.KeyRoute | None = None) -> auth_pb2.KeyRoute:
    """The key's route: ``base`` (the key's as it is) with the flags given applied. A
    pool (``--pool``) replaces the account and mode, and an account or a mode replaces
    the pool: a key routes to one credential or to a pool's members, not both."""
    own = [f"--{flag}" for flag in ("account", "mode") if getattr(args, flag) is not None]
    if args.pool is not None and own:
        raise CliError(
            f"--pool: a key names a pool or its own credential, not both: leave out "
            f"{' and '.join(own)}"
        )
    route = auth_pb2.KeyRoute()
    if base is not None:
        route.CopyFrom(base)
    if args.pool is not None:
        route.pool = args.pool
        route.ClearField("account_id")
        route.ClearField("mode")
    elif own and route.pool:  # from the pool to a credential of its own
        route.ClearField("pool")
        route.ClearField("mode")
    for flag, field in (
        ("account", "account_id"),
        ("mode", "mode"),
        ("profile", "profile"),
        ("upstream", "upstream"),
    ):
        given = getattr(args, flag)
        if given is not None:
            setattr(route, field, given)
    return route


def describe_limits(limits: auth_pb2.KeyLimits) -> str:
    parts = []
    if limits.HasField("requests_per_minute"):
        parts.append(f"{limits.requests_per_minute} req/min")
    if limits.HasField("tokens_per_minute"):
        parts.append(f"{limits.tokens_per_minute} tok/min")
    if limits.HasField("concurrent_requests"):
        parts.append(f"{limits.concurrent_requests} at once")
    if limits.HasField("budget"):
        b = limits.budget
        amount = f"${b.amount:,.2f}" if b.unit == "usd" else f"{b.amount:,.0f} tokens"
        parts.append(f"{amount}/{b.period}")
    return ", ".join(parts) or "none"


def _key_status(key: auth_pb2.GatewayKey, now: float) -> str:
    if key.revoked_at:
        return "revoked"
    if key.expires_at and key.expires_at <= now:
        return "expired"
    return "live"


def format_keys(keys: Sequence[auth_pb2.GatewayKey], now: float) -> str:
    rows = [("KEY ID", "NAME", "ROUTE", "LIMITS", "EXPIRES", "STATUS")]
    for k in keys:
        r = k.route
        credential = f"pool {r.pool}" if r.pool else f"{r.account_id or '-'} {r.mode or 'oauth'}"
        route = f"{credential} {r.profile or 'default'}@{r.upstream or 'default'}"
        expires = (
            time.strftime("%Y-%m-%d %H:%MZ", time.gmtime(k.expires_at)) if k.expires_at else "never"
        )
        rows.append(
            (k.key_id, k.name, route, describe_limits(k.limits), expires, _key_status(k, now))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows
    )


def key_json(key: auth_pb2.GatewayKey, now: float) -> dict[str, object]:
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(key, preserving_proto_field_name=True)
    data["status"] = _key_status(key, now)
    return data


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_keys_new(args: argparse.Namespace) -> int:
    if args.config_entry:
        return cmd_keys_config_entry(args)
    if (args.account is None) == (args.pool is None):
        raise CliError("keys new needs --account NAME or --pool NAME (one of the two)")
    stub, md = _stub(args)
    request = auth_pb2.CreateKeyRequest(
        name=args.name or args.account or args.pool,
        route=key_route(args),
        limits=_limits(args),
        expires_at=parse_expiry(args.expires, time.time()) if args.expires else 0,
    )
    try:
        reply = stub.CreateKey(request, metadata=md, timeout=10)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    if args.json:
        _print_json({"secret": reply.secret, "key": key_json(reply.key, time.time())})
        return 0
    say(f"gateway key {reply.key.key_id} (shown once; give it to the client as its API key):")
    say(f"\n  {reply.secret}\n")
    say(f"limits: {describe_limits(reply.key.limits)}; every gateway takes it within a second.")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    try:
        reply = stub.ListKeys(
            auth_pb2.ListKeysRequest(include_revoked=args.all), metadata=md, timeout=30
        )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    now = time.time()
    if args.json:
        _print_json([key_json(k, now) for k in reply.keys])
    else:
        print(format_keys(reply.keys, now) if reply.keys else "no gateway keys on the auth service")
    return 0


def cmd_keys_update(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    try:
        key = stub.GetKey(auth_pb2.GetKeyRequest(key_id=args.key_id), metadata=md, timeout=10)
        request = auth_pb2.UpdateKeyRequest(key_id=args.key_id, expected_version=key.version)
        if args.name is not None:
            request.name = args.name
        route_flags = ("account", "mode", "profile", "upstream", "pool")
        if any(getattr(args, f) is not None for f in route_flags):
            request.route.CopyFrom(key_route(args, key.route))
        if _limits_given(args):
            request.limits.CopyFrom(_limits(args, key.limits))
        if args.expires is not None:
            request.expires_at = parse_expiry(args.expires, time.time())
        updated = stub.UpdateKey(request, metadata=md, timeout=10)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    if args.json:
        _print_json(key_json(updated, time.time()))
    else:
        print(format_keys([updated], time.time()))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    try:
        key = stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=args.key_id), metadata=md, timeout=10)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    if args.json:
        _print_json(key_json(key, time.time()))
    else:
        print(f"{key.key_id} ({key.name}): revoked; every gateway refuses it within a second")
    return 0


def _add_key_flags(parser: argparse.ArgumentParser, *, new: bool) -> None:
    parser.add_argument(
        "--name",
        help="label for logs, metrics and usage"
        + (" (default: the account, or the pool)" if new else ""),
    )
    parser.add_argument(
        "--pool",
        help="a pool of the gateway config ([pools.NAME]) instead of an account and a mode",
    )
    parser.add_argument(
        "--mode", choices=("oauth", "api_key", "auto"), help="default oauth" if new else None
    )
    parser.add_argument(
        "--profile",
        help="a profile of the gateway config (default: default)"
        if new
        else "a profile of the gateway config",
    )
    parser.add_argument(
        "--upstream",
        help="an upstream of the gateway config (default: default)"
        if new
        else "an upstream of the gateway config",
    )
    parser.add_argument("--rpm", help="requests per minute (none: no limit)")
    parser.add_argument("--tpm", help="input + output tokens per minute (none: no limit)")
    parser.add_argument("--concurrent", help="requests at once (none: no limit)")
    parser.add_argument("--budget", help="e.g. 5usd/month or 2000000tokens/day (none: no budget)")
    parser.add_argument("--expires", help="never, 30d, 12h, 90m or a UTC date like 2027-01-31")
    parser.add_argument("--json", action="store_true", help="print JSON")


# -- usage ---------------------------------------------------------------------


_USAGE_HEADER = ("DAY", "SUBJECT", "REQUESTS", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE")
_TOTAL_OF = {"key": "keys", "account": "accounts"}


def usage_subject(row: auth_pb2.UsageRow) -> str:
    """``key ci (gk-...)``, ``key sha256:0123456789ab...`` (a key the auth service does
    not know: a config-file key), ``account alice``; in totals, ``keys``/``accounts``."""
    if not row.day:
        return _TOTAL_OF.get(row.kind, row.kind)
    if row.kind == "key" and row.key_id:
        return f"key {row.name} ({row.key_id})"
    if row.kind == "key":
        return f"key {row.id[:19]}..."
    return f"{row.kind} {row.id}"


def format_usage(reply: auth_pb2.GetUsageResponse) -> str:
    """The rows and a totals line per kind; right-aligned numbers."""
    table = [(*_USAGE_HEADER, "COST")]
    for row in [*reply.rows, *reply.totals]:
        table.append(
            (
                row.day or "TOTAL",
                usage_subject(row),
                f"{row.requests:,}",
                f"{row.input_tokens:,}",
                f"{row.output_tokens:,}",
                f"{row.cache_read_input_tokens:,}",
                f"{row.cache_creation_input_tokens:,}",
                f"${row.cost_usd:,.4f}",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in table
    ]
    lines.insert(len(reply.rows) + 1, "")  # the totals apart
    unpriced = sum(t.unpriced for t in reply.totals if t.kind == "key")
    if unpriced:
        lines.append(f"({unpriced:,} requests of models without a price: not in COST)")
    return "\n".join(line.rstrip() for line in lines)


def usage_json(reply: auth_pb2.GetUsageResponse) -> dict[str, object]:
    def row(message: auth_pb2.UsageRow) -> dict[str, object]:
        return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}

    return {
        "since": reply.since,
        "until": reply.until,
        "rows": [row(r) for r in reply.rows],
        "totals": [row(t) for t in reply.totals],
    }


def cmd_usage(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    request = auth_pb2.GetUsageRequest(account_id=args.account or "")
    if args.key and args.key.startswith("sha256:"):
        request.key_sha256 = args.key
    elif args.key:
        request.key_id = args.key
    if args.days is not None:
        request.days = args.days
    try:
        reply = stub.GetUsage(request, metadata=md, timeout=30)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    if args.json:
        _print_json(usage_json(reply))
    elif not reply.rows:
        print(f"no usage recorded from {reply.since} to {reply.until} (UTC)")
    else:
        print(format_usage(reply))
    return 0


def _add_usage_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = verbs.add_parser(
        "usage",
        help="usage the gateways recorded, per key, account and UTC day",
        description=(
            "Requests, tokens by kind and cost the gateways recorded, per key and account "
            "and UTC day, with totals per kind (a request counts under its key and its "
            "account). Recorded for keys and accounts that have limits."
        ),
    )
    usage.add_argument("--key", help="a key: its id (gk-...) or its hash (sha256:...)")
    usage.add_argument("--account", help="an account")
    usage.add_argument("--days", type=int, help="UTC days ending today, 1 to 400 (default 30)")
    usage.add_argument("--json", action="store_true", help="print JSON")
    _add_client_flags(usage)
    usage.set_defaults(func=cmd_usage)


# -- pools -------------------------------------------------------------------


def cmd_pools(args: argparse.Namespace) -> int:
    from keyrelay.gateway.config import load_gateway_config
    from keyrelay.gateway.pool_status import (
        StoreUnreachable,
        format_pools,
        pools_json,
        read_pools,
    )

    path = args.config or os.environ.get("KEYRELAY_CONFIG")
    if not path:
        raise CliError("no config: pass --config GATEWAY_TOML or set KEYRELAY_CONFIG")
    if not args.timeout > 0:
        raise CliError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
    config = load_gateway_config(path, os.environ)
    if not config.pools:
        if args.json:
            _print_json([])
        else:
            print(f"no pools in {path} ([pools.<name>])")
        return 0
    try:
        pools = asyncio.run(read_pools(config, wait_seconds=args.timeout))
    except StoreUnreachable as exc:
        raise CliError(str(exc)) from None
    now = time.time()
    if args.json:
        _print_json(pools_json(pools, now))
    else:
        print(format_pools(pools, now))
    return 0


def _add_pools_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pools = verbs.add_parser(
        "pools",
        help="a gateway config's pools: each member and whether it cools down now",
        description=(
            "Each pool of the gateway config with its members (id, name, mode, account) "
            "and their state now: cooling until when (a 429, 529 or overloaded answer), "
            "or available, read from the limits store's Redis ([gateway.limits]) that "
            "every gateway worker shares. Exit status 1 when that store does not answer."
        ),
    )
    pools.add_argument("--config", help="the gateway's TOML config (default: $KEYRELAY_CONFIG)")
    pools.add_argument("--json", action="store_true", help="print JSON")
    pools.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="seconds to wait for the limits store (default 2)",
    )
    pools.set_defaults(func=cmd_pools)


# -- wiring ------------------------------------------------------------------


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth", help=f"auth service address (default {DEFAULT_AUTH_ADDRESS})")
    parser.add_argument("--token-file", help="file holding the admin service token")
    parser.add_argument("--ca-file", help="CA bundle when the auth service uses TLS")


def _add_keys_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = verbs.add_parser("keys", help="gateway keys")
    keys_verbs = keys.add_subparsers(dest="keys_verb", required=True)
    keys_new = keys_verbs.add_parser(
        "new", help="create a gateway key on the auth service (every gateway takes it at once)"
    )
    keys_new.add_argument("--account", help="account the key routes to (or --pool)")
    _add_key_flags(keys_new, new=True)
    keys_new.add_argument(
        "--config-entry",
        action="store_true",
        help="mint a key offline and print its [[keys]] block for a gateway config file instead",
    )
    _add_client_flags(keys_new)
    keys_new.set_defaults(func=cmd_keys_new)
    keys_list = keys_verbs.add_parser("list", help="the auth service's gateway keys")
    keys_list.add_argument("--all", action="store_true", help="revoked keys too")
    keys_list.add_argument("--json", action="store_true", help="print JSON")
    _add_client_flags(keys_list)
    keys_list.set_defaults(func=cmd_keys_list)
    keys_update = keys_verbs.add_parser("update", help="change a key's name, route, limits, expiry")
    keys_update.add_argument("key_id")
    keys_update.add_argument("--account", help="account the key routes to (replaces a pool)")
    _add_key_flags(keys_update, new=False)
    keys_update.add_argument("--no-limits", action="store_true", help="remove every limit")
    _add_client_flags(keys_update)
    keys_update.set_defaults(func=cmd_keys_update)
    keys_revoke = keys_verbs.add_parser("revoke", help="revoke a key for good")
    keys_revoke.add_argument("key_id")
    keys_revoke.add_argument("--json", action="store_true", help="print JSON")
    _add_client_flags(keys_revoke)
    keys_revoke.set_defaults(func=cmd_keys_revoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyrelay",
        description=(
            "keyrelay turns an OAuth grant, given once by a person, into short-lived Bearer "
            "tokens for a fleet of Messages API gateway workers. `keyrelay dev` runs the "
            "whole stack on this machine; `auth serve` and `gateway serve` run the services; "
            "`connect`, `accounts` and `disconnect` manage accounts."
        ),
        epilog=(
            "environment: KEYRELAY_CONFIG (the config of auth/gateway serve), "
            "KEYRELAY_ADMIN_TOKEN and KEYRELAY_AUTH_ADDRESS (connect, accounts, disconnect). "
            "`keyrelay VERB --help` tells more; the README has the config reference."
        ),
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    auth = verbs.add_parser("auth", help="the auth service")
    auth_verbs = auth.add_subparsers(dest="auth_verb", required=True)
    serve = auth_verbs.add_parser("serve", help="run the auth service (gRPC)")
    serve.add_argument("--config", help="TOML config (default: $KEYRELAY_CONFIG)")
    serve.set_defaults(func=cmd_auth_serve)

    gateway = verbs.add_parser("gateway", help="the gateway worker")
    gateway_verbs = gateway.add_subparsers(dest="gateway_verb", required=True)
    gateway_serve = gateway_verbs.add_parser("serve", help="run a gateway worker (HTTP)")
    gateway_serve.add_argument("--config", help="TOML config (default: $KEYRELAY_CONFIG)")
    gateway_serve.set_defaults(func=cmd_gateway_serve)

    _add_keys_verbs(verbs)
    _add_usage_verb(verbs)
    _add_pools_verb(verbs)

    dev = verbs.add_parser("dev", help="run the whole stack locally: Redis, auth, gateway")
    dev.add_argument("--state-dir", default=".keyrelay", help="secrets, configs and data")
    dev.add_argument("--auth-port", type=int, default=50051)
    dev.add_argument("--gateway-port", type=int, default=8080)
    dev.add_argument("--web-port", type=int, default=8081, help="the web connect page")
    dev.add_argument("--account", default="default", help="account the dev gateway key uses")
    dev.add_argument(
        "--upstream",
        default=os.environ.get("KEYRELAY_UPSTREAM_URL", "https://api.anthropic.com"),
        help="Messages API upstream (default: $KEYRELAY_UPSTREAM_URL or the Anthropic API)",
    )
    dev.set_defaults(func=cmd_dev)

    connect = verbs.add_parser("connect", help="connect an account through OAuth + PKCE")
    connect.add_argument("account")
    connect.add_argument("--provider", required=True)
    connect.add_argument("--redirect-uri", help="one of the provider's allowed redirect URIs")
    connect.add_argument("--open", action="store_true", help="open the URL in a browser")
    _add_client_flags(connect)
    connect.set_defaults(func=cmd_connect)

    disconnect = verbs.add_parser("disconnect", help="revoke and forget an account's tokens")
    disconnect.add_argument("account")
    _add_client_flags(disconnect)
    disconnect.set_defaults(func=cmd_disconnect)

    accounts = verbs.add_parser("accounts", help="list accounts")
    _add_client_flags(accounts)
    accounts.set_defaults(func=cmd_accounts)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ConfigError) as exc:
        print(f"keyrelay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path given on the command line: missing, unreadable, not a dir
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"keyrelay: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
