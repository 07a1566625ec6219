"""LLM clients behind one small async interface (`LLMClient`), picked by a spec string.

- `openai:MODEL`  any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp's server) at OPENAI_BASE_URL
- `openai:local`  the llama.cpp server that `interp llm serve` runs (settings.local_llm_host/port)
- `hf:PATH`       a causal LM run in-process through transformers
- `baseline`      no LLM: a `NullClient`, whose chat refuses; the explainers and scorers check `is_baseline`

Every chat option is honoured or refused with an LLMError that names it; none is silently dropped.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from sae.errors import InputError, first_line

from .records import Usage

log = logging.getLogger(__name__)
# the SDK's telemetry headers: per client, then per request (its own retries are counted by our hooks)
TELEMETRY = ("X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS", "X-Stainless-Arch",
             "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Async")
TELEMETRY_PER_REQUEST = ("X-Stainless-Retry-Count", "X-Stainless-Read-Timeout")
# the statuses the openai SDK retries itself (its _should_retry): a failure with one of these came after retries
SDK_RETRIED = {408, 409, 429}


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]           # top_logprobs at this position: token -> logprob


@dataclass
class Completion:
    text: str
    logprobs: list[TokenLogprob] | None     # None when the endpoint returned none (or none was asked for)
    usage: Usage
    refusal: str | None = None
    finish_reason: str | None = None


class LLMError(RuntimeError):
    """A call that failed for good (retries exhausted, not retryable, or an option the client cannot honour)."""


@runtime_checkable
class LLMClient(Protocol):
    """What the explainers and scorers need of an LLM. `usage` sums every call's tokens; `grammar_ok` says
    whether `chat(grammar=...)` is enforced (otherwise it is refused, so callers check it first)."""
    spec: str
    usage: Usage
    grammar_ok: bool

    async def chat(self, messages: list[dict], *, max_tokens: int = 256, logprobs: bool = False,
                   top_logprobs: int = 0, json_mode: bool = False, temperature: float = 0.0,
                   grammar: str | None = None) -> Completion: ...

    async def close(self) -> None: ...


def is_baseline(client: LLMClient) -> bool:
    return isinstance(client, NullClient)


@dataclass
class NullClient:
    """`baseline`: no LLM. The explainer and scorers take their LLM-free paths for it; a chat is a bug or a
    scorer that needs an LLM, so it fails loudly."""
    spec: str = "baseline"
    usage: Usage = field(default_factory=Usage)
    grammar_ok: bool = False

    async def chat(self, messages, **options) -> Completion:
        raise InputError("the baseline has no LLM to call; give an LLM spec (openai:MODEL, openai:local or "
                         "hf:PATH) for the explainer or simulator that needs one")

    async def close(self) -> None:
        pass


@dataclass
class Backoff:
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        # full jitter spreads synchronized clients apart
        return random.uniform(0, min(self.max_s, self.base_s * 2 ** attempt))


def retry_after_s(headers) -> float | None:
    """Seconds a 429/503 asked us to wait (retry-after-ms, or Retry-After as seconds or an HTTP date)."""
    v = headers.get("retry-after-ms")
    if v:
        try:
            return float(v) / 1000.0
        except ValueError:
            pass
    v = headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _refusal_cause(e: BaseException) -> BaseException | None:
    """The aiohttp connector error under a timeout, if that is what it was: the SDK's aiohttp transport maps every
    aiohttp connection error, a refused connection included, to a connect timeout (its table tests the base class
    first), and "connection refused" must not read as "timeout"."""
    import aiohttp

    while e is not None:
        if isinstance(e, aiohttp.ClientConnectorError):
            return e
        e = e.__cause__ or e.__context__
    return None


# the Usage of the chat() call running in this task, so the httpx hooks can count the SDK's hidden retries
_CALL: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("llm_call", default=None)


@dataclass
class OpenAIClient:
    """AsyncOpenAI with a concurrency limit and timeouts. Create it inside the event loop that uses it (a Celery
    task: one loop and one client per task run); its connection pool is per loop.

    Who retries what, so that no two loops are layered:
    - the SDK (max_retries): 408/409/429/5xx, connection errors and timeouts, with its exponential backoff and
      Retry-After (up to 60 s);
    - ours: a 200 whose body is no chat completion (malformed JSON, no choices). The SDK only parses it and
      never retries it; we ask again, up to max_retries times, after `backoff`;
    - ours: every 429 is reported to `on_rate_limited(retry_after_s)` and counted in `rate_limited`, including
      those the SDK retried away (an httpx response hook sees them): the workers' shared rate limiter needs them.
    """
    model: str
    base_url: str | None = None
    api_key: str = field(default="none", repr=False)
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff: Backoff = field(default_factory=Backoff)
    spec: str = ""
    # llama.cpp's server takes a GBNF `grammar` that fixes the answer's shape; other endpoints refuse one
    grammar_ok: bool = False
    on_rate_limited: Callable[[float | None], None] | None = None

    def __post_init__(self):
        import openai

        # aiohttp under the SDK's httpx2 interface: about half the client CPU of the default transport per call,
        # which is most of a worker's CPU at 64 calls in flight
        http = openai.DefaultAioHttpClient(event_hooks={"request": [self._on_request],
                                                        "response": [self._on_response]})
        # the SDK's telemetry headers (X-Stainless-*) left out with its own `omit`: no endpoint needs them, and
        # its httpx layer normalises every header some six times per request
        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                          max_retries=self.max_retries, timeout=self.timeout_s, http_client=http,
                                          default_headers=dict.fromkeys(TELEMETRY, openai.omit))
        self._url = f"{str(self._client.base_url).rstrip('/')}/chat/completions"   # absolute: one parse less
        self._omit = dict.fromkeys(TELEMETRY_PER_REQUEST, openai.omit)
        self._sem = asyncio.Semaphore(self.concurrency)
        self.usage = Usage()
        self.spec = self.spec or f"openai:{self.model}"
        self.retries = 0            # requests beyond each call's first, the SDK's and ours
        self.rate_limited = 0       # 429 answers seen
        self._key_prefix, self._keys = uuid.uuid4().hex, 0

    def _next_key(self) -> str:
        # what the SDK would send, unique per request and the same over its retries, without a uuid4 per call
        self._keys += 1
        return f"stainless-python-retry-{self._key_prefix}-{self._keys}"

    def __repr__(self) -> str:      # never the key
        return f"OpenAIClient(model={self.model!r}, base_url={self.base_url!r})"

    async def _on_request(self, request) -> None:
        spent = _CALL.get()
        if spent is None:
            return
        if spent.calls:
            self.retries += 1
            log.info("%s: retry %d", self.spec, spent.calls)
        spent.calls += 1

    async def _on_response(self, response) -> None:
        if response.status_code == 429:
            self.rate_limited += 1
            wait = retry_after_s(response.headers)
            log.info("%s: HTTP 429, Retry-After %s", self.spec, wait)
            if self.on_rate_limited is not None:
                self.on_rate_limited(wait)
        elif response.status_code >= 400:
            log.info("%s: HTTP %d", self.spec, response.status_code)

    async def chat(self, messages: list[dict], *, max_tokens: int = 256, logprobs: bool = False,
                   top_logprobs: int = 0, json_mode: bool = False, temperature: float = 0.0,
                   grammar: str | None = None) -> Completion:
        kwargs = dict(model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        if grammar is not None:
            if not self.grammar_ok:
                raise LLMError(f"{self.spec} takes no grammar option (llama.cpp's server, openai:local, does)")
            kwargs["grammar"] = grammar
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=top_logprobs)
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        spent = Usage()
        token = _CALL.set(spent)
        try:
            return await self._attempts(kwargs, spent)
        finally:
            _CALL.reset(token)
            self.usage.add(spent)

    async def _attempts(self, kwargs: dict, spent: Usage) -> Completion:
        import httpx2
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                async with self._sem:
                    # the SDK's documented raw request (its retries, timeouts and errors, as `create` has):
                    # `create` spends more CPU on transforming the typed params and building pydantic models
                    # than on the HTTP call; the body is read here into plain records instead
                    resp = await self._client.post(self._url, body=kwargs, cast_to=httpx2.Response,
                                                   options={"idempotency_key": self._next_key(),
                                                            "headers": self._omit})
                return self._completion(json.loads(resp.content), spent)
            except openai.APIStatusError as e:
                code = e.status_code
                if code in SDK_RETRIED or code >= 500:
                    raise self._gave_up(f"HTTP {code}", spent) from None
                raise LLMError(f"HTTP {code} from {self.spec} at {self._client.base_url}: {first_line(e)}") from None
            except openai.APITimeoutError as e:
                if (refused := _refusal_cause(e)) is not None:
                    raise self._gave_up(f"connection error: {first_line(refused)}", spent) from None
                raise self._gave_up(f"timeout after {self.timeout_s:g}s", spent) from None
            except openai.APIConnectionError as e:
                raise self._gave_up(f"connection error: {first_line(e.__cause__ or e)}", spent) from None
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
                reason = f"malformed response: {first_line(e)}"
            if attempt == self.max_retries:
                raise self._gave_up(reason, spent)
            await asyncio.sleep(self.backoff.delay(attempt))
        raise AssertionError("unreachable")

    def _gave_up(self, reason: str, spent: Usage) -> LLMError:
        hint = ("; is `interp llm serve` running?" if self.spec == "openai:local" and
                reason.startswith("connection") else "")
        return LLMError(f"{reason} from {self.spec} at {self._client.base_url}, "
                        f"gave up after {spent.calls} attempts{hint}")

    @staticmethod
    def _completion(body: dict, spent: Usage) -> Completion:
        """A chat completion's JSON body as a Completion; a body of another shape raises (ValueError, KeyError,
        TypeError...), which `_attempts` retries as malformed."""
        if not isinstance(body, dict) or not body.get("choices"):
            raise ValueError("response has no choices")
        ch = body["choices"][0]
        msg = ch["message"]
        u = body.get("usage") or {}
        spent.prompt_tokens += u.get("prompt_tokens") or 0
        spent.completion_tokens += u.get("completion_tokens") or 0
        content = (ch.get("logprobs") or {}).get("content")
        lps = None
        if content:
            lps = [TokenLogprob(t["token"], float(t["logprob"]),
                                {x["token"]: float(x["logprob"]) for x in (t.get("top_logprobs") or [])})
                   for t in content]
        text = msg.get("content")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"message content is {type(text).__name__}, not text")
        return Completion(text=text or "", logprobs=lps, usage=spent, refusal=msg.get("refusal"),
                          finish_reason=ch.get("finish_reason"))

    async def close(self) -> None:
        await self._client.close()


@dataclass
class HFClient:
    """A local causal LM through transformers; calls run one at a time in a worker thread. It samples when
    temperature > 0 and returns logprobs when asked; it cannot constrain generation, so json_mode and grammar
    are refused."""
    path: str
    device: str = "auto"
    spec: str = ""
    grammar_ok: bool = False

    def __post_init__(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae.models import pick_device

        self.spec = self.spec or f"hf:{self.path}"
        self._device = pick_device(self.device)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path)
            dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
            self._model = AutoModelForCausalLM.from_pretrained(self.path, torch_dtype=dtype).to(self._device).eval()
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load a causal LM from {self.path!r} ({first_line(e)}); "
                             "hf:PATH needs a local directory or Hugging Face id of a causal LM") from None
        self._lock = asyncio.Lock()
        self.usage = Usage()

    def _prompt_ids(self, messages):
        if getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        text = "\n\n".join(m["content"] for m in messages) + "\n"
        return self._tok(text, return_tensors="pt").input_ids

    def _generate(self, messages, max_tokens: int, temperature: float, top_logprobs: int | None) -> Completion:
        import torch

        ids = self._prompt_ids(messages).to(self._device)
        # top_k=0 samples from the whole distribution, as an OpenAI endpoint does at that temperature
        sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = self._model.generate(ids, max_new_tokens=max_tokens, output_logits=True,
                                       return_dict_in_generate=True,
                                       pad_token_id=self._tok.pad_token_id or self._tok.eos_token_id, **sampling)
        new = out.sequences[0, ids.shape[1]:]
        lps = None
        if top_logprobs is not None:
            lps = []
            # the raw logits: logprobs of the model's distribution, not of the temperature-scaled one
            for tok_id, logits in zip(new.tolist(), out.logits):
                logp = torch.log_softmax(logits[0].float(), dim=-1)
                top = torch.topk(logp, max(1, top_logprobs))
                lps.append(TokenLogprob(self._tok.decode([tok_id]), float(logp[tok_id]),
                                        {self._tok.decode([i]): float(v) for v, i in zip(top.values, top.indices)}))
            if self._tok.eos_token_id is not None and new.numel() and new[-1].item() == self._tok.eos_token_id:
                lps = lps[:-1]
        usage = Usage(prompt_tokens=ids.shape[1], completion_tokens=len(new), calls=1)
        self.usage.add(usage)
        return Completion(text=self._tok.decode(new, skip_special_tokens=True), logprobs=lps, usage=usage)

    async def chat(self, messages: list[dict], *, max_tokens: int = 256, logprobs: bool = False,
                   top_logprobs: int = 0, json_mode: bool = False, temperature: float = 0.0,
                   grammar: str | None = None) -> Completion:
        for option, given in (("json_mode", json_mode), ("grammar", grammar is not None)):
            if given:
                raise LLMError(f"{self.spec} cannot honour {option}: transformers generates unconstrained here; "
                               "use openai:local (llama.cpp) or an OpenAI-compatible endpoint for it")
        async with self._lock:
            return await asyncio.to_thread(self._generate, messages, max_tokens, temperature,
                                           top_logprobs if logprobs else None)

    async def close(self) -> None:
        pass


def make_client(spec: str, *, concurrency: int | None = None, timeout_s: float | None = None,
                max_retries: int | None = None, backoff: Backoff | None = None,
                on_rate_limited: Callable[[float | None], None] | None = None) -> LLMClient:
    """The client for a spec (a NullClient for `baseline`). Bad specs raise InputError with the accepted forms."""
    from .settings import get_settings

    s = get_settings()
    common = dict(concurrency=concurrency or s.llm_concurrency, timeout_s=timeout_s or s.llm_timeout_s,
                  max_retries=s.llm_max_retries if max_retries is None else max_retries,
                  backoff=backoff or Backoff(), on_rate_limited=on_rate_limited)
    kind, _, rest = spec.partition(":")
    if spec == "baseline":
        return NullClient()
    if kind == "openai" and rest == "local":
        # llama.cpp's server answers one request at a time: queueing more there only runs their timeouts down
        common.update(concurrency=concurrency or 1, timeout_s=timeout_s or max(s.llm_timeout_s, 300.0))
        return OpenAIClient(model="local", base_url=local_base_url(), api_key="local", spec=spec, grammar_ok=True,
                            **common)
    if kind == "openai" and rest:
        key = s.openai_api_key.get_secret_value()
        if not key and not s.openai_base_url:
            raise InputError(f"{spec} needs OPENAI_API_KEY (and OPENAI_BASE_URL for a non-OpenAI endpoint); "
                             "or use openai:local after `interp llm serve`, or baseline")
        return OpenAIClient(model=rest, base_url=s.openai_base_url, api_key=key or "none", spec=spec, **common)
    if kind == "hf" and rest:
        return HFClient(rest, device=s.device, spec=spec)
    raise InputError(f"unknown LLM spec {spec!r}; use openai:MODEL, openai:local, hf:PATH or baseline")


def local_base_url() -> str:
    from .settings import get_settings

    s = get_settings()
    return f"http://{s.local_llm_host}:{s.local_llm_port}/v1"
