"""Server-rendered HTML of the web connect page: no JavaScript, no template engine.

Escaping is the default, not something to remember: :func:`render` substitutes
``$name`` placeholders of a ``string.Template`` and HTML-escapes every value
(quotes too, so values are safe inside attributes) unless it is already
:class:`Html`, markup built by this module. Account ids, provider names,
provider error texts and pasted input can therefore never become markup.

Pure functions: no I/O. They get what to show (records, flashes, pending flows)
and return ``Html``; they never see a token.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from string import Template
from typing import Literal

from keyrelay.auth.store.redis_store import AccountRecord

__all__ = [
    "Flash",
    "Html",
    "PendingView",
    "UsageDay",
    "accounts_page",
    "callback_done_page",
    "esc",
    "flash_list",
    "join",
    "login_page",
    "message_page",
    "page",
    "render",
    "usage_chart",
    "usage_page",
    "when",
]


class Html(str):
    """Markup that is already safe: inserted as it is."""

    __slots__ = ()


def esc(value: object) -> Html:
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def render(template: str, **values: object) -> Html:
    return Html(Template(template).substitute({k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Html]) -> Html:
    return Html("".join(parts))


FlashKind = Literal["ok", "error"]
_NONE = Html("&ndash;")


@dataclass(frozen=True, slots=True)
class Flash:
    kind: FlashKind
    text: str


@dataclass(frozen=True, slots=True)
class PendingView:
    """A flow this browser session started and has not finished."""

    handle: str
    account_id: str
    provider: str
    authorize_url: str
    expires_at: float
    via_callback: bool


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1c1e21;background:#f5f6f8}
header{background:#1f2937;color:#fff;padding:.7em 1.5em;display:flex;align-items:center;
 justify-content:space-between}
header h1{font-size:1.1em;margin:0}
main{max-width:1100px;margin:1.5em auto;padding:0 1.5em}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:1em 1.2em;
 margin-bottom:1.2em}
h2{font-size:1.05em;margin:0 0 .7em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.45em .6em;border-bottom:1px solid #eceef1;vertical-align:top}
th{font-size:.8em;text-transform:uppercase;color:#5f6b7a}
.status{font-weight:600;font-size:.8em;padding:.15em .5em;border-radius:4px}
.CONNECTED{background:#dcfce7;color:#166534}.DISCONNECTED{background:#e5e7eb;color:#374151}
.flash{padding:.7em 1em;border-radius:6px;margin-bottom:1em;border:1px solid}
.flash.ok{background:#ecfdf5;border-color:#a7f3d0}
.flash.error{background:#fef2f2;border-color:#fecaca;color:#991b1b}
form.inline{display:inline}
input,select,button{font:inherit;padding:.35em .55em;border:1px solid #c4cad3;border-radius:4px}
button{background:#2563eb;color:#fff;border-color:#2563eb;cursor:pointer}
button.secondary{background:#fff;color:#1f2937;border-color:#c4cad3}
button.danger{background:#fff;color:#b91c1c;border-color:#fca5a5}
label{margin-right:.8em}
.muted{color:#6b7280;font-size:.9em}
.paste input[type=text]{width:28em}
code{font-size:.9em}
td strong{white-space:nowrap}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
$refresh<title>$title · keyrelay</title><style>$css</style></head>
<body><header><h1>keyrelay · accounts</h1>$logout</header>
<main>$body</main></body></html>
"""


def page(title: str, body: Html, *, csrf: str | None = None, refresh_to: str | None = None) -> Html:
    """The whole document; with ``csrf`` (a logged-in session) a logout button."""
    logout = Html("")
    if csrf is not None:
        logout = render(
            '<form class="inline" method="post" action="/logout">'
            '<input type="hidden" name="csrf" value="$csrf">'
            '<button class="secondary" type="submit">Log out</button></form>',
            csrf=csrf,
        )
    refresh = Html("")
    if refresh_to is not None:
        refresh = render('<meta http-equiv="refresh" content="0;url=$to">\n', to=refresh_to)
    return render(_PAGE, title=title, css=Html(_CSS), body=body, logout=logout, refresh=refresh)


