"""LLM clients behind one small async interface, picked by a spec string.

- `openai:MODEL`  any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp's server) at OPENAI_BASE_URL
- `openai:local`  the llama.cpp server that `interp llm serve` runs (settings.local_llm_host/port)
- `hf:PATH`       a causal LM run in-process through transformers
- `baseline`      no LLM (the explainers and scorers handle it; `make_client` returns None)

Retries are ours (the openai client gets max_retries=0 so they are not layered): exponential backoff with
full jitter, honouring Retry-After. Every call's tokens are counted, retries included.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from sae.errors import InputError

from .records import Usage

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]           # top_logprobs at this position: token -> logprob


@dataclass
class Completion:
    text: str
    logprobs: list[TokenLogprob] | None     # None when the endpoint returned none
    usage: Usage
    refusal: str | None = None
    finish_reason: str | None = None


class LLMError(RuntimeError):
    """A call that failed for good (retries exhausted or not retryable); the message is the reason."""


@dataclass
class Backoff:
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        # full jitter spreads synchronized clients apart; Retry-After is a floor the server asked for
        d = random.uniform(0, min(self.max_s, self.base_s * 2 ** attempt))
        return max(d, retry_after) if retry_after is not None else d


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
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


@dataclass
class OpenAIClient:
    """AsyncOpenAI with a concurrency limit, timeouts and our own retries. Create it inside the event loop
    that uses it (a Celery task: one loop and one client per task run); its connection pool is per loop."""
    model: str
    base_url: str | None = None
    api_key: str = "none"
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff: Backoff = field(default_factory=Backoff)
    spec: str = ""
    # llama.cpp's server takes a GBNF `grammar` that fixes the answer's shape; other endpoints get none
    grammar_ok: bool = False

    def __post_init__(self):
        import openai

        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                          max_retries=0, timeout=self.timeout_s)
        self._sem = asyncio.Semaphore(self.concurrency)
        self.usage = Usage()
        self.spec = self.spec or f"openai:{self.model}"
        self.retries = 0

    def __repr__(self) -> str:      # never the key
        return f"OpenAIClient(model={self.model!r}, base_url={self.base_url!r})"

    async def chat(self, messages: list[dict], *, max_tokens: int = 256, logprobs: bool = False,
                   top_logprobs: int = 0, json_mode: bool = False, temperature: float = 0.0,
                   grammar: str | None = None) -> Completion:
        import openai

        kwargs = dict(model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        if grammar is not None and self.grammar_ok:
            kwargs["extra_body"] = {"grammar": grammar}
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=top_logprobs)
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        spent = Usage()
        for attempt in range(self.max_retries + 1):
            retry_after, reason = None, ""
            try:
                async with self._sem:
                    resp = await self._client.chat.completions.create(**kwargs)
                if not getattr(resp, "choices", None):
                    raise ValueError("response has no choices")
                return self._completion(resp, spent)
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS:
                    raise LLMError(f"HTTP {e.status_code} from {self.spec}: {_short(e)}") from None
                retry_after, reason = _retry_after(e.response.headers), f"HTTP {e.status_code}"
            except openai.APITimeoutError:
                reason = f"timeout after {self.timeout_s:g}s"
            except openai.APIConnectionError as e:
                reason = f"connection error: {_short(e)}"
            except (ValueError, TypeError, AttributeError, openai.APIResponseValidationError) as e:
                # malformed JSON or a body that is not a chat completion
                reason = f"malformed response: {_short(e)}"
            spent.calls += 1
            if attempt == self.max_retries:
                self.usage.add(spent)
                hint = ("; is `interp llm serve` running?" if self.spec == "openai:local" and
                        reason.startswith("connection") else "")
                raise LLMError(f"{reason} from {self.spec} at {self.base_url}, gave up after {attempt + 1} attempts{hint}")
            self.retries += 1
            delay = self.backoff.delay(attempt, retry_after)
            log.info("%s: %s, retry %d in %.2fs", self.spec, reason, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _completion(self, resp, spent: Usage) -> Completion:
        ch = resp.choices[0]
        msg = ch.message
        u = resp.usage
        spent.prompt_tokens += getattr(u, "prompt_tokens", 0) or 0
        spent.completion_tokens += getattr(u, "completion_tokens", 0) or 0
        spent.calls += 1
        self.usage.add(spent)
        lps = None
        if ch.logprobs is not None and ch.logprobs.content:
            lps = [TokenLogprob(t.token, t.logprob, {x.token: x.logprob for x in (t.top_logprobs or [])})
                   for t in ch.logprobs.content]
        return Completion(text=msg.content or "", logprobs=lps, usage=spent,
                          refusal=getattr(msg, "refusal", None), finish_reason=ch.finish_reason)

    async def close(self) -> None:
        await self._client.close()


def _short(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


@dataclass
class HFClient:
    """A local causal LM through transformers; calls run one at a time in a worker thread."""
    path: str
    device: str = "auto"
    spec: str = ""

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
            raise InputError(f"cannot load a causal LM from {self.path!r} ({_short(e)}); "
                             "hf:PATH needs a local directory or Hugging Face id of a causal LM") from None
        self._lock = asyncio.Lock()
        self.usage = Usage()

    def _prompt_ids(self, messages):
        if getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        text = "\n\n".join(m["content"] for m in messages) + "\n"
        return self._tok(text, return_tensors="pt").input_ids

    def _generate(self, messages, max_tokens, top_logprobs) -> Completion:
        import torch

        ids = self._prompt_ids(messages).to(self._device)
        with torch.no_grad():
            out = self._model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True,
                                       pad_token_id=self._tok.pad_token_id or self._tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:]
        lps = []
        for tok_id, scores in zip(new.tolist(), out.scores):
            logp = torch.log_softmax(scores[0].float(), dim=-1)
            top = torch.topk(logp, max(1, top_logprobs))
            lps.append(TokenLogprob(self._tok.decode([tok_id]), float(logp[tok_id]),
                                    {self._tok.decode([i]): float(v) for v, i in zip(top.values, top.indices)}))
        if self._tok.eos_token_id is not None and new.numel() and new[-1].item() == self._tok.eos_token_id:
            lps = lps[:-1]
        usage = Usage(prompt_tokens=ids.shape[1], completion_tokens=len(new), calls=1)
        self.usage.add(usage)
        return Completion(text=self._tok.decode(new, skip_special_tokens=True), logprobs=lps, usage=usage)

    async def chat(self, messages, *, max_tokens=256, logprobs=False, top_logprobs=0, json_mode=False,
                   temperature=0.0, grammar=None) -> Completion:
        async with self._lock:
            return await asyncio.to_thread(self._generate, messages, max_tokens, top_logprobs if logprobs else 1)

    async def close(self) -> None:
        pass


def make_client(spec: str, *, concurrency: int | None = None, timeout_s: float | None = None,
                max_retries: int | None = None, backoff: Backoff | None = None):
    """The client for a spec; None for `baseline`. Bad specs raise InputError with the accepted forms."""
    from .settings import get_settings

    s = get_settings()
    common = dict(concurrency=concurrency or s.llm_concurrency, timeout_s=timeout_s or s.llm_timeout_s,
                  max_retries=s.llm_max_retries if max_retries is None else max_retries,
                  backoff=backoff or Backoff())
    kind, _, rest = spec.partition(":")
    if spec == "baseline":
        return None
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
