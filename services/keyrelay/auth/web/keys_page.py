"""The web page's gateway keys (issue 11): the list (a page of it), the create form, the
key shown once, the revoke confirmation. Pure functions, no I/O, escaping as in ``pages``.

The list is newest first, ``PAGE_SIZE`` keys a page, ``/keys?page=N`` (1-based):
:func:`parse_page` refuses what the page's links never send (``InvalidArgument``),
and :func:`page_of` shows the last page for a number past it (keys were revoked
meanwhile, or the number is huge).

:func:`parse_key_form` turns the create form into what ``AuthService.create_key``
takes; what it cannot read (a limit that is not a whole number, say) is an
``InvalidArgument`` naming the field the way the service names it, so the page
shows every refusal the same way: a message above the form, the field marked,
the values kept. A key routes to an account or, chosen under "Route to", to a pool of
the gateways' config (``route.pool``): the form sends what was typed, and the service
checks it (``gateway_keys.validate_route``: the pool's name, and never both).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.gateway_keys import (
    LIMIT_FIELDS,
    POOL_MODE,
    KeyRecord,
    Route,
    limits_from,
)
from keyrelay.auth.web.pages import Flash, Html, flash_list, join, page, render, when
from keyrelay.limit_rules import BUDGET_PERIODS, BUDGET_UNITS, Limits
from keyrelay.usage_layout import UsageRecord

__all__ = [
    "FORM_FIELDS",
    "PAGE_SIZE",
    "ROUTE_CHOICES",
    "KeyForm",
    "KeysPage",
    "field_of",
    "key_created_page",
    "key_shown_before_page",
    "keys_page",
    "limits_in_words",
    "page_of",
    "parse_key_form",
    "parse_page",
    "revoke_page",
]

PAGE_SIZE: Final = 50
_DIGITS = re.compile(r"^[0-9]+\Z")
_HUGE_PAGE: Final = 10**18  # more digits are not parsed: past the last page anyway
DAY_SECONDS = 86_400
MAX_EXPIRY_DAYS = 36_500  # a hundred years: "never" is the empty field
_NONE = Html("&ndash;")
ROUTE_CHOICES: Final = ("account", "pool")  # the form's "Route to"; absent: account

# The create form's fields, each with its label and where the service's messages name it.
FORM_FIELDS: Mapping[str, tuple[str, str]] = {
    "name": ("Name", "name"),
    "route": ("Route to", "route.mode"),
    "account_id": ("Account", "route.account_id"),
    "pool": ("Pool", "route.pool"),
    "requests_per_minute": ("Requests/min", "limits.requests_per_minute"),
    "tokens_per_minute": ("Tokens/min", "limits.tokens_per_minute"),
    "concurrent_requests": ("Concurrent", "limits.concurrent_requests"),
    "budget_amount": ("Budget", "limits.budget.amount"),
    "budget_unit": ("Budget unit", "limits.budget.unit"),
    "budget_period": ("Budget period", "limits.budget.period"),
    "expires_days": ("Expires in (days)", "expires_at"),
}


@dataclass(frozen=True, slots=True)
class KeyForm:
    """What the create form asks for, as the service takes it."""

    name: str
    route: Route
    limits: Limits
    expires_at: int


def _whole(values: Mapping[str, str], field: str) -> int | None:
    text = values.get(field, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(
            f"{FORM_FIELDS[field][1]} must be a whole number (got {text[:32]!r}); "
            "leave it empty for no limit"
        ) from None


def parse_key_form(values: Mapping[str, str], now: float) -> KeyForm:
    """The form's values (stripped strings) as ``create_key``'s arguments.

    Empty limits are unset; a budget is set by its amount (unit and period then
    apply); an empty expiry is "never". The limits are checked here, by the rules
    ``CreateKey`` applies (``limits_from``: the same messages); the name, route and
    expiry's ranges are the service's to check (``validate_route`` for the pool)."""
    route = _route(values)
    limits: dict[str, object] = {field: _whole(values, field) for field in LIMIT_FIELDS}
    amount_text = values.get("budget_amount", "")
    if amount_text:
        try:
            amount = float(amount_text)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount):
            raise InvalidArgument(
                f"limits.budget.amount must be a number (got {amount_text[:32]!r}); "
                "leave it empty for no budget"
            )
        limits["budget"] = {
            "amount": amount,
            "unit": values.get("budget_unit", ""),
            "period": values.get("budget_period", ""),
        }
    checked = limits_from(limits)
    days = _whole(values, "expires_days")
    if days is not None and not 1 <= days <= MAX_EXPIRY_DAYS:
        raise InvalidArgument(
            f"expires_at: the expiry must be 1 to {MAX_EXPIRY_DAYS} days (got {days}); "
            "leave it empty for a key that never expires"
        )
    return KeyForm(
        name=values.get("name", ""),
        route=route,
        limits=checked,
        expires_at=0 if days is None else int(now) + days * DAY_SECONDS,
    )


def _route(values: Mapping[str, str]) -> Route:
    """The route as typed, for the service to check. "Route to" a pool: mode ``pool`` and
    the pool, with an account typed too (refused: not both); an empty pool is refused as
    "mode 'pool' needs route.pool". To an account: the account (mode: the service's
    default, oauth); a pool typed beside it is refused here, in the words of that
    choice; without an account, the account is what is missing, so a pool typed
    alone does not make this a pool key."""
    choice = values.get("route", "") or ROUTE_CHOICES[0]
    if choice not in ROUTE_CHOICES:
        raise InvalidArgument(
            f"route.mode: the form routes a key to an account or a pool (got {choice[:32]!r}); "
            "reload the page"
        )
    account, pool = values.get("account_id", ""), values.get("pool", "")
    if choice == "pool":
        return Route(account_id=account, mode=POOL_MODE, pool=pool)
    if account and pool.strip():
        raise InvalidArgument(
            "route.pool: this key routes to an account, so it names no pool: leave Pool "
            'empty (or choose "a pool" and leave Account empty)'
        )
    return Route(account_id=account, mode="")


@dataclass(frozen=True, slots=True)
class KeysPage:
    """One page of the list: its keys, its number (1-based) and how many there are."""

    records: Sequence[KeyRecord]
    number: int
    pages: int
    total: int


def parse_page(text: str | None) -> int:
    """``?page=``: absent or empty is 1; a whole number from 1 (ASCII digits only),
    however large (``page_of`` keeps it to the last page); anything else (a sign, a
    fraction, a word) is ``InvalidArgument``."""
    if not text:
        return 1
    digits = text.lstrip("0")
    if not _DIGITS.match(text) or not digits:
        raise InvalidArgument(
            f"page must be a whole number from 1, as the page's links have it (got {text[:32]!r})"
        )
    return int(digits) if len(digits) < len(str(_HUGE_PAGE)) else _HUGE_PAGE


def page_of(records: Sequence[KeyRecord], number: int, size: int = PAGE_SIZE) -> KeysPage:
    """Page ``number`` of ``records`` (oldest first, as ``ListKeys`` has them), newest
    first; past the last page: the last page."""
    pages = max(1, -(-len(records) // size))
    number = min(max(number, 1), pages)
    newest_first = records[::-1]
    start = (number - 1) * size
    return KeysPage(newest_first[start : start + size], number, pages, len(records))


def field_of(message: str) -> str:
    """The form field a service message is about ("" if none): the longest match wins."""
    found = ""
    for field, (_, named) in FORM_FIELDS.items():
        if message.startswith(named) and len(named) > len(FORM_FIELDS.get(found, ("", ""))[1]):
            found = field
    return found


def limits_in_words(limits: Limits) -> str:
    parts = []
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute:,} requests/min")
    if limits.tokens_per_minute is not None:
        parts.append(f"{limits.tokens_per_minute:,} tokens/min")
    if limits.concurrent_requests is not None:
        parts.append(f"{limits.concurrent_requests:,} concurrent")
    budget = limits.budget
    if budget is not None:
        parts.append(f"budget {budget.shown(budget.amount)} a {budget.period}")
    return ", ".join(parts) or "no limits"


def _usage_cells(record: KeyRecord, usage: Mapping[str, UsageRecord] | None) -> Html:
    """This month's requests, tokens and cost of the key, or why there are none."""
    found = None if usage is None else usage.get(record.key_sha256)
    if found is None and usage is not None and not record.limits.unlimited:
        found = UsageRecord()  # limited, and nothing recorded this month yet
    if found is None:
        why = "not available" if usage is None else "not recorded (no limits)"
        return render('<td colspan="3" class="muted">$why</td>', why=why)
    return render(
        '<td class="num">$requests</td><td class="num">$tokens</td><td class="num">$cost</td>',
        requests=f"{found.requests:,}",
        tokens=f"{found.tokens:,}",
        cost=f"${found.cost_usd:,.4f}",
    )


