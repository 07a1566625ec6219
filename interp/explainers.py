"""Explainers: an LLM reading the explain set, or the `baseline` built from its token statistics.

Only the explain split is ever read here; scorers read the score split (see interp.scorers).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from sae.records import Example, FeatureExamples

from . import prompts
from .llm import LLMClient, LLMError
from .records import Explanation, Usage


def token_strings(ex: Example) -> list[str]:
    return ex.tokens if ex.tokens is not None else [f"#{t}" for t in ex.token_ids]


def window(ex: Example, width: int) -> tuple[list[str], list[float]]:
    """At most `width` tokens, with the peak two thirds of the way in (context before matters more)."""
    toks, acts = token_strings(ex), list(ex.acts)
    if len(toks) <= width:
        return toks, acts
    start = min(max(0, ex.max_pos - (2 * width) // 3), len(toks) - width) if ex.max_act > 0 else 0
    return toks[start:start + width], acts[start:start + width]


def select_explain(fe: FeatureExamples, n: int, n_top: int) -> list[Example]:
    """`n_top` top examples, the rest drawn round-robin across quantile bins (highest first): labels drawn
    from top examples alone generalise worse."""
    pool = [e for e in fe.split("explain") if e.max_act > 0]
    top = sorted((e for e in pool if e.kind == "top"), key=lambda e: -e.max_act)
    bins: dict[int, list[Example]] = {}
    for e in pool:
        if e.kind == "quantile":
            bins.setdefault(e.quantile_bin or 0, []).append(e)
    chosen = top[:n_top]
    queues = [sorted(v, key=lambda e: -e.max_act) for _, v in sorted(bins.items(), reverse=True)]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    rest = [e for e in top[n_top:] if len(chosen) < n]
    return chosen + rest[:n - len(chosen)]


@dataclass
class LLMExplainer:
    client: LLMClient
    n_examples: int = 12
    n_top: int = 4
    width: int = 24
    attempts: int = 3
    max_tokens: int = 60
    prompt_version: str = prompts.DEFAULT_VERSIONS["explain"]

    def messages(self, chosen: list[Example]) -> list[dict]:
        snippets = [window(e, self.width) for e in chosen]
        max_act = max(max(a) for _, a in snippets)
        # every version gets both values; templates before explain-v3 do not use $top_tokens
        return prompts.load(self.prompt_version).messages(examples=prompts.explain_block(snippets, max_act),
                                                          top_tokens=prompts.top_tokens(snippets, max_act))

    async def explain(self, fe: FeatureExamples) -> Explanation:
        chosen = select_explain(fe, self.n_examples, self.n_top)
        rec = Explanation(sae=fe.sae, index=fe.index, label=None, explainer=self.client.spec,
                          prompt_version=self.prompt_version, attempts=0)
        if not chosen:
            rec.failure = "no activating examples in the explain set"
            return rec
        messages = self.messages(chosen)
        # where the endpoint enforces a grammar (llama.cpp) the answer can only be one short label line
        grammar = prompts.LABEL_GRAMMAR if self.client.grammar_ok else None
        for attempt in range(self.attempts):
            rec.attempts = attempt + 1
            try:
                # a retry after a bad answer samples instead of repeating the same greedy answer
                c = await self.client.chat(messages, max_tokens=self.max_tokens,
                                           temperature=0.0 if attempt == 0 else 0.7, grammar=grammar)
            except LLMError as e:
                rec.failure = f"error: {e}"
                return rec
            rec.usage.add(c.usage)
            try:
                rec.label, rec.failure = prompts.parse_label(c.text, c.refusal), None
                return rec
            except prompts.LabelError as e:
                rec.failure = str(e)
        return rec


def _kind(tok: str) -> str | None:
    t = tok.strip()
    if not t:
        return None
    if t.isdigit():
        return "digit tokens"
    if t.isalpha() and t[0].isupper() and (len(t) == 1 or t[1:].islower() or t.isupper()):
        return "capitalised words"
    if all(not ch.isalnum() for ch in t):
        return "punctuation"
    return None


@dataclass
class BaselineExplainer:
    """No LLM: the tokens that fire most relative to how often they occur (the random examples stand in for
    the corpus), their shared character class, and whether they sit at line starts or after one token."""
    spec: str = "baseline"
    prompt_version: str = "baseline-v1"
    peak_frac: float = 0.5          # a position "fires" at >= this fraction of its example's peak
    max_tokens_named: int = 3

    async def explain(self, fe: FeatureExamples) -> Explanation:
        return self.explain_sync(fe)

    def explain_sync(self, fe: FeatureExamples) -> Explanation:
        rec = Explanation(sae=fe.sae, index=fe.index, label=None, explainer=self.spec,
                          prompt_version=self.prompt_version, is_baseline=True, usage=Usage())
        exs = fe.split("explain")
        firing, prev = Counter(), Counter()
        for e in exs:
            if e.max_act <= 0 or e.kind == "random":
                continue
            toks = token_strings(e)
            for i, a in enumerate(e.acts):
                if a > 0 and a >= self.peak_frac * e.max_act:
                    firing[toks[i]] += 1
                    prev[toks[i - 1] if i else "\n"] += 1
        if not firing:
            rec.failure = "no activating examples in the explain set"
            return rec
        ref = [t for e in exs if e.kind == "random" for t in token_strings(e)] or \
              [t for e in exs for t in token_strings(e)]
        ref_counts, n_ref, n_fire = Counter(ref), len(ref), sum(firing.values())

        def lift(t: str) -> float:  # add-one smoothing keeps unseen reference tokens finite
            return (firing[t] / n_fire) / ((ref_counts[t] + 1) / (n_ref + len(ref_counts) + 1))

        ranked = sorted(firing, key=lambda t: -firing[t] * math.log(max(lift(t), 1.0 + 1e-9)))
        named = [t for t in ranked[:self.max_tokens_named] if firing[t] >= 0.1 * n_fire] or ranked[:1]
        kinds = Counter(_kind(t) for t in firing.elements())
        kind, kind_n = kinds.most_common(1)[0]
        quoted = ", ".join(f'"{t}"' for t in named)
        if kind and kind_n >= 0.8 * n_fire and sum(firing[t] for t in named) < 0.8 * n_fire:
            label = f"{kind} (e.g. {quoted})"
        else:
            label = f"tokens {quoted}"
        line_starts = sum(c for p, c in prev.items() if p.endswith("\n"))
        top_prev, top_prev_n = prev.most_common(1)[0]
        if line_starts >= 0.6 * n_fire:
            label += " at line starts"
        elif top_prev_n >= 0.6 * n_fire:
            label += f' after "{top_prev}"'
        rec.label = prompts.clean_label(label.replace("\n", "\\n"))
        return rec
