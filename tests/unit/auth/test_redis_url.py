"""Redis URLs, the Sentinel forms: what parses to what, and every malformed form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrelay.auth.core.redis_url import (
    DEFAULT_SENTINEL_PORT,
    DirectUrl,
    RedisUrlError,
    SentinelUrl,
    parse_redis_url,
)

SECRET = "s3cr3t-PASSWORD"


def sentinel(url: str) -> SentinelUrl:
    parsed = parse_redis_url(url)
    assert isinstance(parsed, SentinelUrl), parsed
    return parsed


def error_of(url: str) -> str:
    with pytest.raises(RedisUrlError) as info:
        parse_redis_url(url)
    return str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "rediss://user:pw@redis.example:6380/2?ssl_cert_reqs=required",
        "unix:/tmp/redis.sock",
        "REDIS://upper.case:6379",
    ],
)
def test_direct_urls_are_left_to_redis_py(url: str) -> None:
    assert parse_redis_url(url) == DirectUrl(url)


def test_the_smallest_sentinel_url() -> None:
    assert sentinel("redis+sentinel://10.0.0.5/mymaster") == SentinelUrl(
        sentinels=(("10.0.0.5", DEFAULT_SENTINEL_PORT),), service_name="mymaster"
    )


def test_every_part_of_a_sentinel_url() -> None:
    parsed = sentinel(
        "rediss+sentinel://app:p%40ss%3Aword@s1.example:26380,s2.example,[fd00::2]:5000"
        "/redis-prod/3?sentinel_username=watcher&sentinel_password=w%26tch"
    )
    assert parsed == SentinelUrl(
        sentinels=(("s1.example", 26380), ("s2.example", 26379), ("fd00::2", 5000)),
        service_name="redis-prod",
        db=3,
        tls=True,
        username="app",
        password="p@ss:word",
        sentinel_username="watcher",
        sentinel_password="w&tch",
    )


def test_a_password_without_a_username() -> None:
    parsed = sentinel(f"redis+sentinel://:{SECRET}@h:1/m")
    assert (parsed.username, parsed.password) == (None, SECRET)


def test_sentinel_auth_without_primary_auth() -> None:
    parsed = sentinel(f"redis+sentinel://h/m?sentinel_password={SECRET}")
    assert parsed.password is None
    assert (parsed.sentinel_username, parsed.sentinel_password) == (None, SECRET)


def test_the_scheme_is_case_insensitive() -> None:
    assert sentinel("REDISS+Sentinel://h/m").tls


def test_passwords_stay_out_of_repr() -> None:
    parsed = sentinel(f"redis+sentinel://u:{SECRET}@h/m?sentinel_password={SECRET}x")
    assert SECRET not in repr(parsed)
    assert SECRET not in repr(parse_redis_url(f"redis://:{SECRET}@h"))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:6379", "must be a redis://, rediss://, unix://, redis+sentinel://"),
        ("sentinel://h/m", "must be a redis://"),
        ("redis+sentinels://h/m", "must be a redis://"),
        ("h:26379/m", "must be a redis://"),
        ("", "must be a redis://"),
        ("redis+sentinel:h/m", "expected redis+sentinel://hosts/service_name"),
        # hosts
        ("redis+sentinel:///m", "no sentinel host"),
        ("redis+sentinel://:pw@/m", "no sentinel host"),
        ("redis+sentinel://a,,b/m", "sentinel host 2 is empty (a stray ',')"),
        ("redis+sentinel://a,/m", "sentinel host 2 is empty"),
        ("redis+sentinel://,a/m", "sentinel host 1 is empty"),
        ("redis+sentinel://a:x/m", "sentinel host 1 ('a:x'): the port must be a number"),
        ("redis+sentinel://a:/m", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://a:0/m", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://a:65536/m", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://a:-1/m", "the port must be a number"),
        ("redis+sentinel://a:+1/m", "the port must be a number"),
        ("redis+sentinel://a:1,b:\uff12/m", "sentinel host 2 ('b:\uff12'): the port must be"),
        ("redis+sentinel://a:1,a:1/m", "sentinel host 2 ('a:1') appears twice"),
        ("redis+sentinel://A,a:26379/m", "appears twice"),
        ("redis+sentinel://bad_host-/m", "not a host name or IPv4 address"),
        ("redis+sentinel://-a/m", "not a host name or IPv4 address"),
        ("redis+sentinel://a..b/m", "not a host name"),
        ("redis+sentinel://h%20x/m", "not a host name"),
        ("redis+sentinel://::1/m", "an IPv6 address needs brackets"),
        ("redis+sentinel://[::1/m", "expected [ipv6]:port"),
        ("redis+sentinel://[::1]x/m", "expected [ipv6]:port"),
        ("redis+sentinel://[nope]:1/m", "not an IPv6 address in brackets"),
        ("redis+sentinel://[::1]:99999/m", "the port must be a number"),
        # path
        ("redis+sentinel://h", "the service name is missing"),
        ("redis+sentinel://h/", "the service name is missing"),
        ("redis+sentinel://h//0", "the service name is empty"),
        ("redis+sentinel://h/m/0/extra", "stray path part 'extra'"),
        ("redis+sentinel://h/m/", "db '': must be a number from 0"),
        ("redis+sentinel://h/m/x", "db 'x': must be a number from 0"),
        ("redis+sentinel://h/m/-1", "db '-1'"),
        ("redis+sentinel://h/m/99999999999", "db '99999999999'"),
        ("redis+sentinel://h/my%20master", "service name 'my%20master'"),
        ("redis+sentinel://h/" + "m" * 129, "up to 128"),
        ("redis+sentinel://h/m#frag", "no #fragment"),
        # query
        ("redis+sentinel://h/m?", "a malformed query parameter"),
        ("redis+sentinel://h/m?&sentinel_password=x", "a malformed query parameter"),
        ("redis+sentinel://h/m?ssl_cert_reqs=none", "unknown query parameter 'ssl_cert_reqs'"),
        ("redis+sentinel://h/m?db=1", "unknown query parameter 'db'"),
        ("redis+sentinel://h/m?sentinel_password", "query parameter sentinel_password is empty"),
        ("redis+sentinel://h/m?sentinel_password=", "query parameter sentinel_password is empty"),
        (
            "redis+sentinel://h/m?sentinel_password=a&sentinel_password=b",
            "sentinel_password appears twice",
        ),
        ("redis+sentinel://h/m?sentinel_username=u", "sentinel_username needs sentinel_password"),
        ("redis+sentinel://h/m?sentinel_password=%ff", "not valid percent-encoded UTF-8"),
        # credentials
        ("redis+sentinel://lonely@h/m", "credentials must be [username]:password@"),
        ("redis+sentinel://u:@h/m", "the password before '@' is empty"),
        ("redis+sentinel://:@h/m", "the password before '@' is empty"),
        ("redis+sentinel://u:a:b@h/m", "the password holds ':'"),
        ("redis+sentinel://u:%ff@h/m", "the password is not valid percent-encoded UTF-8"),
        ("redis+sentinel://%ff:pw@h/m", "the username is not valid percent-encoded UTF-8"),
    ],
)
def test_malformed_urls(url: str, problem: str) -> None:
    assert problem in error_of(url)


@pytest.mark.parametrize(
    "url",
    [
        # A password's reserved characters left unencoded: the message must not quote it.
        f"redis+sentinel://u:{SECRET}/x@h/m",
        f"redis+sentinel://u:{SECRET}?x@h/m",
        f"redis+sentinel://u:{SECRET}#x@h/m",
        f"redis+sentinel://h/m?sentinel_password={SECRET}@x",
        f"redis+sentinel://u:{SECRET}:x@h/m",
        f"redis+sentinel://{SECRET}@h/m",
        f"redis+sentinel://u:{SECRET}@h:x/m",
        f"redis+sentinel://u:{SECRET}@h/m/x?sentinel_password={SECRET}",
        f"redis+sentinel://u:{SECRET}@h/m?unknown={SECRET}",
        f"redis+sentinel://h/m?sentinel_password:{SECRET}",
        f"http://u:{SECRET}@h/m",
    ],
)
def test_no_message_quotes_a_password(url: str) -> None:
    assert SECRET not in error_of(url)


# -- round trip: what to_url writes parses back to the same thing ------------------------

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
HOSTNAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
HOSTS = st.lists(
    st.tuples(st.one_of(HOSTNAMES, IPV4, IPV6), st.integers(1, 65535)),
    min_size=1,
    max_size=5,
    unique_by=lambda hp: (hp[0].lower(), hp[1]),
)
# Any text: every reserved character is percent-encoded on the way out.
SECRETS = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30)


@st.composite
def sentinel_urls(draw: st.DrawFn) -> SentinelUrl:
    password = draw(st.none() | SECRETS)
    sentinel_password = draw(st.none() | SECRETS)
    return SentinelUrl(
        sentinels=tuple(draw(HOSTS)),
        service_name=draw(st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)),
        db=draw(st.integers(0, 2**31 - 1)),
        tls=draw(st.booleans()),
        username=draw(st.none() | SECRETS) if password is not None else None,
        password=password,
        sentinel_username=draw(st.none() | SECRETS) if sentinel_password is not None else None,
        sentinel_password=sentinel_password,
    )


@given(sentinel_urls())
def test_to_url_round_trips(url: SentinelUrl) -> None:
    assert sentinel(url.to_url()) == url


@given(HOSTS)
def test_a_host_list_parses_back_in_order(hosts: list[tuple[str, int]]) -> None:
    written = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)
    assert sentinel(f"redis+sentinel://{written}/m").sentinels == tuple(hosts)


@given(HOSTS, st.integers(1, 4))
def test_a_repeated_host_is_named(hosts: list[tuple[str, int]], repeat: int) -> None:
    index = min(repeat, len(hosts)) - 1
    written = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts]
    written.append(written[index])
    message = error_of(f"redis+sentinel://{','.join(written)}/m")
    assert f"sentinel host {len(written)} ({written[index]!r}) appears twice" in message
