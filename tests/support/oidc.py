"""A real OAuth 2.0 authorization server for the tests, and a driver for its login pages.

`OidcServer` runs `tests/oidc/server.mjs` (the `oidc-provider` npm package, installed by
`make node`) on 127.0.0.1 with a free port. Two clients are registered:
`keyrelay-public` (no client authentication) and `keyrelay-confidential`
(client_secret_basic). Both use the authorization code grant with PKCE S256 (required)
and get a refresh token on every code exchange, rotated on every refresh. A rotated
refresh token presented again, or a replayed authorization code, revokes the whole grant.

`complete_login` completes the provider's development login and consent pages over HTTP
and returns the redirect to the client (carrying `code`, `state` and `iss`) without
requesting it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

OIDC_DIR = Path(__file__).resolve().parent.parent / "oidc"
SERVER_SCRIPT = OIDC_DIR / "server.mjs"

PUBLIC_CLIENT_ID = "keyrelay-public"
CONFIDENTIAL_CLIENT_ID = "keyrelay-confidential"
DEFAULT_CLIENT_SECRET = "test-secret"
DEFAULT_REDIRECT_URI = "http://127.0.0.1:8765/callback"
DEFAULT_REDIRECT_URIS: tuple[str, ...] = (DEFAULT_REDIRECT_URI,)

FaultMode = Literal[
    "none",
    "status503",
    "html502",
    "hang",
    "reset",
    "delay",
    "delay_response",
    "reset_after",
]

_CONTROL_TIMEOUT = 10.0


class OidcServerError(RuntimeError):
    """The test authorization server could not be started or answered unexpectedly."""


class LoginFlowError(RuntimeError):
    """`complete_login` did not end at the client's redirect URI with a code."""