def _key_row(record: KeyRecord, usage: Mapping[str, UsageRecord] | None, now: float) -> Html:
    pool = f"pool {record.route.pool}" if record.route.pool else ""  # instead of an account
    return render(
        '<tr data-key="$id"><td><code>$id</code></td><td><strong>$name</strong></td>'
        '<td>$account <span class="muted">$mode · $profile · $upstream</span></td>'
        "<td>$limits</td><td>$expires</td>$usage"
        '<td><a href="/keys/revoke?key_id=$id" aria-label="Revoke $name">Revoke…</a></td></tr>',
        id=record.key_id,
        name=record.name,
        account=record.route.account_id or pool or _NONE,
        mode=record.route.mode,
        profile=record.route.profile,
        upstream=record.route.upstream,
        limits=limits_in_words(record.limits),
        expires=when(record.expires_at, now) if record.expires_at else "never",
        usage=_usage_cells(record, usage),
    )


def _keys_table(listing: KeysPage, usage: Mapping[str, UsageRecord] | None, now: float) -> Html:
    if not listing.total:
        return Html('<p class="muted">No gateway key has been created here yet.</p>')
    rows = join(_key_row(r, usage, now) for r in listing.records)
    return render(
        '<table id="keys"><thead><tr><th>Id</th><th>Name</th><th>Route</th><th>Limits</th>'
        "<th>Expires</th><th>Requests</th><th>Tokens</th><th>Cost</th><th></th></tr></thead>"
        "<tbody>$rows</tbody></table>$pager",
        rows=rows,
        pager=_pager(listing),
    )


