"""Planted features: rules ("fires on digits", "fires on the token def", ...) applied to the builtin corpus,
harvested into FeatureExamples the way the real harvest does (top, quantile bins, random; disjoint explain
and score splits), each with a correct label. Used by the planted-feature tests and bench/label_quality.py."""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable

from sae.corpus import iter_texts
from sae.records import Example, FeatureExamples

_TOKEN = re.compile(r"\n|[ ]?[A-Za-z_]+|[ ]?\d|[ ]?[^\w\s]|[ \t]+")


@dataclass(frozen=True)
class Rule:
    name: str
    label: str                          # the correct label a good explainer should find
    fires: Callable[[str, str], bool]   # (token, previous token) -> fires?


RULES = [
    Rule("digits", "digits and numbers", lambda t, p: t.strip().isdigit()),
    Rule("def", 'the Python keyword "def" that starts a function definition', lambda t, p: t.strip() == "def"),
    Rule("capitalised", "words starting with a capital letter",
         lambda t, p: len(t.strip()) > 1 and t.strip().isalpha() and t.strip()[0].isupper() and t.strip()[1:].islower()),
    Rule("self", 'the word "self", a method\'s instance argument', lambda t, p: t.strip() == "self"),
    Rule("return", 'the "return" keyword in a function', lambda t, p: t.strip() == "return"),
    Rule("import", 'the "import" keyword importing modules', lambda t, p: t.strip() == "import"),
    Rule("comment", "the # sign that starts a code comment", lambda t, p: t.strip() == "#"),
    Rule("paren_open", "an opening parenthesis ( of a call", lambda t, p: t.strip() == "("),
]


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def contexts(n: int = 3000, ctx_len: int = 32, seed: int = 0) -> list[list[str]]:
    stream: list[str] = []
    for text in iter_texts("builtin", seed=seed):
        stream.extend(tokenize(text))
        if len(stream) >= 2 * n * ctx_len:
            break
    # duplicates (licence headers) would put one snippet in both splits
    seen, out = set(), []
    for i in range(0, len(stream) - ctx_len + 1, ctx_len):
        c = stream[i:i + ctx_len]
        if tuple(c) not in seen:
            seen.add(tuple(c))
            out.append(c)
    return out[:n]


def _strength(token: str, i: int) -> float:
    # deterministic spread in [0.5, 1.5] so quantiles and the 0-10 scale mean something
    return 0.5 + (zlib.crc32(f"{token}{i}".encode()) % 1000) / 1000


def plant(rule: Rule, ctxs: list[list[str]], index: int, n_top: int = 20, n_bins: int = 4, per_bin: int = 4,
          n_random: int = 20, seed: int = 0) -> FeatureExamples:
    def example(ci, kind, split, qbin=None):
        toks = ctxs[ci]
        acts = [_strength(t, j) if rule.fires(t, toks[j - 1] if j else "\n") else 0.0 for j, t in enumerate(toks)]
        return Example(token_ids=[zlib.crc32(t.encode()) for t in toks], acts=acts, kind=kind, split=split,
                       quantile_bin=qbin, tokens=list(toks))

    rng = random.Random(seed * 7919 + index)
    maxes = [(max((_strength(t, j) for j, t in enumerate(c) if rule.fires(t, c[j - 1] if j else "\n")), default=0.0), ci)
             for ci, c in enumerate(ctxs)]
    active = [ci for m, ci in sorted(maxes, reverse=True) if m > 0]
    exs = []
    for r, ci in enumerate(active[:n_top]):
        exs.append(example(ci, "top", "explain" if r % 2 == 0 else "score"))
    rest = active[n_top:]
    for b in range(n_bins):
        chunk = rest[b * len(rest) // n_bins:(b + 1) * len(rest) // n_bins]
        for r, ci in enumerate(rng.sample(chunk, min(per_bin, len(chunk)))):
            exs.append(example(ci, "quantile", "explain" if r % 2 == 0 else "score", n_bins - 1 - b))
    pool = sorted(set(range(len(ctxs))) - set(active))
    for r, ci in enumerate(rng.sample(pool, n_random)):
        exs.append(example(ci, "random", "explain" if r % 2 == 0 else "score"))
    return FeatureExamples(sae="planted", index=index, examples=exs, max_act=max(e.max_act for e in exs),
                           density=len(active) / len(ctxs))


def planted_features(n_contexts: int = 3000) -> list[tuple[Rule, FeatureExamples]]:
    ctxs = contexts(n_contexts)
    return [(rule, plant(rule, ctxs, i)) for i, rule in enumerate(RULES)]


def shuffled_labels(rules: list[Rule]) -> list[str]:
    """Each feature gets the correct label of another feature (a derangement by rotation)."""
    return [rules[(i + 1) % len(rules)].label for i in range(len(rules))]
