"""The OpenAI all-at-once simulator: one call per sequence; the simulator writes `token<TAB>N` per token and
each N's expected value is read from its top_logprobs ("0".."10", renormalised). Endpoints without logprobs
get a JSON-mode simulation instead, and the method used is recorded."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from . import prompts
from .llm import Completion, LLMError
from .records import Usage
from .scoring import expected_value

_VALUE_TAB = re.compile(r"\t\s*(\d{1,2})\b")
_VALUE_END = re.compile(r"(\d{1,2})\s*$")
_JSON_OBJ = re.compile(r"\{.*\}", re.S)


@dataclass
class Simulation:
    expected: list[float]
    method: str                     # logprobs | json
    usage: Usage = field(default_factory=Usage)
    missing: int = 0                # tokens the simulator gave no value for (scored as 0)
    failure: str | None = None


def values_from_logprobs(c: Completion, n: int) -> tuple[list[float], int]:
    """Per answer line, the value after the tab (else the last number on the line), as an expected value
    from the top_logprobs of the token where that number starts; line i belongs to token i."""
    text, starts = "", []
    for t in c.logprobs:
        starts.append(len(text))
        text += t.token
    out: list[float] = []
    pos = 0
    for line in text.split("\n"):
        if len(out) == n:
            break
        m = _VALUE_TAB.search(line) or _VALUE_END.search(line)
        if m and line.strip():
            at = pos + m.start(1)
            i = max(j for j, s in enumerate(starts) if s <= at)
            ev = expected_value(c.logprobs[i].top) if text[at:at + 1] == c.logprobs[i].token.strip()[:1] else None
            out.append(ev if ev is not None else float(min(10, int(m.group(1)))))
        pos += len(line) + 1
    missing = n - len(out)
    return out + [0.0] * missing, missing


def values_from_json(text: str, n: int) -> tuple[list[float], int]:
    m = _JSON_OBJ.search(text or "")
    if not m:
        raise ValueError("no JSON object in the answer")
    vals = json.loads(m.group(0)).get("activations")
    if not isinstance(vals, list):
        raise ValueError('no "activations" list in the JSON answer')
    out = [float(min(10, max(0, v))) for v in vals[:n] if isinstance(v, (int, float)) and math.isfinite(v)]
    missing = n - len(out)
    return out + [0.0] * missing, missing


@dataclass
class Simulator:
    client: object
    prompt_version: str = prompts.DEFAULT_VERSIONS["simulate"]
    json_version: str = prompts.DEFAULT_VERSIONS["simulate-json"]
    top_logprobs: int = 15              # enough room for all of "0".."10" next to other candidates
    use_logprobs: bool = True           # turns False for good once the endpoint shows it returns none

    async def simulate(self, label: str, tokens: list[str]) -> Simulation:
        n = len(tokens)
        usage = Usage()
        if self.use_logprobs:
            msgs = prompts.load(self.prompt_version).messages(label=prompts.escape(label),
                                                               tokens=prompts.token_lines(tokens))
            try:
                c = await self.client.chat(msgs, max_tokens=8 * n + 16, logprobs=True, top_logprobs=self.top_logprobs)
            except LLMError as e:
                return Simulation([0.0] * n, "logprobs", usage, n, failure=f"error: {e}")
            usage.add(c.usage)
            if c.logprobs is not None:
                vals, missing = values_from_logprobs(c, n)
                return Simulation(vals, "logprobs", usage, missing)
            if c.text.strip():
                self.use_logprobs = False
        msgs = prompts.load(self.json_version).messages(label=prompts.escape(label), n=n,
                                                         tokens=prompts.token_lines(tokens))
        try:
            c = await self.client.chat(msgs, max_tokens=3 * n + 24, json_mode=True)
            usage.add(c.usage)
            vals, missing = values_from_json(c.text, n)
            return Simulation(vals, "json", usage, missing)
        except LLMError as e:
            return Simulation([0.0] * n, "json", usage, n, failure=f"error: {e}")
        except (ValueError, AttributeError) as e:
            return Simulation([0.0] * n, "json", usage, n, failure=f"unparseable: {e}")
