"""The auth service's HTTP side (``[auth.web]``): probes, metrics and the connect page.

It runs on aiohttp's server in the same process and event loop as the gRPC
server and calls the same ``AuthService`` object; like the servicer, the
handlers only translate (forms and query strings in, HTML out) and delegate.

===============  =====  ==========================================================
``/healthz``     GET    alive (no login)
``/readyz``      GET    Redis answers PING (no login); 503 within 0.8 s if not
``/metrics``     GET    Prometheus text of the default registry (no login)
``/login``       GET    the login form; POST: an admin service token → session cookie
``/logout``      POST   ends the session
``/``            GET    accounts, flows waiting for a code, the Connect form
``/connect``     POST   StartFlow; 302 to the provider when it redirects back here
``/callback``    GET    the provider's redirect: SubmitCode, then back to ``/``
``/paste``       POST   SubmitCode with a pasted code / ``code#state`` / redirect URL
``/cancel``      POST   CancelFlow of a waiting flow
``/disconnect``  POST   Disconnect
``/usage``       GET    the keys' usage of the last 30 days as an SVG chart
                        (``?metric=cost`` (default) or ``tokens``)
``/keys``        GET    the live gateway keys, newest first, 50 a page (``?page=``):
                        route, limits, expiry, this month's usage
``/keys``        POST   CreateKey from the form (once per form), then 303 to:
``/keys/created`` GET   the new key, shown once (``?form=``); a reload: "already shown"
``/keys/revoke`` GET    the confirmation page of ``?key_id=``; POST: RevokeKey
===============  =====  ==========================================================

Security: the session cookie is a random id (HttpOnly, SameSite=Strict, Secure
when ``public_url`` is https; see ``sessions.py`` for what Redis keeps); every
POST carries the session's CSRF token (the login form a pre-session one in a
cookie of its own); pages are sent with a CSP that allows no script at all, and
``Referrer-Policy: no-referrer`` so the callback's address (it carries the
code) never leaves in a Referer. Every answer is ``Cache-Control: no-store``.
A new gateway key is only ever in the body of the first ``/keys/created`` view
after its creation (POST, 303, GET: a reload re-sends no form); never in a URL, a
cookie, the session or a log line, and in Redis only sealed, for minutes, under
the form's id, which Redis does not hold (``sessions.py``). The access log has
the path only, never a query string. ``/callback`` needs no session: the OAuth
``state`` is the credential there, and it only exists for a flow an admin
started here.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from multidict import MultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from keyrelay.auth.config import AuthConfig, WebConfig
from keyrelay.auth.core.codes import parse_pasted_code
from keyrelay.auth.core.errors import (
    AuthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    mapped,
)
from keyrelay.auth.rpc.interceptors import CallerAuthenticator
from keyrelay.auth.service import AuthService
from keyrelay.auth.web.keys_page import (
    FORM_FIELDS,
    key_created_page,
    key_shown_before_page,
    keys_page,
    page_of,
    parse_key_form,
    parse_page,
    revoke_page,
)
from keyrelay.auth.web.pages import (
    Flash,
    Html,
    UsageDay,
    accounts_page,
    callback_done_page,
    login_page,
    message_page,
    usage_page,
)
from keyrelay.auth.web.sessions import (
    FormResult,
    PendingFlow,
    Session,
    SessionStore,
    caller_fingerprint,
)
from keyrelay.configfile import host_port
from keyrelay.usage_layout import UsageRecord

log = logging.getLogger("keyrelay.auth.web")
access_log = logging.getLogger("keyrelay.auth.web.access")

SESSION_COOKIE = "keyrelay_session"
LOGIN_COOKIE = "keyrelay_login"
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_FORM_BYTES = 64 * 1024
USAGE_DAYS = 30  # the usage page's chart
FORM_ID = re.compile(r"^[A-Za-z0-9_-]{32}\Z")  # secrets.token_urlsafe(24)

# The usual gRPC → HTTP mapping (as grpc-gateway does it).
HTTP_STATUS: Mapping[type[AuthError], int] = {
    NotFound: 404,
    InvalidArgument: 400,
    FailedPrecondition: 400,
    Unavailable: 503,
    Unauthenticated: 401,
    PermissionDenied: 403,
}


def http_status(error: AuthError) -> int:
    return mapped(error, HTTP_STATUS, 500)


class PageError(Exception):
    """Ends a request with a message page and this status."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


