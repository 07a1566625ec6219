"""The fleet's shared LLM rate limits in the real Redis: two limiters (two workers) share one window, and a 429
seen by one makes the other wait."""
import asyncio
import os
import time
import uuid

import pytest

from interp.ratelimit import FleetLimiter

REDIS = os.environ.get("REDIS_URL", os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/5"))


def endpoint() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:443"     # a fresh key: no window left over from another run


async def blocked(coro, within: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(coro, within)
        return False
    except asyncio.TimeoutError:
        return True


def test_requests_per_minute_is_one_window_for_every_worker():
    async def go():
        a, b = FleetLimiter(REDIS, rpm=5, tpm=0, cooldown_s=1), FleetLimiter(REDIS, rpm=5, tpm=0, cooldown_s=1)
        ep = endpoint()
        t = time.monotonic()
        for lim in (a, b, a, b, a):
            await lim.acquire(ep, 10)
        fast = time.monotonic() - t
        sixth_waits = await blocked(b.acquire(ep, 10))
        other_endpoint_free = not await blocked(b.acquire(endpoint(), 10))
        await a.close()
        await b.close()
        return fast, sixth_waits, other_endpoint_free

    fast, sixth_waits, other_free = asyncio.run(go())
    assert fast < 0.5 and sixth_waits and other_free


def test_tokens_per_minute_counts_the_estimate():
    async def go():
        a, b = FleetLimiter(REDIS, rpm=0, tpm=1000, cooldown_s=1), FleetLimiter(REDIS, rpm=0, tpm=1000, cooldown_s=1)
        ep = endpoint()
        await a.acquire(ep, 600)
        second = await blocked(b.acquire(ep, 600))
        small = not await blocked(b.acquire(ep, 300))
        await a.close()
        await b.close()
        return second, small

    assert asyncio.run(go()) == (True, True)


@pytest.mark.parametrize("retry_after,at_least", [(1.0, 0.9), (None, 0.6)])
def test_a_429_cools_the_whole_fleet_down(retry_after, at_least):
    async def go():
        a, b = FleetLimiter(REDIS, 0, 0, cooldown_s=0.7), FleetLimiter(REDIS, 0, 0, cooldown_s=0.7)
        ep = endpoint()
        a.rate_limited(ep, retry_after)
        await asyncio.sleep(0.05)           # the cool-down key is written by a task on a's loop
        t = time.monotonic()
        await b.acquire(ep, 1)
        waited = time.monotonic() - t
        t = time.monotonic()
        await b.acquire(ep, 1)              # the cool-down is over: no more waiting
        again = time.monotonic() - t
        await a.close()
        await b.close()
        return waited, again

    waited, again = asyncio.run(go())
    assert waited >= at_least and again < 0.2


def test_calls_go_on_while_a_cooldown_read_is_in_flight_and_the_next_ones_see_it():
    """A call that finds the last cool-down read older than COOLDOWN_READ_S (but within COOLDOWN_TRUST_S) does not
    wait for the next read (calls queued behind each read went out in waves); the read it starts brings another
    worker's 429 to the calls after it."""
    from interp.ratelimit import COOLDOWN_READ_S

    async def timed(coro) -> float:
        t = time.monotonic()
        await coro
        return time.monotonic() - t

    async def go():
        a, b = FleetLimiter(REDIS, 0, 0, cooldown_s=0.7), FleetLimiter(REDIS, 0, 0, cooldown_s=0.7)
        ep = endpoint()
        await b.acquire(ep, 1)                      # b has read the key: no cool-down
        a.rate_limited(ep, 1.0)
        await asyncio.sleep(COOLDOWN_READ_S + 0.05)    # a's key is written; b's last read is stale, but recent
        went = await timed(b.acquire(ep, 1))
        await asyncio.sleep(0.05)                   # the read that call started has landed
        waited = await timed(b.acquire(ep, 1))
        await a.close()
        await b.close()
        return went, waited

    went, waited = asyncio.run(go())
    assert went < 0.05 and waited >= 0.6


def test_redis_unreachable_means_unlimited_not_stuck():
    async def go():
        lim = FleetLimiter("redis://127.0.0.1:9/0", rpm=1, tpm=0, cooldown_s=1)
        t = time.monotonic()
        for _ in range(3):
            await lim.acquire(endpoint(), 1)
        await lim.close()
        return time.monotonic() - t

    assert asyncio.run(go()) < 5


def test_a_429_from_the_endpoint_holds_back_another_workers_calls(monkeypatch):
    """Two workers' clients (each its own limiter and Redis connection) on one endpoint: the first gets a 429 with
    Retry-After 1 s; the second, calling 0.3 s later, does not reach the endpoint before the second is over."""
    from interp.ratelimit import limited_clients
    from interp.settings import get_settings
    from tests.stub_llm import Reply, StubLLM

    with StubLLM(retry_after="1.0") as stub:
        stub.responder = lambda body: Reply("Label: fine")
        for k, v in {"REDIS_URL": REDIS, "OPENAI_BASE_URL": stub.url, "OPENAI_API_KEY": "sk-test",
                     "LLM_MAX_RETRIES": "2"}.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        msg = [{"role": "user", "content": "hi"}]

        async def go():
            async with limited_clients(["openai:m"]) as a, limited_clients(["openai:m"]) as b:
                stub.fault("429")
                first = asyncio.create_task(a["openai:m"].chat(msg))
                await asyncio.sleep(0.3)
                await b["openai:m"].chat(msg)
                await first
                return a["openai:m"].rate_limited

        try:
            assert asyncio.run(go()) == 1
        finally:
            get_settings.cache_clear()
        t429, later = stub.request_times[0], sorted(stub.request_times[1:])
        assert len(later) == 2 and later[0] - t429 >= 0.9     # neither the retry nor the other worker came sooner


def test_calls_queued_behind_the_concurrency_limit_hold_no_limiter_resources(monkeypatch, caplog):
    """300 calls at once through a client limited to 4 in flight: the limiter sees at most 4 at a time (a Redis
    pool of 12 connections suffices) and never fails open."""
    from interp.ratelimit import limited_clients
    from interp.settings import get_settings
    from tests.stub_llm import Reply, StubLLM

    with StubLLM(latency_s=0.005) as stub:
        stub.responder = lambda body: Reply("Label: fine")
        for k, v in {"REDIS_URL": REDIS, "OPENAI_BASE_URL": stub.url, "OPENAI_API_KEY": "sk-test",
                     "LLM_CONCURRENCY": "4", "LLM_RPM": "100000"}.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()

        async def go():
            async with limited_clients(["openai:m"]) as c:
                await asyncio.gather(*(c["openai:m"].chat([{"role": "user", "content": "hi"}]) for _ in range(300)))

        try:
            asyncio.run(go())
        finally:
            get_settings.cache_clear()
        assert len(stub.requests) == 300 and stub.max_in_flight <= 4
        assert "rate limiter unavailable" not in caplog.text