def _pager(listing: KeysPage) -> Html:
    """Previous/next links and where this page is (nothing when one page holds them all)."""
    if listing.pages == 1:
        return Html("")
    number = listing.number
    previous = (
        render('<a href="/keys?page=$n" rel="prev">&larr; Previous</a>', n=number - 1)
        if number > 1
        else Html("")
    )
    following = (
        render('<a href="/keys?page=$n" rel="next">Next &rarr;</a>', n=number + 1)
        if number < listing.pages
        else Html("")
    )
    first = (number - 1) * PAGE_SIZE + 1
    return render(
        '<nav class="pager" aria-label="Pages of keys"><p>$previous '
        '<span id="page-of">Page $number of $pages</span> '
        '<span class="muted">(keys $first&ndash;$last of $total, newest first)</span> '
        "$following</p></nav>",
        previous=previous,
        following=following,
        number=number,
        pages=listing.pages,
        first=first,
        last=first + len(listing.records) - 1,
        total=f"{listing.total:,}",
    )


def _input(field: str, values: Mapping[str, str], invalid: str, **attributes: str) -> Html:
    label = FORM_FIELDS[field][0]
    extra = join(render(' $k="$v"', k=k.replace("_", "-"), v=v) for k, v in attributes.items())
    return render(
        '<label>$label <input name="$field" value="$value"$extra$invalid></label>',
        label=label,
        field=field,
        value=values.get(field, ""),
        extra=extra,
        invalid=Html(' aria-invalid="true" autofocus') if field == invalid else Html(""),
    )