def flash_list(flashes: Sequence[Flash]) -> Html:
    return join(
        render('<div class="flash $kind" role="status">$text</div>', kind=f.kind, text=f.text)
        for f in flashes
    )


def when(ts: float, now: float) -> Html:
    if not ts:
        return Html("&ndash;")
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    left = int(ts - now)
    if left < 0:
        rel = "expired"
    elif left < 120:
        rel = f"in {left} s"
    elif left < 7200:
        rel = f"in {left // 60} min"
    else:
        rel = f"in {left // 3600} h"
    return render('$stamp <span class="muted">($rel)</span>', stamp=stamp, rel=rel)


def login_page(login_csrf: str, *, error: str | None = None) -> Html:
    flashes = [Flash("error", error)] if error else []
    body = render(
        """$flashes<section><h2>Log in</h2>
<p class="muted">Use an admin service token of this auth service
(an <code>admin</code> entry of <code>[[auth.callers]]</code>).</p>
<form method="post" action="/login">
<input type="hidden" name="csrf" value="$csrf">
<label>Admin token <input type="password" name="token" autocomplete="off" required
 autofocus size="40"></label>
<button type="submit">Log in</button></form></section>""",
        flashes=flash_list(flashes),
        csrf=login_csrf,
    )
    return page("Log in", body)


def _account_row(record: AccountRecord, csrf: str, now: float) -> Html:
    status = "CONNECTED" if record.connected else "DISCONNECTED"
    note = record.last_error if record.connected else record.disconnect_reason
    if record.connected:
        action = render(
            '<form class="inline" method="post" action="/disconnect">'
            '<input type="hidden" name="csrf" value="$csrf">'
            '<input type="hidden" name="account_id" value="$account">'
            '<button class="danger" type="submit" aria-label="Disconnect $account">'
            "Disconnect</button></form>",
            csrf=csrf,
            account=record.account_id,
        )
    else:
        action = Html("")
    return render(
        '<tr data-account="$account"><td><strong>$account</strong></td>'
        '<td><span class="status $status">$status</span></td><td>$provider</td>'
        "<td>$scopes</td><td>$expires</td><td>$generation</td><td>$note</td>"
        "<td>$action</td></tr>",
        account=record.account_id,
        status=status,
        provider=record.provider,
        scopes=" ".join(record.scopes) or _NONE,
        expires=when(record.expires_at if record.connected else 0, now),
        generation=record.generation,
        note=note or _NONE,
        action=action,
    )


def _accounts_table(records: Sequence[AccountRecord], csrf: str, now: float) -> Html:
    if not records:
        return Html('<p class="muted">No account has been connected yet.</p>')
    rows = join(_account_row(r, csrf, now) for r in sorted(records, key=lambda r: r.account_id))
    return render(
        '<table id="accounts"><thead><tr><th>Account</th><th>Status</th><th>Provider</th>'
        "<th>Scopes</th><th>Token expires</th><th>Generation</th>"
        "<th>Last error / disconnect reason</th><th></th></tr></thead>"
        "<tbody>$rows</tbody></table>",
        rows=rows,
    )


