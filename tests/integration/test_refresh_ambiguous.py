"""Refresh calls whose answer comes late or never (DESIGN §1.2.1), end to end.

The real oidc-provider (tests/oidc/server.mjs and its fault modes), a real Redis and
auth replicas as separate processes, as in production. Every case counts at the OAuth
server itself (refresh calls, refreshes it carried out, rotated refresh tokens
presented again, grants revoked), not only in keyrelay's events:

* an answer slower than ``token_timeout_seconds`` is waited for, by the holder and by
  every other replica (the issue's reproduction, with the default settings);
* the connection cut after the provider rotated the refresh token: the lease is left
  to expire, REFRESH_FAILED says the answer was lost, and the later ``invalid_grant``
  disconnects saying so;
* the connection cut before the provider saw the request: the same precautions, then
  an ordinary refresh;
* SIGTERM waits for a refresh in flight and stores its answer;
* a provider that never answers: given up at ``refresh_deadline_seconds``, and no other
  replica calls the token endpoint while the lease lives.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.integration.test_auth_flow import connect
from tests.integration.test_replicas import Channels
from tests.support.events import EventWatcher
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer
from tests.support.stack import (
    ReplicaProcess,
    admin_md,
    auth_config_data,
    gateway_md,
    write_replica_configs,
)

pytestmark = pytest.mark.slow
EV = auth_pb2.AccountEvent

# What REFRESH_FAILED says after a lost answer, and what the disconnect that follows says.
ANSWER_LOST = "refresh answer was lost"
AFTER_LOSS = "lost refresh answer"

LOCK_TTL = 2.0
# Quick failures: a short lease and backoff, and no forced-refresh cool-down, since
# these cases force a refresh twice.
FAST: dict[str, Any] = {
    "lock_ttl_seconds": LOCK_TTL,
    "refresh_backoff_base_seconds": 0.05,
    "refresh_backoff_cap_seconds": 0.2,
    "forced_refresh_cooldown_seconds": 0,
}
# Generous bounds for a loaded machine (2 cores shared with other work).
SETTLE_SECONDS = 0.5  # room for a wrong extra event to arrive
GRPC_TIMEOUT = 60.0


class Cluster:
    """Replica processes of one test, their channels and event watchers; ``close``
    (at teardown) closes the watchers and channels, then stops the replicas."""

    def __init__(
        self, tmp_path: Path, redis_server: RedisServer, oidc: OidcServer, prefix: str
    ) -> None:
        self.tmp_path, self.redis_server, self.oidc, self.prefix = (
            tmp_path,
            redis_server,
            oidc,
            prefix,
        )
        self.replicas: list[ReplicaProcess] = []
        self._channels: list[Channels] = []
        self._watchers: list[EventWatcher] = []

    def start(self, count: int, **auth: Any) -> list[auth_pb2_grpc.AuthServiceAsyncStub]:
        # start_replicas' steps, each replica recorded before it starts: one that fails to
        # come up does not leave the ones before it running.
        data = auth_config_data(self.redis_server.url, self.oidc, prefix=self.prefix, **auth)
        started = write_replica_configs(self.tmp_path, count, data)
        self.replicas += started
        for replica in started:
            replica.spawn()
        for replica in started:
            replica.wait_serving()
        channels = Channels(started)
        self._channels.append(channels)
        return list(channels.stubs)

    async def watch(self, stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str) -> EventWatcher:
        """The test's events from the start; returns once the account's CONNECTED is in."""
        watcher = EventWatcher(stub)
        self._watchers.append(watcher)
        await watcher.wait_for(lambda _: len(watcher.of(account, EV.CONNECTED)) == 1)
        return watcher

    def lock_owner(self, account: str) -> bytes | None:
        with self.redis_server.client() as client:
            value = client.get(f"{self.prefix}lock:{account}")
        assert value is None or isinstance(value, bytes)
        return value

    def lock_pttl_ms(self, account: str) -> int:
        with self.redis_server.client() as client:
            return int(client.pttl(f"{self.prefix}lock:{account}"))

    def account_field(self, account: str, field: str) -> bytes | None:
        with self.redis_server.client() as client:
            value = client.hget(f"{self.prefix}account:{account}", field)
        assert value is None or isinstance(value, bytes)
        return value

    async def close(self) -> None:
        for watcher in self._watchers:
            await watcher.close()
        for channels in self._channels:
            await channels.close()
        for replica in self.replicas:
            await asyncio.to_thread(replica.stop)


@pytest.fixture
def faults(oidc: OidcServer) -> Iterator[OidcServer]:
    """The session's OAuth server with no fault left over, before or after the test."""
    oidc.clear_fault()
    yield oidc
    oidc.clear_fault()