def _select(field: str, options: Sequence[str], values: Mapping[str, str], invalid: str) -> Html:
    chosen = values.get(field) or options[0]
    return render(
        '<label>$label <select name="$field"$invalid>$options</select></label>',
        label=FORM_FIELDS[field][0],
        field=field,
        invalid=Html(' aria-invalid="true"') if field == invalid else Html(""),
        options=join(
            render(
                '<option value="$o"$selected>$o</option>',
                o=o,
                selected=Html(" selected") if o == chosen else Html(""),
            )
            for o in options
        ),
    )


def _route_choice(values: Mapping[str, str], invalid: str) -> Html:
    """The "Route to" choice: an account or a pool. Its label is its own (``for``), so no
    other field's label holds its options' words."""
    chosen = values.get("route") or ROUTE_CHOICES[0]
    words = {"account": "an account", "pool": "a pool"}
    return render(
        '<label for="route">$label</label> <select id="route" name="route"$invalid>'
        "$options</select>",
        label=FORM_FIELDS["route"][0],
        invalid=Html(' aria-invalid="true" autofocus') if invalid == "route" else Html(""),
        options=join(
            render(
                '<option value="$o"$selected>$words</option>',
                o=o,
                words=words[o],
                selected=Html(" selected") if o == chosen else Html(""),
            )
            for o in ROUTE_CHOICES
        ),
    )


def _pool_names(pools: Sequence[str]) -> Html:
    """The pools live keys name, to pick from (the gateways' config has the pools; this
    service knows only the names keys use)."""
    return render(
        '<datalist id="pool-names">$options</datalist>',
        options=join(render('<option value="$p">', p=p) for p in pools),
    )


def _create_form(
    csrf: str, form_id: str, values: Mapping[str, str], invalid: str, pools: Sequence[str]
) -> Html:
    number = {"inputmode": "numeric", "size": "8"}
    return render(
        '<form method="post" action="/keys" id="create-key">'
        '<input type="hidden" name="csrf" value="$csrf">'
        '<input type="hidden" name="form_id" value="$form_id" autocomplete="off">'
        "<p>$name</p><p>$route $account $pool$pool_names</p>"
        "<p>$rpm $tpm $concurrent</p><p>$budget $unit $period</p>"
        '<p>$expires <button type="submit">Create key</button></p></form>'
        '<p class="muted">Route to an account: the key uses its OAuth token (mode oauth). '
        "Route to a pool: the key uses the members of the gateways' "
        "<code>[pools.NAME]</code> (a gateway without that pool refuses the key). A key names "
        "an account or a pool, not both. Profile and upstream are <code>default</code>; "
        "<code>keyrelay keys new</code> sets the others. Empty limits mean no limit; usage is "
        "recorded only for keys with a limit.</p>",
        csrf=csrf,
        form_id=form_id,
        name=_input("name", values, invalid, required="", maxlength="64", size="20"),
        route=_route_choice(values, invalid),
        account=_input("account_id", values, invalid, maxlength="128", size="20"),
        pool=_input("pool", values, invalid, maxlength="64", size="16", list="pool-names"),
        pool_names=_pool_names(pools),
        rpm=_input("requests_per_minute", values, invalid, **number),
        tpm=_input("tokens_per_minute", values, invalid, **number),
        concurrent=_input("concurrent_requests", values, invalid, **number),
        budget=_input("budget_amount", values, invalid, inputmode="decimal", size="8"),
        unit=_select("budget_unit", BUDGET_UNITS, values, invalid),
        period=_select("budget_period", BUDGET_PERIODS[::-1], values, invalid),
        expires=_input("expires_days", values, invalid, **number),
    )