class OidcServer:
    """A running `tests/oidc/server.mjs`. Use `OidcServer.start()`, then `stop()` (or `with`)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        workdir: Path,
        issuer: str,
        port: int,
        metadata: dict[str, Any],
    ) -> None:
        self._process = process
        self._workdir = workdir
        self._issuer = issuer
        self._port = port
        self._metadata = metadata

    @classmethod
    def start(
        cls,
        *,
        access_token_ttl: int = 3600,
        redirect_uris: Sequence[str] = DEFAULT_REDIRECT_URIS,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        refresh_token_ttl: int = 24 * 60 * 60,
        startup_timeout: float = 20.0,
    ) -> OidcServer:
        """Start a server on a free port and wait until it serves its discovery document."""
        node = shutil.which("node")
        if node is None:
            raise OidcServerError("`node` is not on PATH; the OAuth test server needs Node.js")
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            raise OidcServerError(
                f"oidc-provider is not installed in {OIDC_DIR}; run `make node` "
                "(cd tests/oidc && npm ci)"
            )
        if isinstance(redirect_uris, str):
            raise TypeError("redirect_uris must be a sequence of URIs, not a string")

        env = dict(os.environ)
        env.update(
            {
                "PORT": "0",
                "ACCESS_TOKEN_TTL": str(access_token_ttl),
                "REFRESH_TOKEN_TTL": str(refresh_token_ttl),
                "REDIRECT_URIS": ",".join(redirect_uris),
                "CLIENT_SECRET": client_secret,
                "NO_COLOR": "1",
            }
        )
        env.pop("DEBUG", None)

        # Output goes to files, not pipes: nothing can block on a full pipe, and there is
        # nothing to drain or leak.
        workdir = Path(tempfile.mkdtemp(prefix="keyrelay-oidc-"))
        stdout_path = workdir / "stdout.log"
        stderr_path = workdir / "stderr.log"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [node, str(SERVER_SCRIPT)],
                cwd=OIDC_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

        try:
            ready = _wait_ready(process, stdout_path, stderr_path, startup_timeout)
            issuer = str(ready["issuer"])
            port = int(ready["port"])
            response = httpx.get(
                f"{issuer}/.well-known/openid-configuration", timeout=_CONTROL_TIMEOUT
            )
            response.raise_for_status()
            metadata = response.json()
            if not isinstance(metadata, dict):
                raise OidcServerError("the discovery document is not a JSON object")
        except BaseException:
            _terminate(process)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(process, workdir, issuer, port, metadata)

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        _terminate(self._process)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stderr(self) -> str:
        """What the server wrote to stderr so far (warnings, errors)."""
        return _read_text(self._workdir / "stderr.log")

    # -- endpoints -------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def port(self) -> int:
        return self._port

    @property
    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document."""
        return dict(self._metadata)

    @property
    def authorize_url(self) -> str:
        return self._endpoint("authorization_endpoint")

    @property
    def token_url(self) -> str:
        return self._endpoint("token_endpoint")

    @property
    def revoke_url(self) -> str:
        return self._endpoint("revocation_endpoint")

    @property
    def userinfo_url(self) -> str:
        return self._endpoint("userinfo_endpoint")

    def _endpoint(self, name: str) -> str:
        value = self._metadata.get(name)
        if not isinstance(value, str):
            raise OidcServerError(f"the discovery document has no {name}")
        return value

    # -- test-control API ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of the token endpoint since start or the last `reset_stats()`."""
        return self._control("GET", "/__test/stats")

    def reset_stats(self) -> None:
        self._control("POST", "/__test/stats/reset")

    def set_fault(self, mode: FaultMode, *, delay_ms: int = 0, count: int = -1) -> None:
        """Make the next `count` token-endpoint requests (-1: all, until changed) fail.

        `status503`, `html502`, `hang`, `reset` and `delay` act before the provider sees
        the request; `delay_response` (answer held back `delay_ms`) and `reset_after`
        (connection cut, no answer) act after it has handled it, so a refresh token is
        already rotated or a code already consumed. See tests/oidc/server.mjs.
        """
        self._control("POST", "/__test/fault", {"mode": mode, "delay_ms": delay_ms, "count": count})

    def clear_fault(self) -> None:
        self.set_fault("none")

    def revoke_user(self, sub: str) -> int:
        """Revoke every grant of the user `sub` at the provider; returns how many."""
        body = self._control("POST", "/__test/revoke", {"sub": sub})
        return int(body["revoked"])

    def userinfo(self, access_token: str) -> httpx.Response:
        return httpx.get(
            self.userinfo_url,
            headers={"Authorization": f"Bearer {access_token}"},
            timeout=_CONTROL_TIMEOUT,
        )

    async def token_active(self, access_token: str, client: httpx.AsyncClient) -> bool:
        """Whether the provider accepts ``access_token`` right now (userinfo answers 200)."""
        response = await client.get(
            self.userinfo_url,
            headers={"Authorization": f"Bearer {access_token}"},
            timeout=_CONTROL_TIMEOUT,
        )
        return response.status_code == 200

    def _control(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        response = httpx.request(
            method, f"{self._issuer}{path}", json=body, timeout=_CONTROL_TIMEOUT
        )
        if response.status_code != 200:
            raise OidcServerError(
                f"{method} {path} answered {response.status_code}: {response.text[:500]}"
            )
        result = response.json()
        if not isinstance(result, dict):
            raise OidcServerError(f"{method} {path} did not answer a JSON object")
        return result


def _wait_ready(
    process: subprocess.Popen[bytes], stdout_path: Path, stderr_path: Path, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for line in _read_text(stdout_path).splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("ready") is True:
                return message
        code = process.poll()
        if code is not None:
            raise OidcServerError(
                f"the OAuth test server exited with status {code} before it was ready; "
                f"stderr:\n{_read_text(stderr_path)}"
            )
        if time.monotonic() > deadline:
            raise OidcServerError(
                f"the OAuth test server was not ready after {timeout:.0f} s; "
                f"stderr:\n{_read_text(stderr_path)}"
            )
        time.sleep(0.02)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


# -- the development login and consent pages ---------------------------------------------


class _Form:
    def __init__(self, action: str, method: str) -> None:
        self.action = action
        self.method = method
        self.fields: dict[str, str] = {}


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self._current: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self._current = _Form(attributes.get("action", ""), attributes.get("method", "get"))
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None and attributes.get("name"):
            self._current.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def complete_login(authorize_url: str, *, login: str = "alice", timeout: float = 10.0) -> str:
    """Log in as `login` and consent on the provider's pages, starting at `authorize_url`.

    Returns the URL the provider finally redirects to (the client's redirect_uri with
    `code`, `state` and `iss`) without requesting it. Raises `LoginFlowError` when the
    flow ends anywhere else (an error page, an `error=` redirect, an unexpected page).
    """
    provider_origin = _origin(authorize_url)
    url = authorize_url
    with httpx.Client(follow_redirects=False, timeout=timeout) as client:
        response = client.get(url)
        for _ in range(20):
            if response.is_redirect:
                location = urljoin(url, response.headers["location"])
                if _origin(location) != provider_origin:
                    return _check_final_redirect(location)
                url = location
                response = client.get(url)
                continue
            if response.status_code != 200:
                raise LoginFlowError(
                    f"the login flow ended at {url} with HTTP {response.status_code}: "
                    f"{_snippet(response.text)}"
                )
            form = _prompt_form(response.text)
            if form is None:
                raise LoginFlowError(
                    f"the login flow reached a page without a login/consent form at {url}: "
                    f"{_snippet(response.text)}"
                )
            data = dict(form.fields)
            if data.get("prompt") == "login":
                data["login"] = login
                data["password"] = "any-password"  # devInteractions accept any credentials
            url = urljoin(url, form.action)
            response = client.post(url, data=data)
        raise LoginFlowError(f"the login flow did not finish after 20 steps (last at {url})")


def _prompt_form(html: str) -> _Form | None:
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    for form in parser.forms:
        if form.method.lower() == "post" and form.fields.get("prompt") in ("login", "consent"):
            return form
    return None


def _check_final_redirect(location: str) -> str:
    query = parse_qs(urlsplit(location).query)
    if "error" in query:
        description = query.get("error_description", [""])[0]
        raise LoginFlowError(
            f"the provider redirected with error={query['error'][0]} ({description}): {location}"
        )
    if "code" not in query:
        raise LoginFlowError(f"the provider redirected without a code: {location}")
    return location


def _snippet(text: str) -> str:
    return " ".join(text.split())[:800]


PasteForm = Literal["url", "code#state", "bare"]


def as_pasted(redirect: str, form: PasteForm) -> str:
    """What a person pastes from the provider's redirect, in each form DESIGN §1 accepts."""
    if form == "url":
        return redirect
    query = parse_qs(urlsplit(redirect).query)
    code = query["code"][0]
    return f"{code}#{query['state'][0]}" if form == "code#state" else code
