"""The OpenAI all-at-once simulator: one call per sequence; the simulator writes `token<TAB>N` per token and
each N's expected value is read from its top_logprobs ("0".."10", renormalised; a 10 that the tokenizer
splits into "1","0" is read jointly). Endpoints without logprobs
get a JSON-mode simulation instead, and the method used is recorded."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from . import prompts
from .llm import Completion, LLMClient, LLMError
from .records import Usage
from .scoring import expected_value_split

_VALUE_TAB = re.compile(r"\t\s*(\d{1,2})\b")
_JSON_OBJ = re.compile(r"\{.*\}", re.S)


@dataclass
class Simulation:
    expected: list[float]
    method: str                     # logprobs | json
    usage: Usage = field(default_factory=Usage)
    missing: int = 0                # tokens the simulator gave no value for (scored as 0)
    sampled: int = 0                # tokens valued by the written integer: no value in their top_logprobs
    failure: str | None = None


@dataclass
class Parsed:
    """Values read from one answer: `missing` tokens got no value (scored as 0); `sampled` got the integer
    the simulator wrote because its top_logprobs held no value at all (neuron-explainer scores those 0; we
    keep the written integer, the model's own answer, and count it so a score can say how much rests on it)."""
    values: list[float]
    missing: int = 0
    sampled: int = 0


def _p_zero_after_one(c: Completion, i: int) -> float:
    """q = P("0" | the value started with "1"), from the position after i: observable only when the token
    at i was the lone digit "1" (the next position's logprobs are conditioned on the token actually taken)."""
    if c.logprobs[i].token.strip() != "1" or i + 1 >= len(c.logprobs):
        return 0.0
    lp = c.logprobs[i + 1].top.get("0")
    return math.exp(lp) if lp is not None else 0.0


def values_from_logprobs(c: Completion, lines: list[str]) -> Parsed:
    """Each answer line `token<TAB>N` gives its token's value, as the expected value over the top_logprobs of
    the token where N starts, with 10 read jointly over "1","0" where the tokenizer splits it
    (expected_value_split). Lines are matched to the prompt's token lines by name, in order (a line that
    names no upcoming token is skipped), so a simulator that drops or invents lines cannot shift values
    onto the wrong tokens. Unmatched tokens get 0 and are counted as missing."""
    text, starts = "", []
    for t in c.logprobs:
        starts.append(len(text))
        text += t.token
    n = len(lines)
    out: list[float | None] = [None] * n
    sampled = 0
    cursor, pos = 0, 0
    for line in text.split("\n"):
        m = _VALUE_TAB.search(line)
        if m and cursor < n:
            name = line[:m.start()].strip()
            j = next((k for k in range(cursor, min(n, cursor + 4)) if lines[k].strip() == name), None)
            if j is not None:
                at = pos + m.start(1)
                i = max(k for k, s in enumerate(starts) if s <= at)
                ev = None
                if c.logprobs[i].token.strip()[:1] == text[at]:
                    ev = expected_value_split(c.logprobs[i].top, _p_zero_after_one(c, i))
                if ev is None:
                    sampled += 1
                out[j] = ev if ev is not None else float(min(10, int(m.group(1))))
                cursor = j + 1
        pos += len(line) + 1
    return Parsed([0.0 if v is None else v for v in out], sum(v is None for v in out), sampled)


def _gbnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02X}" if ord(ch) < 0x100 else f"\\u{ord(ch):04X}")
    return '"' + "".join(out) + '"'


def answer_grammar(lines: list[str]) -> str:
    """A GBNF grammar that admits exactly one `token<TAB>N` line per prompt token, in order: where the endpoint
    enforces it (llama.cpp), a small model can no longer drop or reorder lines, it only chooses the numbers."""
    body = " ".join(f"{_gbnf_literal(line + chr(9))} v {_gbnf_literal(chr(10))}" for line in lines)
    return f'root ::= {body}\nv ::= "10" | [0-9]\n'


def values_from_json(text: str, n: int) -> Parsed:
    """The JSON-mode answer: each entry in its own token's place; a non-numeric entry is a missing value
    there (0), never a reason to shift the later values left."""
    m = _JSON_OBJ.search(text or "")
    if not m:
        raise ValueError("no JSON object in the answer")
    vals = json.loads(m.group(0)).get("activations")
    if not isinstance(vals, list):
        raise ValueError('no "activations" list in the JSON answer')
    out = [float(min(10, max(0, v))) if _is_number(v) else None for v in vals[:n]]
    out += [None] * (n - len(out))
    return Parsed([0.0 if v is None else v for v in out], sum(v is None for v in out))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Simulator:
    client: LLMClient
    prompt_version: str = prompts.DEFAULT_VERSIONS["simulate"]
    json_version: str = prompts.DEFAULT_VERSIONS["simulate-json"]
    top_logprobs: int = 15              # enough room for all of "0".."10" next to other candidates
    use_logprobs: bool = True           # turns False for good once the endpoint shows it returns none

    async def simulate(self, label: str, tokens: list[str]) -> Simulation:
        n = len(tokens)
        usage = Usage()
        if self.use_logprobs:
            lines = prompts.token_lines(tokens)
            msgs = prompts.load(self.prompt_version).messages(label=prompts.escape(label), tokens=lines)
            try:
                # where the endpoint enforces a grammar, the answer's shape is fixed; the others refuse one
                grammar = answer_grammar(lines.split("\n")) if self.client.grammar_ok else None
                c = await self.client.chat(msgs, max_tokens=6 * n + 16, logprobs=True, top_logprobs=self.top_logprobs,
                                           grammar=grammar)
            except LLMError as e:
                return Simulation([0.0] * n, "logprobs", usage, n, failure=f"error: {e}")
            usage.add(c.usage)
            if c.logprobs is not None:
                p = values_from_logprobs(c, lines.split("\n"))
                return Simulation(p.values, "logprobs", usage, p.missing, p.sampled)
            if c.text.strip():
                self.use_logprobs = False
        msgs = prompts.load(self.json_version).messages(label=prompts.escape(label), n=n,
                                                         tokens=prompts.token_lines(tokens))
        try:
            c = await self.client.chat(msgs, max_tokens=3 * n + 24, json_mode=True)
            usage.add(c.usage)
            p = values_from_json(c.text, n)
            return Simulation(p.values, "json", usage, p.missing)
        except LLMError as e:
            return Simulation([0.0] * n, "json", usage, n, failure=f"error: {e}")
        except (ValueError, AttributeError) as e:
            return Simulation([0.0] * n, "json", usage, n, failure=f"unparseable: {e}")
