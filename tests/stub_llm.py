"""A local OpenAI-compatible chat-completions server over real HTTP on loopback, for tests and benchmarks.

Tests set `stub.responder` (request body -> Reply) and queue faults with `stub.fault(...)`; each queued
fault answers one request, in order, then normal replies resume. Faults: "429" (with Retry-After),
"500", "503", "400" (not retryable), "reset" (TCP reset), "timeout" (answers after `stall_s`), "malformed" (invalid JSON body),
"empty" (empty content), "refusal", "nologprobs" (a normal answer without logprobs).
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_TOKEN = re.compile(r"\d|\s*[A-Za-z_]+|\s+|.", re.S)


@dataclass
class Reply:
    content: str
    # top_logprobs per completion token, keyed by the token's index; default: the token itself, p = 1
    tops: dict[int, dict[str, float]] = field(default_factory=dict)
    refusal: str | None = None

    def tokens(self) -> list[str]:
        return _TOKEN.findall(self.content)


def digit_tops(value: float) -> dict[str, float]:
    """Top logprobs over "0".."10" that put the probability mass on the two integers around `value`."""
    lo = int(math.floor(value))
    hi = min(10, lo + 1)
    frac = value - lo
    tops = {str(v): -30.0 for v in range(11)}
    tops[str(lo)] = math.log(max(1e-12, 1 - frac)) if hi != lo else 0.0
    if hi != lo:
        tops[str(hi)] = math.log(max(1e-12, frac))
    return tops


def simulation_reply(token_lines: list[str], values: list[float]) -> Reply:
    """A simulator's answer 'token<TAB>N' per line, with top logprobs whose expected value is each value."""
    content, tops = "", {}
    for tok, v in zip(token_lines, values):
        prefix = content + tok + "\t"
        content = prefix + str(int(round(v))) + "\n"
        tops[len(_TOKEN.findall(prefix))] = digit_tops(v)
    return Reply(content, tops)


class StubLLM:
    def __init__(self, latency_s: float = 0.0, stall_s: float = 3.0, retry_after: str = "0.2"):
        self.latency_s, self.stall_s, self.retry_after = latency_s, stall_s, retry_after
        self.responder: Callable[[dict], Reply] = lambda body: Reply("Label: a placeholder answer")
        self.requests: list[dict] = []
        self.headers: list[tuple[str, dict[str, str]]] = []     # (path, headers) of each request
        self.request_times: list[float] = []
        self._faults: deque[str] = deque()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def fault(self, *names: str) -> None:
        with self._lock:
            self._faults.extend(names)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass    # the client gave up (its timeout fault test); nothing to answer

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                with stub._lock:
                    stub.requests.append(body)
                    stub.headers.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                    stub.request_times.append(time.monotonic())
                fault = stub._next_fault()
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self._answer(body, fault)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def _answer(self, body, fault):
                if stub.latency_s:
                    time.sleep(stub.latency_s)
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                                      {"Retry-After": stub.retry_after})
                if fault == "400":
                    return self._send(400, b'{"error": {"message": "bad request: unknown parameter"}}')
                if fault in ("500", "503"):
                    return self._send(int(fault), b'{"error": {"message": "server error"}}')
                if fault == "reset":
                    # SO_LINGER 0 turns close() into a TCP RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault == "timeout":
                    time.sleep(stub.stall_s)
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [ {"message": ')
                reply = stub.responder(body)
                if fault == "empty":
                    reply = Reply("")
                elif fault == "refusal":
                    reply = Reply("I'm sorry, but I can't help with that.", refusal="I can't help with that.")
                self._send(200, json.dumps(stub._completion(body, reply, with_logprobs=fault != "nologprobs"))
                           .encode())

        return Handler

    @staticmethod
    def _completion(body: dict, reply: Reply, with_logprobs: bool) -> dict:
        toks = reply.tokens()
        n_top = int(body.get("top_logprobs") or 0)
        logprobs = None
        if body.get("logprobs") and with_logprobs:
            content = []
            for i, t in enumerate(toks):
                tops = reply.tops.get(i, {t: 0.0})
                best = sorted(tops.items(), key=lambda kv: -kv[1])[:max(n_top, 1)]
                content.append({"token": t, "logprob": tops.get(t, best[0][1]), "bytes": None,
                                "top_logprobs": [{"token": k, "logprob": v, "bytes": None} for k, v in best]})
            logprobs = {"content": content, "refusal": None}
        prompt_tokens = sum(len(_TOKEN.findall(m.get("content") or "")) for m in body.get("messages", []))
        return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "stub"),
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": reply.content, "refusal": reply.refusal}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(toks),
                          "total_tokens": prompt_tokens + len(toks)}}


_OPEN: list = []


def closing(client):
    """client, closed at the end of the next run_closing(), on the loop it ran on: its HTTP session belongs to that
    loop, and one left open warns at exit."""
    _OPEN.append(client)
    return client


def run_closing(coro):
    """asyncio.run(coro), then every client passed to closing() closed before the loop ends."""
    async def go():
        try:
            return await coro
        finally:
            while _OPEN:
                await _OPEN.pop().close()
    return asyncio.run(go())