def keys_page(
    *,
    listing: KeysPage,
    usage: Mapping[str, UsageRecord] | None,
    month: str,
    csrf: str,
    form_id: str,
    flashes: Sequence[Flash] = (),
    values: Mapping[str, str] | None = None,
    error: str | None = None,
    now: float | None = None,
    pools: Sequence[str] = (),
) -> Html:
    """A page of the list, and the create form. ``usage``: this month's per key hash
    (None: not available); ``form_id``: the form's one-time id (a second submission of
    it creates nothing); ``values``/``error``: a refused form shown again with its
    message; ``pools``: pool names to offer (those live keys name)."""
    now = time.time() if now is None else now
    form_flashes = flash_list([Flash("error", error)]) if error else Html("")
    note = (
        render(
            '<p class="muted">Usage: $month (UTC), as the gateways recorded it.</p>', month=month
        )
        if usage is not None
        else Html(
            '<p class="flash error">This month\'s usage is too large to show here: '
            "<code>keyrelay usage</code> has it per key.</p>"
        )
    )
    body = render(
        '<p><a href="/">&larr; Accounts</a> · <a href="/usage">Usage, last 30 days</a></p>'
        "$flashes<section><h2>Create a gateway key</h2>$form_flashes$form</section>"
        "<section><h2>Gateway keys</h2>$note$table</section>",
        flashes=flash_list(flashes),
        form_flashes=form_flashes,
        form=_create_form(csrf, form_id, values or {}, field_of(error or ""), pools),
        note=note,
        table=_keys_table(listing, usage, now),
    )
    return page("Gateway keys", body, csrf=csrf)


def key_created_page(record: KeyRecord, secret: str, *, csrf: str) -> Html:
    """The one page that ever shows the key: the first view of ``/keys/created`` after
    the create POST (which redirects there; a reload gets ``key_shown_before_page``)."""
    body = render(
        '<div class="flash ok" role="status">Created gateway key $name ($id).</div>'
        '<section><h2>The key, shown once</h2><p><code id="new-key">$secret</code></p>'
        "<p>Copy it now: this page is the only time it is shown. keyrelay keeps only its "
        "SHA-256, and reloading this page does not show it again.</p>"
        "<p>Limits: $limits.</p>"
        '<p><a href="/keys">Done: back to the gateway keys</a></p></section>',
        name=record.name,
        id=record.key_id,
        secret=secret,
        limits=limits_in_words(record.limits),
    )
    return page("Key created", body, csrf=csrf)


def key_shown_before_page(record: KeyRecord, *, csrf: str) -> Html:
    """``/keys/created`` once the key was shown (or its few minutes to be shown passed)."""
    body = render(
        "<section><h2>Already shown</h2><p>Gateway key <strong>$name</strong> (<code>$id"
        "</code>) was shown once, right after it was created (or the few minutes to show "
        "it passed), and cannot be shown again: keyrelay keeps only its SHA-256. No new "
        "key was created.</p>"
        "<p>If you did not copy it, revoke it and create another.</p>"
        '<p><a href="/keys">Back to the gateway keys</a>$revoke</p></section>',
        name=record.name,
        id=record.key_id,
        revoke=Html("")
        if record.revoked
        else render(
            ' · <a href="/keys/revoke?key_id=$id">Revoke $name…</a>',
            id=record.key_id,
            name=record.name,
        ),
    )
    return page("Key already shown", body, csrf=csrf)


def revoke_page(record: KeyRecord, *, csrf: str) -> Html:
    """The confirmation step: what revoking stops, and the one button that does it."""
    body = render(
        "<section><h2>Revoke $name?</h2><p>Key <code>$id</code> ($limits) will get 401 on "
        "every gateway within about a second. This cannot be undone: a revoked key stays "
        "revoked; create a new one to replace it.</p>"
        '<form method="post" action="/keys/revoke"><input type="hidden" name="csrf" '
        'value="$csrf"><input type="hidden" name="key_id" value="$id">'
        '<input type="hidden" name="version" value="$version">'
        '<button class="danger" type="submit">Revoke $name</button> '
        '<a href="/keys">Cancel</a></form></section>',
        name=record.name,
        id=record.key_id,
        limits=limits_in_words(record.limits),
        csrf=csrf,
        version=record.version,
    )
    return page("Revoke key", body, csrf=csrf)
