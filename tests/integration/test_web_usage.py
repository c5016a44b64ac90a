"""The web page's usage chart (issue 11 item 4): server-rendered SVG, behind the login."""

from __future__ import annotations

import re

from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.keys import key_hash, new_key
from keyrelay.gateway.limits_store import LimitsStore
from tests.integration.test_usage import account_subject, key_subject, limits, record, today
from tests.integration.test_web import anonymous
from tests.support.web import WebAdmin

__all__ = ["anonymous", "limits"]  # fixtures, shared with test_web and test_usage


async def test_the_usage_page_charts_the_last_30_days(
    anonymous: WebAdmin, limits: LimitsStore
) -> None:
    admin = anonymous
    refused = await admin.get("/usage")
    assert refused.status_code == 303
    assert refused.headers["location"] == "/login"

    assert (await admin.login()).status_code == 303
    assert "/usage" in await admin.page()  # linked from the accounts page
    sha = key_hash(new_key())
    both = (key_subject(sha), account_subject("web"))
    await record(limits, both, usage=Usage(1000, 500, 0, 0), cost=0.5)
    await record(limits, both, days_ago=2, usage=Usage(100, 50, 0, 0), cost=0.25)
    await record(limits, both, days_ago=31, cost=9.0)  # outside the chart

    page = await admin.get("/usage")
    assert page.status_code == 200
    assert "script" not in page.headers["content-security-policy"]
    svg = re.search(r"<svg .*?</svg>", page.text, re.S)
    assert svg is not None
    bars = re.findall(r'<rect [^>]*height="([\d.]+)"[^>]*><title>([^<]*)</title>', svg[0])
    assert len(bars) == 30
    assert bars[-1][1] == f"{today()}: $0.5000, 1 requests"  # the key only, not its account
    assert bars[-3][1] == f"{today(2)}: $0.2500, 1 requests"
    heights = [float(h) for h, _ in bars]
    assert heights[-1] == max(heights) == 2 * heights[-3]
    assert sum(1 for h in heights if h) == 2
    assert "Total: 2 requests, 1,650 tokens, $0.7500." in page.text

    tokens = await admin.get("/usage?metric=tokens")
    assert f"{today()}: 1,500 tokens, 1 requests" in tokens.text