def html_response(body: Html, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _state_of(authorize_url: str) -> str:
    # StartFlow put the state in the URL it returns (and only there).
    return parse_qs(urlsplit(authorize_url).query).get("state", [""])[-1]


def _same(presented: str, expected: str) -> bool:
    return bool(presented) and hmac.compare_digest(presented.encode(), expected.encode())


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path and status. The query (a code!) never."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.log(
            logging.DEBUG if request.path in PROBES else logging.INFO,
            "web request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 1),
            },
        )


class WebApp:
    def __init__(
        self,
        config: AuthConfig,
        web_config: WebConfig,
        service: AuthService,
        sessions: SessionStore,
    ) -> None:
        self._service = service
        self._web = web_config
        self._sessions = sessions
        self._providers = config.providers
        self._authenticator = CallerAuthenticator(config.callers)
        self._admins = [caller_fingerprint(c.token) for c in config.callers if c.role == "admin"]
        callback = web_config.callback_uri
        # Each provider: does its allowed list have our callback (else: paste the code)?
        self._modes = {
            name: callback is not None and callback in p.redirect_uris
            for name, p in config.providers.items()
        }
        origins = {urlsplit(p.authorize_url) for p in self._providers.values()}
        form_action = " ".join(["'self'", *sorted(f"{o.scheme}://{o.netloc}" for o in origins)])
        # form-action also covers the redirect of /connect to the provider.
        self._csp = (
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
            f"frame-ancestors 'none'; form-action {form_action}"
        )

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_FORM_BYTES, middlewares=[self._errors])
        app.on_response_prepare.append(self._headers)
        app.router.add_get("/healthz", self.healthz, allow_head=True)
        app.router.add_get("/readyz", self.readyz, allow_head=True)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/", self.index)
        app.router.add_post("/connect", self.connect)
        app.router.add_get("/callback", self.callback)
        app.router.add_post("/paste", self.paste)
        app.router.add_post("/cancel", self.cancel)
        app.router.add_post("/disconnect", self.disconnect)
        app.router.add_get("/usage", self.usage)
        app.router.add_get("/keys", self.keys)
        app.router.add_post("/keys", self.create_key)
        app.router.add_get("/keys/created", self.key_created)
        app.router.add_get("/keys/revoke", self.revoke_confirm)
        app.router.add_post("/keys/revoke", self.revoke_key)
        return app

    # -- plumbing -----------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except PageError as exc:
            return html_response(message_page(exc.title, exc.text), exc.status)
        except AuthError as exc:
            return html_response(message_page("Error", str(exc)), http_status(exc))
        except web.HTTPException:
            raise
        except Exception:
            log.exception("unexpected error in the web page", extra={"path": request.path})
            text = "internal error; see the service log"
            return html_response(message_page("Internal error", text), 500)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers["Server"] = "keyrelay"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Cache-Control"] = "no-store"
        if request.path not in PROBES:
            headers["Content-Security-Policy"] = self._csp
            headers["X-Frame-Options"] = "DENY"

    def _cookie(
        self, response: web.StreamResponse, name: str, value: str, *, path: str, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            path=path,
            max_age=max_age,
            httponly=True,
            samesite="Strict",
            secure=self._web.secure_cookies,
        )

    def _known_caller(self, fingerprint: str) -> bool:
        known = False
        for admin in self._admins:  # all of them: the time does not tell which matched
            if hmac.compare_digest(admin, fingerprint):
                known = True
        return known

    async def _session(self, request: web.Request) -> Session | None:
        session = await self._sessions.load(request.cookies.get(SESSION_COOKIE, ""))
        if session is None or not self._known_caller(session.caller):
            return None
        return session

    async def _viewer(self, request: web.Request) -> Session:
        """The session of a page's GET, or off to the login form."""
        session = await self._session(request)
        if session is None:
            raise web.HTTPSeeOther("/login")
        return session

    async def _take_flashes(self, session: Session) -> tuple[Session, list[Flash]]:
        """The session as stored now, and its flashes (shown once: dropped)."""
        session = await self._sessions.reload(session.key) or session
        flashes = [flash for _, flash in session.flashes]
        await self._sessions.drop_flashes(session)
        return session, flashes

    async def _post(self, request: web.Request) -> tuple[Session, MultiDictProxy[Any]]:
        """A state-changing request: a live session and its CSRF token, or no further."""
        session = await self._session(request)
        if session is None:
            raise PageError(
                401, "Log in", "Your session ended or you are not logged in: log in again."
            )
        form = await request.post()
        if not _same(_field(form, "csrf"), session.csrf):
            raise PageError(403, "Forbidden", _CSRF_FAILED)
        return session, form

    async def _accounts(
        self,
        session: Session,
        *,
        status: int = 200,
        error: str | None = None,
        account_id: str = "",
        provider: str = "",
    ) -> web.Response:
        records = await self._service.list_accounts()
        session, flashes = await self._take_flashes(session)
        now = time.time()
        pending = []
        for flow in session.pending:
            if flow.expires_at <= now:
                await self._sessions.remove_pending(session.key, flow.handle)
            else:
                pending.append(flow.view())
        if error is not None:
            flashes.append(Flash("error", error))
        body = accounts_page(
            records=records,
            pending=pending,
            providers=self._modes,
            csrf=session.csrf,
            flashes=flashes,
            account_id=account_id,
            provider=provider,
            now=now,
        )
        return html_response(body, status)

    async def _done(self, session_key: str, text: str, to: str = "/") -> web.Response:
        await self._sessions.add_flash(session_key, Flash("ok", text))
        raise web.HTTPSeeOther(to)

    # -- probes -------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """Whether this replica's store answers, within READY_DEADLINE_SECONDS.

        For dashboards and alerts, not for a Kubernetes readinessProbe: every
        replica shares the store (the probe is the gRPC health, which stays
        SERVING while Redis is down; docs/decisions.md). A failed check is
        logged and counted by ``AuthService.ready``."""
        try:
            ready = await self._service.ready()
        except Exception:  # a bug, not Redis (ready() answers those): still answer
            log.exception("readiness check failed")
            ready = False
        return web.Response(
            text="ready\n" if ready else "redis unavailable\n", status=200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # -- login --------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        if await self._session(request) is not None:
            raise web.HTTPSeeOther("/")
        login_csrf = secrets.token_urlsafe(32)
        response = html_response(login_page(login_csrf))
        self._cookie(response, LOGIN_COOKIE, login_csrf, path="/login", max_age=3600)
        return response

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        login_csrf = request.cookies.get(LOGIN_COOKIE, "")
        if not _same(_field(form, "csrf"), login_csrf):
            raise PageError(403, "Forbidden", _CSRF_FAILED)
        token = _field(form, "token")
        if not token:
            return html_response(login_page(login_csrf, error="Enter an admin token."), 400)
        try:
            role = self._authenticator.role_of(f"Bearer {token}")
        except Unauthenticated:
            log.warning("web login refused: unknown token", extra={"remote": request.remote})
            return html_response(login_page(login_csrf, error="Unknown token."), 401)
        if role != "admin":
            log.warning("web login refused: not an admin token", extra={"role": role})
            text = f"This token has the {role} role; the web page needs an admin token."
            return html_response(login_page(login_csrf, error=text), 403)
        session_id, _ = await self._sessions.create(caller_fingerprint(token))
        log.info("web login", extra={"remote": request.remote})
        response = web.HTTPSeeOther("/")
        self._cookie(
            response,
            SESSION_COOKIE,
            session_id,
            path="/",
            max_age=int(self._web.session_ttl_seconds),
        )
        response.del_cookie(LOGIN_COOKIE, path="/login")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session, _ = await self._post(request)
        await self._sessions.delete(session)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    # -- the page -----------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return await self._accounts(await self._viewer(request))

    async def usage(self, request: web.Request) -> web.Response:
        session = await self._viewer(request)
        metric: Literal["cost", "tokens"] = (
            "tokens" if request.query.get("metric") == "tokens" else "cost"
        )
        report = await self._service.get_usage(days=USAGE_DAYS)
        by_day = {day: UsageDay(day, 0, 0, 0.0) for day in report.days}
        for row in report.rows:
            if row.kind == "key":  # a request is under its key, and maybe its account too
                seen = by_day[row.day]
                by_day[row.day] = UsageDay(
                    row.day,
                    seen.requests + row.usage.requests,
                    seen.tokens + row.usage.tokens,
                    seen.cost_usd + row.usage.cost_usd,
                )
        return html_response(usage_page(list(by_day.values()), metric, csrf=session.csrf))

    async def connect(self, request: web.Request) -> web.Response:
        session, form = await self._post(request)
        account_id, provider = _field(form, "account_id"), _field(form, "provider")
        via_callback = self._modes.get(provider, False)
        callback = self._web.callback_uri if via_callback else None
        try:
            flow = await self._service.start_flow(account_id, provider, callback or "")
        except AuthError as exc:
            return await self._accounts(
                session,
                status=http_status(exc),
                error=str(exc),
                account_id=account_id,
                provider=provider,
            )
        pending = PendingFlow(
            handle=secrets.token_urlsafe(12),
            flow_id=flow.flow_id,
            account_id=account_id,
            provider=provider,
            authorize_url=flow.authorize_url,
            expires_at=flow.expires_at,
            via_callback=via_callback,
        )
        await self._sessions.add_pending(session, pending, _state_of(flow.authorize_url))
        if via_callback:
            raise web.HTTPFound(flow.authorize_url)
        return await self._done(
            session.key,
            f"Connecting {account_id} at {provider}: open the provider's page below, approve, "
            "then paste the code it shows you (or the whole address it sent you to).",
        )

    async def callback(self, request: web.Request) -> web.Response:
        # The redirect is what a person would paste: the service parses the code,
        # an error= of the provider and the state (checked in constant time) itself.
        redirect = "?" + request.rel_url.raw_query_string
        found = await self._sessions.take_state(request.query.get("state", ""))
        if found is None:
            if "error" in request.query:
                try:
                    parse_pasted_code(redirect)
                except InvalidArgument as exc:
                    raise PageError(400, "Access refused", str(exc)) from None
            raise PageError(400, "State mismatch", _STATE_UNKNOWN)
        session_key, flow = found
        await self._sessions.remove_pending(session_key, flow.handle)
        try:
            record = await self._service.submit_code(flow.flow_id, redirect)
        except AuthError as exc:
            if "error" in request.query:
                with suppress(NotFound):
                    await self._service.cancel_flow(flow.flow_id)
            raise PageError(
                http_status(exc), "Connection failed", f"Connecting {flow.account_id}: {exc}"
            ) from None
        text = f"Connected {record.account_id} at {record.provider}."
        current = await self._session(request)
        if current is not None and current.key == session_key:
            return await self._done(session_key, text)
        # No session cookie on a redirect chain from another site (SameSite=Strict):
        # a navigation this page starts carries it.
        await self._sessions.add_flash(session_key, Flash("ok", text))
        return html_response(callback_done_page(text))

    def _pending(self, session: Session, handle: str) -> PendingFlow:
        for flow in session.pending:
            if flow.handle == handle:
                return flow
        raise NotFound(
            "this connection is not waiting for a code any more (it expired, was cancelled "
            "or finished): start a new one"
        )

    async def paste(self, request: web.Request) -> web.Response:
        session, form = await self._post(request)
        try:
            flow = self._pending(session, _field(form, "flow"))
            try:
                record = await self._service.submit_code(flow.flow_id, _field(form, "code"))
            except InvalidArgument:
                raise  # the flow is still usable: keep it on the page
            except AuthError:
                await self._sessions.remove_pending(session.key, flow.handle)
                raise
        except AuthError as exc:
            return await self._accounts(session, status=http_status(exc), error=str(exc))
        await self._sessions.remove_pending(session.key, flow.handle)
        return await self._done(session.key, f"Connected {record.account_id} at {record.provider}.")

    async def cancel(self, request: web.Request) -> web.Response:
        session, form = await self._post(request)
        try:
            flow = self._pending(session, _field(form, "flow"))
        except AuthError as exc:
            return await self._accounts(session, status=http_status(exc), error=str(exc))
        await self._sessions.remove_pending(session.key, flow.handle)
        with suppress(NotFound):
            await self._service.cancel_flow(flow.flow_id)
        return await self._done(session.key, f"Cancelled connecting {flow.account_id}.")

    async def disconnect(self, request: web.Request) -> web.Response:
        session, form = await self._post(request)
        account_id = _field(form, "account_id")
        try:
            record = await self._service.disconnect(account_id)
        except AuthError as exc:
            return await self._accounts(session, status=http_status(exc), error=str(exc))
        return await self._done(session.key, f"Disconnected {record.account_id}.")

    # -- gateway keys -------------------------------------------------------

    async def _month_usage(self, now: float) -> dict[str, UsageRecord] | None:
        """This UTC month's usage per key hash, in one GetUsage of the month's days
        (bounded by GetUsage's row limit: None when the month holds more)."""
        days = time.gmtime(now).tm_mday
        try:
            report = await self._service.get_usage(days=days)
        except InvalidArgument:  # more rows than one answer carries
            log.warning("the keys page shows no usage: too many usage records this month")
            return None
        totals: dict[str, UsageRecord] = {}
        for row in report.rows:
            if row.kind == "key":
                totals[row.id] = totals.get(row.id, UsageRecord()) + row.usage
        return totals

    async def _keys(
        self,
        session: Session,
        *,
        page: int = 1,
        status: int = 200,
        values: Mapping[str, str] | None = None,
        error: str | None = None,
    ) -> web.Response:
        now = time.time()
        records, _ = await self._service.list_keys()
        usage = await self._month_usage(now)
        session, flashes = await self._take_flashes(session)
        body = keys_page(
            listing=page_of(records, page),
            usage=usage,
            month=time.strftime("%Y-%m", time.gmtime(now)),
            csrf=session.csrf,
            form_id=secrets.token_urlsafe(24),
            flashes=flashes,
            values=values,
            error=error,
            now=now,
            pools=sorted({r.route.pool for r in records if r.route.pool}),
        )
        return html_response(body, status)

    async def keys(self, request: web.Request) -> web.Response:
        session = await self._viewer(request)
        try:
            page = parse_page(request.query.get("page"))
        except InvalidArgument as exc:
            raise PageError(400, "No such page", str(exc)) from None
        return await self._keys(session, page=page)

    async def create_key(self, request: web.Request) -> web.Response:
        """POST, redirect, GET: this creates the key (once per form) and sends the browser
        to the page that shows it, so a reload there re-sends no form."""
        session, form = await self._post(request)
        form_id = _field(form, "form_id")
        if not FORM_ID.match(form_id):
            raise PageError(400, "Reload the page", _NO_FORM_ID)
        shown = "/keys/created?form=" + form_id
        if not await self._sessions.claim_form(session, form_id):
            # Sent before (a double click, a re-sent POST): the first one's key, if any.
            if await self._sessions.form_result(session, form_id) is None:
                await self._sessions.add_flash(session.key, Flash("error", _FORM_USED))
                raise web.HTTPSeeOther("/keys")
            raise web.HTTPSeeOther(shown)
        values = {name: _field(form, name) for name in FORM_FIELDS}
        try:
            wanted = parse_key_form(values, time.time())
            created = await self._service.create_key(
                wanted.name, wanted.route, wanted.limits, wanted.expires_at
            )
        except AuthError as exc:
            await self._sessions.release_form(session, form_id)
            return await self._keys(session, status=http_status(exc), values=values, error=str(exc))
        key = created.key
        try:
            await self._sessions.settle_form(
                session, form_id, FormResult(key.key_id, key.name), created.secret
            )
        except RedisError as exc:
            log.error(
                "a new gateway key could not be held for showing",
                extra={"key_id": key.key_id, "error": type(exc).__name__},
            )
            text = _NOT_HELD.format(name=key.name, id=key.key_id)
            raise PageError(503, "Key not shown", text) from None
        raise web.HTTPSeeOther(shown)

    async def key_created(self, request: web.Request) -> web.Response:
        """The new key the first time (from the sealed reveal, taken now), then "already
        shown" (410): a reload neither shows it again nor creates another."""
        session = await self._viewer(request)
        form_id = request.query.get("form", "")
        result = None
        if FORM_ID.match(form_id):
            result = await self._sessions.form_result(session, form_id)
        if result is None:
            raise PageError(404, "No new key", _NO_NEW_KEY)
        record = await self._service.get_key(result.key_id)  # before the reveal is taken
        secret = await self._sessions.take_key(session, form_id, result.key_id)
        if secret is None:
            return html_response(key_shown_before_page(record, csrf=session.csrf), 410)
        return html_response(key_created_page(record, secret, csrf=session.csrf))

    async def revoke_confirm(self, request: web.Request) -> web.Response:
        session = await self._viewer(request)
        record = await self._service.get_key(request.query.get("key_id", ""))
        if record.revoked:
            raise PageError(400, "Already revoked", f"Gateway key {record.key_id} is revoked.")
        return html_response(revoke_page(record, csrf=session.csrf))

    async def revoke_key(self, request: web.Request) -> web.Response:
        session, form = await self._post(request)
        version = _field(form, "version")
        try:
            record = await self._service.revoke_key(
                _field(form, "key_id"), int(version) if version.isdigit() else 0
            )
        except AuthError as exc:
            return await self._keys(session, status=http_status(exc), error=str(exc))
        return await self._done(
            session.key, f"Revoked gateway key {record.name} ({record.key_id}).", "/keys"
        )


_CSRF_FAILED = (
    "This form did not come from this page or has expired (CSRF check failed): "
    "reload the page and try again."
)
_NO_FORM_ID = (
    "This form has no valid one-time id (it may come from an older page): reload the "
    "page and fill it in again. No key was created."
)
_FORM_USED = (
    "That form was already sent, and no key was made from it (refused, or still being "
    "made): check the list below before you create the key again."
)
_NOT_HELD = (
    "Gateway key {name} ({id}) was created, but it could not be held for showing (the "
    "store did not answer), so nobody has it: revoke it and create another."
)
_NO_NEW_KEY = (
    "There is no new key to show here: this address belongs to another session, or the "
    "key it showed was created long ago. Keys are shown once, right after they are created."
)
_STATE_UNKNOWN = (
    "state mismatch: this address does not belong to a connection started on this page, "
    "or that connection expired or was already finished; start a new connection"
)


@dataclass
class WebServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stops accepting, lets running requests finish (the runner's shutdown timeout)."""
        await self.runner.cleanup()


async def start_web(
    config: AuthConfig, service: AuthService, client: Redis, *, shutdown_timeout: float = 10.0
) -> WebServer:
    """Serves ``config.web`` on the running loop (port 0 picks a free port; see ``.port``)."""
    assert config.web is not None
    sessions = SessionStore(client, config.key_prefix, config.web.session_ttl_seconds)
    app = WebApp(config, config.web, service, sessions).application()
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=access_log,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    host, port = host_port(config.web.listen)
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound: Sequence[Any] = runner.addresses
    actual = int(bound[0][1]) if bound else port
    log.info("web side listening", extra={"address": config.web.listen, "port": actual})
    return WebServer(runner, actual)