@pytest.fixture
async def cluster(
    tmp_path: Path,
    redis_server: RedisServer,
    faults: OidcServer,
    prefix: str,
) -> AsyncIterator[Cluster]:
    running = Cluster(tmp_path, redis_server, faults, prefix)
    yield running
    await running.close()


def unique_login(name: str) -> str:
    """The OAuth server lives for the whole session: one user per test."""
    return f"{name}-{secrets.token_hex(4)}"


def provider_counts(oidc: OidcServer) -> dict[str, int]:
    """The OAuth server's own view of the refresh-token grant."""
    stats = oidc.stats()
    counts = {
        "refresh_calls": int(stats["token_calls"].get("refresh_token", 0)),
        "refreshes_done": int(stats["token_success"].get("refresh_token", 0)),
        "reuse_detected": int(stats["reuse_detected"]),
        "grants_revoked": int(stats["grants_revoked"]),
    }
    for mode, count in stats["faulted_by_mode"].items():
        counts[f"faulted:{mode}"] = int(count)
    return counts


def provider_delta(oidc: OidcServer, before: dict[str, int]) -> dict[str, int]:
    """What changed at the OAuth server since ``before`` (faults: only those that struck)."""
    after = provider_counts(oidc)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after.keys() | before}
    return {k: v for k, v in delta.items() if v or not k.startswith("faulted:")}


