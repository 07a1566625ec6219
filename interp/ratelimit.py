"""LLM rate limits shared by every worker of the fleet through Redis.

Celery's `rate_limit` counts per worker, so it cannot hold an endpoint's global limit. Here each endpoint has a
requests-per-minute and a tokens-per-minute limit kept by the `limits` library's moving window in Redis, which
every worker process hits before each call; and a 429 from the endpoint sets a shared "cool down until" key that
every worker waits on before its next call, so one rate-limited answer slows the whole fleet, not one task.

Tokens are charged before the call, as an estimate (prompt characters / 4 + max_tokens): the window cannot be
refunded afterwards, so the estimate errs high. When Redis is unreachable calls go ahead unlimited (logged): the
limits protect the endpoint's quota, and a broker restart must not stop the fleet.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlparse

from .settings import get_settings

log = logging.getLogger(__name__)
_PREFIX = "interp:ratelimit"
COOLDOWN_READ_S = 0.1
COOLDOWN_TRUST_S = 1.0      # a cool-down read this recently lets calls go on while the next read is in flight


def estimate_tokens(messages: list[dict], max_tokens: int) -> int:
    return sum(len(m.get("content") or "") for m in messages) // 4 + max_tokens


class FleetLimiter:
    def __init__(self, redis_url: str, rpm: int, tpm: int, cooldown_s: float, connections: int = 128):
        import redis.asyncio as aioredis
        from limits import RateLimitItemPerMinute
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self._redis = aioredis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2,
                                        max_connections=connections)
        # (window, its limit, whether a call costs its tokens or 1)
        self._items = [(RateLimitItemPerMinute(n), n, per_token) for n, per_token in ((rpm, False), (tpm, True)) if n]
        self._limiter = None
        if self._items:
            storage = RedisStorage("async+" + redis_url, implementation="redispy", key_prefix=_PREFIX,
                                   socket_timeout=2, socket_connect_timeout=2, max_connections=connections)
            self._limiter = MovingWindowRateLimiter(storage)
        self.cooldown_s = cooldown_s
        self.waited_s = 0.0
        self._seen: dict[str, tuple[float, float]] = {}     # endpoint -> (read at, cool-down until)
        self._reads: dict[str, asyncio.Future] = {}          # endpoint -> the read in flight
        self._tasks: set[asyncio.Task] = set()

    async def acquire(self, endpoint: str, tokens: int) -> None:
        """Waits until the fleet may send one more request of about `tokens` tokens to `endpoint`."""
        try:
            await self._wait_cooldown(endpoint)
            if self._limiter is None:
                return
            for item, limit, per_token in self._items:
                cost = max(1, min(tokens, limit)) if per_token else 1   # a call over the whole window goes alone
                while not await self._limiter.hit(item, endpoint, cost=cost):
                    stats = await self._limiter.get_window_stats(item, endpoint)
                    await self._sleep(max(0.05, min(stats.reset_time - time.time(), 5.0)))
        except Exception as e:  # noqa: BLE001 - redis errors of every kind: go ahead unlimited
            log.warning("rate limiter unavailable (%s); calling %s without the shared limit", str(e)[:120], endpoint)

    async def _wait_cooldown(self, endpoint: str) -> None:
        # the shared key is read at most every COOLDOWN_READ_S per process, by one read that every call shares: a
        # round trip to Redis per call would cost a worker as much CPU as the call itself. Calls wait for that read
        # only when nothing was read within COOLDOWN_TRUST_S: had they all waited for each read, the calls of
        # every 100 ms would go out together, in waves that leave the endpoint idle between them. A 429
        # elsewhere reaches this process up to COOLDOWN_READ_S and a round trip later.
        now = time.time()
        read_at, until = self._seen.get(endpoint, (0.0, 0.0))
        if now - read_at > COOLDOWN_READ_S:
            read = self._reads.get(endpoint)
            if read is None or read.done():
                read = self._reads[endpoint] = asyncio.ensure_future(self._read_cooldown(endpoint))
                read.add_done_callback(_retrieved)
            if now - read_at > COOLDOWN_TRUST_S:
                until = await read
        if until > now:
            await self._sleep(until - now)

    async def _read_cooldown(self, endpoint: str) -> float:
        raw = await self._redis.get(f"{_PREFIX}:cooldown:{endpoint}")
        until = max(float(raw) if raw is not None else 0.0, self._seen.get(endpoint, (0.0, 0.0))[1])
        self._seen[endpoint] = (time.time(), until)
        return until

    async def _sleep(self, s: float) -> None:
        self.waited_s += s
        await asyncio.sleep(s)

    def rate_limited(self, endpoint: str, retry_after: float | None) -> None:
        """The hook the LLM client calls on every 429 (OpenAIClient's on_rate_limited): the whole fleet cools
        down for Retry-After, or settings.llm_cooldown_s without one."""
        until = time.time() + (retry_after if retry_after is not None else self.cooldown_s)
        self._seen[endpoint] = (time.time(), max(until, self._seen.get(endpoint, (0.0, 0.0))[1]))
        task = asyncio.get_running_loop().create_task(self._set_cooldown(endpoint, until))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_cooldown(self, endpoint: str, until: float) -> None:
        key = f"{_PREFIX}:cooldown:{endpoint}"
        try:
            # the later deadline wins when two workers see a 429 at once
            old = await self._redis.get(key)
            if old is None or float(old) < until:
                await self._redis.set(key, repr(until), px=max(1, int((until - time.time()) * 1000)))
        except Exception as e:  # noqa: BLE001 - see acquire
            log.warning("could not share a 429 cool-down (%s)", str(e)[:120])

    async def close(self) -> None:
        for t in list(self._tasks):
            with contextlib.suppress(Exception):
                await t
        await self._redis.aclose()


def _retrieved(read: asyncio.Future) -> None:
    """A read nobody waited for may fail (Redis down) without asyncio's "exception never retrieved": the next call
    that waits for a read reports it."""
    if not read.cancelled():
        read.exception()


def endpoint_of(client) -> str:
    """The limit's key: the endpoint's host and port (one quota, whatever the model)."""
    u = urlparse(getattr(client, "base_url", None) or "https://api.openai.com/v1")
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"


class LimitedClient:
    """An LLM client whose every call first acquires the fleet's limits for its endpoint. The acquire happens
    inside the client's concurrency limit: a call waiting for a free slot must not hold a share of the window
    (nor a Redis connection) while it waits."""

    def __init__(self, inner, limiter: FleetLimiter, concurrency: int):
        self.inner, self.limiter, self.endpoint = inner, limiter, endpoint_of(inner)
        self._slots = asyncio.Semaphore(concurrency)

    def __getattr__(self, name):        # spec, usage, grammar_ok... are the inner client's
        return getattr(self.inner, name)

    async def chat(self, messages: list[dict], **options):
        async with self._slots:
            await self.limiter.acquire(self.endpoint, estimate_tokens(messages, options.get("max_tokens", 256)))
            return await self.inner.chat(messages, **options)

    async def close(self) -> None:
        await self.inner.close()


@contextlib.asynccontextmanager
async def limited_clients(specs: list[str]):
    """{spec: client}, closed on exit: OpenAI-compatible endpoints under the fleet's limits, in-process models
    (hf:) as they are, made once so that a chunk's batches share them. The baseline needs no client."""
    from .llm import make_client

    s = get_settings()
    # every call in flight may hold a connection while it acquires
    limiter = FleetLimiter(s.redis_url, s.llm_rpm, s.llm_tpm, s.llm_cooldown_s, connections=s.llm_concurrency + 8)
    clients: dict = {}
    try:
        for spec in dict.fromkeys(specs):
            if spec.startswith("openai:"):
                inner = make_client(spec)
                clients[spec] = limited = LimitedClient(inner, limiter, inner.concurrency)
                inner.on_rate_limited = lambda wait, c=limited: limiter.rate_limited(c.endpoint, wait)
            elif spec != "baseline":
                clients[spec] = make_client(spec)
        yield clients
    finally:
        for c in clients.values():
            await c.close()
        await limiter.close()
