"""The OpenAI-compatible client against the stub server over real HTTP: every fault and what the client does
(transport faults are the SDK's retries, observed through our hooks; malformed 200s are our own retries)."""
import asyncio
import logging
import time

import pytest

from interp.llm import Backoff, LLMClient, LLMError, NullClient, OpenAIClient, is_baseline, make_client
from interp.records import Usage
from sae.errors import InputError
from tests.stub_llm import Reply, StubLLM, closing, run_closing

MSG = [{"role": "user", "content": "say something"}]


@pytest.fixture
def stub():
    with StubLLM(stall_s=1.5, retry_after="0.3") as s:
        s.responder = lambda body: Reply("Label: fine answer")
        yield s


def client(stub, **kw):
    kw = {"timeout_s": 0.5, "max_retries": 2, "backoff": Backoff(0.01, 0.02), **kw}
    return closing(OpenAIClient(model="m", base_url=stub.url, api_key="sk-SECRET-123", **kw))


run = run_closing


def test_429_waits_for_retry_after_then_succeeds_and_the_hook_sees_it(stub):
    stub.retry_after = "1.2"
    stub.fault("429")
    seen = []
    cl = client(stub, on_rate_limited=seen.append)
    c = run(cl.chat(MSG))
    assert c.text == "Label: fine answer"
    assert len(stub.request_times) == 2
    # the SDK's own first backoff is at most 0.5 s; the server asked for 1.2 s
    assert stub.request_times[1] - stub.request_times[0] >= 1.2
    assert seen == [1.2] and cl.rate_limited == 1
    assert c.usage.calls == 2 and cl.retries == 1


def test_429_with_a_long_retry_after_reaches_the_hook_even_when_retries_run_out(stub):
    stub.retry_after = "7"
    stub.fault("429")
    seen = []
    with pytest.raises(LLMError, match="HTTP 429 .*gave up after 1 attempts"):
        run(client(stub, max_retries=0, on_rate_limited=seen.append).chat(MSG))
    assert seen == [7.0]


@pytest.mark.parametrize("fault", ["500", "503", "reset", "malformed"])
def test_transient_faults_are_retried(stub, fault):
    stub.fault(fault)
    cl = client(stub)
    c = run(cl.chat(MSG))
    assert c.text == "Label: fine answer"
    assert len(stub.requests) == 2 and cl.retries == 1


def test_timeout_is_retried_and_bounded(stub):
    stub.fault("timeout")
    t = time.monotonic()
    assert run(client(stub).chat(MSG)).text == "Label: fine answer"
    assert 0.5 <= time.monotonic() - t < 1.5       # gave up on the stalled call at the 0.5 s timeout
    stub.fault("timeout", "timeout")
    with pytest.raises(LLMError, match=r"timeout after 0.5s .*gave up after 2 attempts"):
        run(client(stub, max_retries=1).chat(MSG))


def test_retries_exhausted_raise_one_clear_error_and_count_calls(stub):
    stub.fault("500", "503", "500")
    cl = client(stub)
    with pytest.raises(LLMError, match="HTTP 500 .*gave up after 3 attempts"):
        run(cl.chat(MSG))
    assert cl.usage.calls == 3


@pytest.mark.parametrize("fault", ["400"])
def test_client_errors_are_not_retried(stub, fault):
    with pytest.raises(LLMError, match="HTTP 400"):
        stub.fault(fault)
        run(client(stub).chat(MSG))
    assert len(stub.requests) == 1


def test_malformed_json_every_time_fails_cleanly(stub):
    stub.fault("malformed", "malformed", "malformed")
    with pytest.raises(LLMError, match="malformed response"):
        run(client(stub).chat(MSG))


def test_empty_refusal_and_missing_logprobs_come_back_as_data(stub):
    stub.fault("empty", "refusal", "nologprobs")

    async def four():
        cl = client(stub)
        return [await cl.chat(MSG, logprobs=True, top_logprobs=5) for _ in range(4)]

    empty, refusal, nolp, ok = run(four())
    assert empty.text == "" and refusal.refusal and nolp.logprobs is None
    assert ok.logprobs is not None and "".join(t.token for t in ok.logprobs) == ok.text
    assert stub.requests[-1]["logprobs"] is True and stub.requests[-1]["top_logprobs"] == 5


def test_tokens_are_counted_per_call_and_accumulated(stub):
    async def two():
        cl = client(stub)
        return cl, await cl.chat(MSG), await cl.chat(MSG)

    cl, a, b = run(two())
    # the stub's usage: "say", " something" in; "Label", ":", " fine", " answer" out
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (2, 4)
    assert cl.usage.total == a.usage.total + b.usage.total