async def eventually(predicate: Callable[[], bool], what: str, within: float) -> float:
    """Polls ``predicate`` until it holds; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not after {within:.0f} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def get_token(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str, *, stale_generation: int = 0
) -> auth_pb2.GetTokenResponse:
    request = auth_pb2.GetTokenRequest(account_id=account, stale_generation=stale_generation)
    response: auth_pb2.GetTokenResponse = await stub.GetToken(
        request, metadata=gateway_md(), timeout=GRPC_TIMEOUT
    )
    return response


async def get_account(stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str) -> auth_pb2.Account:
    response: auth_pb2.Account = await stub.GetAccount(
        auth_pb2.GetAccountRequest(account_id=account), metadata=admin_md()
    )
    return response


def log_lines(replica: ReplicaProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in replica.log().splitlines() if line.startswith("{")]


async def exactly(
    watcher: EventWatcher, account: str, kind: auth_pb2.AccountEvent.Kind.ValueType, count: int
) -> list[auth_pb2.AccountEvent]:
    """Waits for ``count`` events of ``kind``, then checks that no other one follows."""
    await watcher.wait_for(lambda _: len(watcher.of(account, kind)) >= count)
    await asyncio.sleep(SETTLE_SECONDS)
    events = watcher.of(account, kind)
    assert len(events) == count, events
    return events


# -- 1. the reproduction ----------------------------------------------------------


async def test_answer_slower_than_token_timeout_is_awaited_by_every_replica(
    cluster: Cluster,
) -> None:
    """Default settings (token_timeout 10 s, deadline 30 s, lease 10 s): the provider
    rotates the refresh token at once and answers 14 s later. The holder waits for that
    answer past the per-call timeout, the other replicas wait for the holder, and nobody
    presents the rotated refresh token again."""
    oidc = cluster.oidc
    stubs = cluster.start(3)
    first = await connect(stubs[0], "late", login=unique_login("late"))
    watcher = await cluster.watch(stubs[1], "late")
    before = provider_counts(oidc)

    oidc.set_fault("delay_response", delay_ms=14_000, count=1)
    started = time.monotonic()
    results = await asyncio.gather(
        *(get_token(stubs[i % 3], "late", stale_generation=first.generation) for i in range(30))
    )
    elapsed = time.monotonic() - started

    assert elapsed >= 13.5, f"answered after {elapsed:.1f} s: the held-back answer was not used"
    assert {r.generation for r in results} == {first.generation + 1}
    assert len({r.access_token for r in results}) == 1
    assert oidc.userinfo(results[0].access_token).status_code == 200
    assert provider_delta(oidc, before) == {
        "refresh_calls": 1,
        "refreshes_done": 1,
        "reuse_detected": 0,
        "grants_revoked": 0,
        "faulted:delay_response": 1,
    }
    account = await get_account(stubs[2], "late")
    assert account.status == auth_pb2.Account.CONNECTED
    assert account.generation == first.generation + 1
    await exactly(watcher, "late", EV.REFRESHED, 1)
    assert watcher.of("late", EV.DISCONNECTED) == []
    assert watcher.of("late", EV.REFRESH_FAILED) == []

    # The refresh token kept is the rotated one: the next refresh goes through. (An hour
    # of validity is never left, so min_ttl 3600 refreshes without the forced-refresh
    # cool-down, which stays at its default here.)
    following = await stubs[1].GetToken(
        auth_pb2.GetTokenRequest(account_id="late", min_ttl_seconds=3600),
        metadata=gateway_md(),
        timeout=GRPC_TIMEOUT,
    )
    assert following.generation == first.generation + 2
    assert provider_delta(oidc, before) == {
        "refresh_calls": 2,
        "refreshes_done": 2,
        "reuse_detected": 0,
        "grants_revoked": 0,
        "faulted:delay_response": 1,
    }


# -- 2. the answer lost after the provider rotated the refresh token ----------------------


async def test_answer_cut_after_rotation_leaves_the_lease_then_disconnect_says_why(
    cluster: Cluster,
) -> None:
    """The provider rotates the refresh token, then the connection is cut: the only copy
    of the new refresh token is gone. The lease is left to expire (never released), the
    still-valid access token is served, and once the provider refuses the old refresh
    token the disconnect says a refresh answer was lost."""
    oidc = cluster.oidc
    holder, other = cluster.start(2, **FAST)
    first = await connect(holder, "cut", login=unique_login("cut"))
    watcher = await cluster.watch(other, "cut")
    current = await get_token(holder, "cut")
    before = provider_counts(oidc)

    oidc.set_fault("reset_after", count=1)
    served = await get_token(holder, "cut", stale_generation=first.generation)
    returned_at = time.monotonic()
    # Not released: the provider handled the request, the only copy of the rotated
    # refresh token was in the lost answer.
    assert cluster.lock_owner("cut") is not None, "the lock was released after a lost answer"
    assert 0 < cluster.lock_pttl_ms("cut") <= LOCK_TTL * 1000
    # The old access token is still valid: served instead of an error.
    assert served.access_token == current.access_token
    assert served.generation == first.generation

    failed = await exactly(watcher, "cut", EV.REFRESH_FAILED, 1)
    assert ANSWER_LOST in failed[0].reason
    assert cluster.account_field("cut", "answer_lost") == b"1"
    await eventually(lambda: cluster.lock_owner("cut") is None, "the lease expires", 15)
    assert time.monotonic() - returned_at < LOCK_TTL + 5, "the lease outlived its TTL"
    retry_at = float(cluster.account_field("cut", "retry_at") or 0)
    await asyncio.sleep(max(0.0, retry_at - time.time()) + 0.1)  # past the backoff

    with pytest.raises(aio.AioRpcError) as info:
        await get_token(other, "cut", stale_generation=first.generation)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert AFTER_LOSS in (info.value.details() or "")
    assert "keyrelay connect cut --provider testidp" in (info.value.details() or "")

    disconnected = await exactly(watcher, "cut", EV.DISCONNECTED, 1)
    assert AFTER_LOSS in disconnected[0].reason
    assert watcher.of("cut", EV.REFRESHED) == []
    account = await get_account(other, "cut")
    assert account.status == auth_pb2.Account.DISCONNECTED
    assert AFTER_LOSS in account.disconnect_reason
    # The provider rotated the token in the lost answer (refreshes_done 1), and keyrelay
    # presented the rotated one once, after the lease: what a truly lost answer costs.
    assert provider_delta(oidc, before) == {
        "refresh_calls": 2,
        "refreshes_done": 1,
        "reuse_detected": 1,
        "grants_revoked": 1,
        "faulted:reset_after": 1,
    }


# -- 3. the connection cut before the provider saw the request ----------------------------


async def test_request_cut_before_the_provider_saw_it_never_disconnects(
    cluster: Cluster,
) -> None:
    """Cut after sending, before the provider handled it: keyrelay cannot tell this from
    case 2, so the same precautions; the refresh token still works afterwards."""
    oidc = cluster.oidc
    holder, other = cluster.start(2, **FAST)
    first = await connect(holder, "reset", login=unique_login("reset"))
    watcher = await cluster.watch(other, "reset")
    current = await get_token(holder, "reset")
    before = provider_counts(oidc)

    oidc.set_fault("reset", count=1)
    served = await get_token(holder, "reset", stale_generation=first.generation)
    assert served.access_token == current.access_token
    assert served.generation == first.generation
    # keyrelay cannot know the provider never processed it: the same precautions.
    assert cluster.lock_owner("reset") is not None, "the lock was released after a lost answer"
    failed = await exactly(watcher, "reset", EV.REFRESH_FAILED, 1)
    assert ANSWER_LOST in failed[0].reason
    assert cluster.account_field("reset", "answer_lost") == b"1"

    await eventually(lambda: cluster.lock_owner("reset") is None, "the lease expires", 15)
    retry_at = float(cluster.account_field("reset", "retry_at") or 0)
    await asyncio.sleep(max(0.0, retry_at - time.time()) + 0.1)  # past the backoff
    fresh = await get_token(other, "reset", stale_generation=first.generation)
    assert fresh.generation == first.generation + 1
    assert oidc.userinfo(fresh.access_token).status_code == 200

    await exactly(watcher, "reset", EV.REFRESHED, 1)
    assert watcher.of("reset", EV.DISCONNECTED) == []
    assert len(watcher.of("reset", EV.REFRESH_FAILED)) == 1
    account = await get_account(holder, "reset")
    assert account.status == auth_pb2.Account.CONNECTED
    assert account.last_error == ""
    assert cluster.account_field("reset", "answer_lost") == b"0"
    assert provider_delta(oidc, before) == {
        "refresh_calls": 2,
        "refreshes_done": 1,
        "reuse_detected": 0,
        "grants_revoked": 0,
        "faulted:reset": 1,
    }


# -- 4. SIGTERM while the holder's token call is in flight --------------------------------


async def test_sigterm_waits_for_the_refresh_in_flight_and_stores_its_answer(
    cluster: Cluster,
) -> None:
    """SIGTERM to the replica whose token call is in flight (the answer held back 3 s):
    it exits 0 after storing the answer, and the other replica serves it."""
    oidc = cluster.oidc
    holder_stub, other = cluster.start(2)
    holder = cluster.replicas[0]
    assert holder.process is not None
    first = await connect(other, "term", login=unique_login("term"))
    watcher = await cluster.watch(other, "term")
    before = provider_counts(oidc)

    oidc.set_fault("delay_response", delay_ms=3000, count=1)
    in_flight = asyncio.create_task(
        get_token(holder_stub, "term", stale_generation=first.generation)
    )
    await eventually(
        lambda: provider_counts(oidc)["refresh_calls"] > before["refresh_calls"],
        "the holder's refresh reaches the token endpoint",
        15,
    )
    holder.signal(signal.SIGTERM)
    code = await asyncio.to_thread(holder.process.wait, 15)  # TimeoutExpired: no exit
    assert code == 0

    lines = log_lines(holder)
    stopping = [i for i, line in enumerate(lines) if line["msg"].startswith("shutting down")]
    refreshed = [
        i
        for i, line in enumerate(lines)
        if line["msg"] == "token refreshed" and line.get("account_id") == "term"
    ]
    assert len(refreshed) == 1, "the answer was abandoned at SIGTERM"
    assert stopping, "no SIGTERM seen in the log"
    assert stopping[0] < refreshed[0], "the refresh was not in flight at SIGTERM"
    # The caller's RPC may end either way (the server was stopping with a 10 s grace);
    # if it got an answer, that is the new token.
    try:
        answered = await in_flight
    except aio.AioRpcError:
        pass
    else:
        assert answered.generation == first.generation + 1

    token = await get_token(other, "term", stale_generation=first.generation)
    assert token.generation == first.generation + 1
    assert oidc.userinfo(token.access_token).status_code == 200
    assert provider_delta(oidc, before) == {
        "refresh_calls": 1,
        "refreshes_done": 1,
        "reuse_detected": 0,
        "grants_revoked": 0,
        "faulted:delay_response": 1,
    }
    await exactly(watcher, "term", EV.REFRESHED, 1)
    assert watcher.of("term", EV.DISCONNECTED) == []
    assert watcher.of("term", EV.REFRESH_FAILED) == []
    account = await get_account(other, "term")
    assert account.status == auth_pb2.Account.CONNECTED


# -- 5. a provider that never answers -----------------------------------------------------


async def test_unanswered_refresh_ends_at_its_deadline_and_nobody_calls_during_the_lease(
    cluster: Cluster,
) -> None:
    """token_timeout 1 s only bounds sending; the answer is awaited until the 3 s
    deadline. The lease (1 s, renewed) then runs out on its own, and the other replica,
    asking for a forced refresh all along, never calls the token endpoint meanwhile."""
    oidc = cluster.oidc
    holder, other = cluster.start(
        2, refresh_deadline_seconds=3, token_timeout_seconds=1, lock_ttl_seconds=1
    )
    first = await connect(holder, "mute", login=unique_login("mute"))
    watcher = await cluster.watch(other, "mute")
    current = await get_token(holder, "mute")
    before = provider_counts(oidc)

    oidc.set_fault("hang", count=1)

    async def timed_holder_call() -> tuple[auth_pb2.GetTokenResponse, float]:
        started = time.monotonic()
        response = await get_token(holder, "mute", stale_generation=first.generation)
        return response, time.monotonic() - started

    holder_call = asyncio.create_task(timed_holder_call())
    await eventually(
        lambda: provider_counts(oidc)["refresh_calls"] > before["refresh_calls"],
        "the holder's refresh reaches the token endpoint",
        15,
    )
    owner = cluster.lock_owner("mute")
    assert owner is not None
    other_call = asyncio.create_task(get_token(other, "mute", stale_generation=first.generation))
    samples = 0
    deadline = time.monotonic() + 20
    while True:
        calls = provider_counts(oidc)["refresh_calls"] - before["refresh_calls"]
        if cluster.lock_owner("mute") != owner:
            break  # the holder's lease is over; the sample above may be from after it
        assert calls == 1, "a refresh call was made while the holder's lease was alive"
        samples += 1
        assert time.monotonic() < deadline, "the holder's lease never ended"
        await asyncio.sleep(0.05)
    assert samples > 0

    served, elapsed = await holder_call
    assert served.access_token == current.access_token
    assert served.generation == first.generation
    assert 2.9 <= elapsed < 12, f"the unanswered refresh ended after {elapsed:.1f} s"
    failed = await exactly(watcher, "mute", EV.REFRESH_FAILED, 1)
    assert ANSWER_LOST in failed[0].reason

    # After the lease the other replica finds the holder's failure (backoff, forced-refresh
    # cool-down) and serves the current token; only if the lease had lapsed before that
    # failure was written (a very slow machine) may it have refreshed, after the lease.
    seen_by_other = await other_call
    refreshed = seen_by_other.generation - first.generation
    assert refreshed in (0, 1)
    assert oidc.userinfo(seen_by_other.access_token).status_code == 200
    assert provider_delta(oidc, before) == {
        "refresh_calls": 1 + refreshed,
        "refreshes_done": refreshed,
        "reuse_detected": 0,
        "grants_revoked": 0,
        "faulted:hang": 1,
    }
    assert watcher.of("mute", EV.DISCONNECTED) == []
    account = await get_account(other, "mute")
    assert account.status == auth_pb2.Account.CONNECTED