def _pending_table(pending: Sequence[PendingView], csrf: str, now: float) -> Html:
    if not pending:
        return Html("")
    rows = []
    for flow in pending:
        hint = (
            "the provider sends you back here"
            if flow.via_callback
            else "the provider shows a code or sends you to another address"
        )
        rows.append(
            render(
                '<tr data-pending="$account"><td><strong>$account</strong></td><td>$provider</td>'
                "<td>$expires</td>"
                '<td><a href="$url" rel="noreferrer">Open the provider\'s page</a>'
                '<div class="muted">$hint</div></td>'
                '<td><form class="paste" method="post" action="/paste">'
                '<input type="hidden" name="csrf" value="$csrf">'
                '<input type="hidden" name="flow" value="$handle">'
                '<input type="text" name="code" autocomplete="off" required '
                'aria-label="Code for $account" '
                'placeholder="code, code#state, or the whole redirect address">'
                ' <button type="submit">Submit code</button></form>'
                '<form class="inline" method="post" action="/cancel">'
                '<input type="hidden" name="csrf" value="$csrf">'
                '<input type="hidden" name="flow" value="$handle">'
                '<button class="secondary" type="submit">Cancel</button></form></td></tr>',
                account=flow.account_id,
                provider=flow.provider,
                expires=when(flow.expires_at, now),
                url=flow.authorize_url,
                hint=hint,
                csrf=csrf,
                handle=flow.handle,
            )
        )
    return render(
        '<section><h2>Connections waiting for a code</h2><table id="pending"><thead><tr>'
        "<th>Account</th><th>Provider</th><th>Flow expires</th><th>Step 1: approve</th>"
        "<th>Step 2: paste what the provider gave you</th></tr></thead>"
        "<tbody>$rows</tbody></table></section>",
        rows=join(rows),
    )


def _connect_form(providers: Mapping[str, bool], csrf: str, account_id: str, provider: str) -> Html:
    if not providers:
        return Html(
            '<p class="muted">No provider is configured: add a <code>[providers.NAME]</code> '
            "table to the auth service's config.</p>"
        )
    if provider not in providers:  # preselect one that redirects back here, if any
        provider = min(providers, key=lambda name: (not providers[name], name))
    options = join(
        render(
            '<option value="$name"$selected>$label</option>',
            name=name,
            selected=Html(" selected") if name == provider else Html(""),
            label=name if callback else f"{name} (paste the code)",
        )
        for name, callback in sorted(providers.items())
    )
    return render(
        '<form method="post" action="/connect"><input type="hidden" name="csrf" value="$csrf">'
        '<label>Account id <input type="text" name="account_id" value="$account" required '
        'maxlength="128" pattern="[A-Za-z0-9][A-Za-z0-9._@+\\-]*" size="24"></label>'
        '<label>Provider <select name="provider">$options</select></label>'
        '<button type="submit">Connect</button></form>'
        '<p class="muted">Account ids: 1 to 128 of letters, digits and <code>._@+-</code>.</p>',
        csrf=csrf,
        account=account_id,
        options=options,
    )


def accounts_page(
    *,
    records: Sequence[AccountRecord],
    pending: Sequence[PendingView],
    providers: Mapping[str, bool],
    csrf: str,
    flashes: Sequence[Flash] = (),
    account_id: str = "",
    provider: str = "",
    now: float | None = None,
) -> Html:
    """The main page. ``providers`` maps each name to whether it redirects back here."""
    now = time.time() if now is None else now
    body = render(
        "$flashes<section><h2>Connect an account</h2>$connect</section>$pending"
        "<section><h2>Accounts</h2>$accounts</section>"
        '<p><a href="/keys">Gateway keys</a> · <a href="/usage">Usage, last 30 days</a></p>',
        flashes=flash_list(flashes),
        connect=_connect_form(providers, csrf, account_id, provider),
        pending=_pending_table(pending, csrf, now),
        accounts=_accounts_table(records, csrf, now),
    )
    return page("Accounts", body, csrf=csrf)


def message_page(title: str, text: str, *, kind: FlashKind = "error") -> Html:
    """A page with one message and the way back (errors outside the account list)."""
    body = render(
        '$flash<p><a href="/">Back to the accounts</a></p>',
        flash=flash_list([Flash(kind, text)]),
    )
    return page(title, body)


def callback_done_page(text: str) -> Html:
    """After the provider's redirect, when the browser did not send the session cookie.

    The session cookie is ``SameSite=Strict``, so a browser leaves it off the
    redirect chain that started at the provider's site; a navigation this page
    starts itself is same-site and carries it.
    """
    body = render(
        '$flash<p><a href="/">Continue to the accounts</a></p>',
        flash=flash_list([Flash("ok", text)]),
    )
    return page("Connected", body, refresh_to="/")