def test_concurrency_limit_holds_under_load():
    with StubLLM(latency_s=0.1) as stub:
        cl = closing(OpenAIClient(model="m", base_url=stub.url, concurrency=3, timeout_s=5))

        async def many():
            return await asyncio.gather(*(cl.chat(MSG) for _ in range(9)))

        t = time.monotonic()
        out = run(many())
        assert len(out) == 9 and stub.max_in_flight == 3
        # each concurrent call counts only its own request, and the client sums them
        assert all(c.usage.calls == 1 and c.usage.completion_tokens > 0 for c in out) and cl.usage.calls == 9
        assert time.monotonic() - t >= 0.3 - 0.01


def test_api_key_never_in_repr_or_logs(stub, caplog):
    caplog.set_level(logging.DEBUG)
    stub.fault("503")
    cl = client(stub)
    run(cl.chat(MSG))
    assert "sk-SECRET-123" not in repr(cl)
    assert "sk-SECRET-123" not in caplog.text
    assert "retry 1" in caplog.text


def test_requests_go_under_the_base_path_with_the_key_and_without_the_sdk_telemetry(stub):
    stub.fault("503")
    run(client(stub).chat(MSG))
    assert [path for path, _ in stub.headers] == ["/v1/chat/completions"] * 2      # the call and its retry
    for _, h in stub.headers:
        assert h["authorization"] == "Bearer sk-SECRET-123" and h["content-type"] == "application/json"
        assert not [k for k in h if k.startswith("x-stainless")], h     # left out: each costs the SDK CPU per call


def test_spec_parsing(monkeypatch):
    from interp.settings import get_settings

    base = make_client("baseline")
    assert isinstance(base, NullClient) and is_baseline(base) and base.spec == "baseline"
    assert isinstance(base, LLMClient) and isinstance(make_client("openai:local"), LLMClient)
    local = make_client("openai:local")
    s = get_settings()
    assert local.base_url == f"http://{s.local_llm_host}:{s.local_llm_port}/v1" and local.spec == "openai:local"
    with pytest.raises(InputError, match="unknown LLM spec 'gpt4'"):
        make_client("gpt4")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(InputError, match="needs OPENAI_API_KEY"):
            make_client("openai:gpt-4o-mini")
        monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-abc")
        get_settings.cache_clear()
        c = make_client("openai:some-model")
        assert c.model == "some-model" and "sk-abc" not in repr(c)
    finally:
        get_settings.cache_clear()


def test_null_client_refuses_every_chat_with_one_clear_error():
    with pytest.raises(InputError, match="the baseline has no LLM to call; give an LLM spec"):
        run(NullClient().chat(MSG, max_tokens=5))


def test_grammar_goes_only_to_an_endpoint_that_enforces_it(stub):
    with pytest.raises(LLMError, match="openai:m takes no grammar option"):
        run(client(stub).chat(MSG, grammar='root ::= "x"'))
    assert stub.requests == []
    run(client(stub, grammar_ok=True).chat(MSG, grammar='root ::= "x"', json_mode=True, temperature=0.7))
    body = stub.requests[-1]
    assert body["grammar"] == 'root ::= "x"' and body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0.7


def test_connection_refused_names_the_endpoint_and_the_serve_hint():
    from interp.local_llm import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    cl = closing(OpenAIClient(model="local", base_url=url, api_key="local", spec="openai:local", timeout_s=1,
                              max_retries=0))
    with pytest.raises(LLMError, match=r"connection error: .* from openai:local at .*127\.0\.0\.1.*"
                                       r"gave up after 1 attempts; is `interp llm serve` running\?"):
        run(cl.chat(MSG))


@pytest.mark.parametrize("body", [[], {"choices": []}, {"choices": [{}]}, {"choices": [{"message": None}]},
                                  {"choices": [{"message": {"content": 7}}]},
                                  {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{}]}}]}])
def test_a_json_body_of_another_shape_is_malformed_not_a_crash(body):


    # exactly the exceptions `_attempts` retries as "malformed response"
    with pytest.raises((ValueError, TypeError, AttributeError, KeyError, IndexError)):
        OpenAIClient._completion(body, Usage())


def test_a_completion_body_becomes_plain_records():


    body = {"choices": [{"finish_reason": "stop", "message": {"content": "a\t7", "refusal": None},
                         "logprobs": {"content": [{"token": "7", "logprob": -0.1,
                                                   "top_logprobs": [{"token": "7", "logprob": -0.1},
                                                                    {"token": "8", "logprob": -2.5}]}]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    c = OpenAIClient._completion(body, Usage())
    assert c.text == "a\t7" and c.finish_reason == "stop" and c.refusal is None
    assert c.logprobs[0].token == "7" and c.logprobs[0].top == {"7": -0.1, "8": -2.5}
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (12, 3)