# -- usage ------------------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT, CHART_TOP, CHART_BOTTOM = 720, 180, 16, 28


@dataclass(frozen=True, slots=True)
class UsageDay:
    """One day of the chart: the keys' usage that day (every recorded request is
    recorded under its key; accounts would count it again)."""

    day: str
    requests: int
    tokens: int
    cost_usd: float


def usage_chart(days: Sequence[UsageDay], metric: Literal["cost", "tokens"]) -> Html:
    """An inline SVG bar chart of ``metric`` per day (no script, no external file)."""
    values = [d.cost_usd if metric == "cost" else float(d.tokens) for d in days]
    top = max(values, default=0.0) or 1.0
    slot = CHART_WIDTH / max(len(days), 1)
    plot = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    bars = []
    for i, (day, value) in enumerate(zip(days, values, strict=True)):
        height = plot * value / top
        shown = f"${value:,.4f}" if metric == "cost" else f"{int(value):,} tokens"
        bars.append(
            render(
                '<rect x="$x" y="$y" width="$w" height="$h" fill="#2563eb">'
                "<title>$day: $shown, $requests requests</title></rect>",
                x=f"{i * slot + 1:.1f}",
                y=f"{CHART_TOP + plot - height:.1f}",
                w=f"{max(slot - 2, 1):.1f}",
                h=f"{height:.1f}",
                day=day.day,
                shown=shown,
                requests=f"{day.requests:,}",
            )
        )
    peak = f"${top:,.4f}" if metric == "cost" else f"{int(top):,} tokens"
    labels = [
        render(
            '<text x="$x" y="$y" font-size="11" fill="#6b7280" text-anchor="$anchor">$text</text>',
            x=f"{x:.1f}",
            y=CHART_HEIGHT - 8,
            anchor=anchor,
            text=text,
        )
        for x, anchor, text in (
            (0, "start", days[0].day if days else ""),
            (CHART_WIDTH, "end", days[-1].day if days else ""),
        )
    ]
    return render(
        '<svg xmlns="http://www.w3.org/2000/svg" width="$w" height="$h" viewBox="0 0 $w $h" '
        'role="img" aria-label="$what per day"><title>$what per day (peak $peak)</title>'
        '<line x1="0" y1="$base" x2="$w" y2="$base" stroke="#c4cad3"/>'
        '<text x="0" y="11" font-size="11" fill="#6b7280">$peak</text>$bars$labels</svg>',
        w=CHART_WIDTH,
        h=CHART_HEIGHT,
        base=CHART_HEIGHT - CHART_BOTTOM,
        what="Cost (USD)" if metric == "cost" else "Tokens",
        peak=peak,
        bars=join(bars),
        labels=join(labels),
    )


def usage_page(days: Sequence[UsageDay], metric: Literal["cost", "tokens"], *, csrf: str) -> Html:
    total = UsageDay(
        "",
        sum(d.requests for d in days),
        sum(d.tokens for d in days),
        sum(d.cost_usd for d in days),
    )
    other = "tokens" if metric == "cost" else "cost"
    body = render(
        """<p><a href="/">&larr; Accounts</a> · <a href="/keys">Gateway keys</a></p>
<section><h2>Usage, last $count days (UTC)</h2>
<p class="muted">Recorded by the gateways for keys and accounts with limits.
Showing $metric; <a href="/usage?metric=$other">show $other</a>.
<code>keyrelay usage</code> has it per key and account.</p>
$chart
<p>Total: $requests requests, $tokens tokens, $cost.</p></section>""",
        count=len(days),
        metric=metric,
        other=other,
        chart=usage_chart(days, metric),
        requests=f"{total.requests:,}",
        tokens=f"{total.tokens:,}",
        cost=f"${total.cost_usd:,.4f}",
    )
    return page("Usage", body, csrf=csrf)
