"""Planted features: rules ("fires on digits", "fires on the token def", ...) applied to the builtin corpus,
each with a correct label. Their records are made by the production path, not by hand: the activations go
through `HarvestState` (top-k, quantile bins, random negatives, duplicate contexts dropped, the explain/score
split), the result is written into the catalog by `write_harvest`, and `load_feature_examples` reads each
feature back, tokens decoded through the stored vocabulary. Used by the planted-feature tests and
bench/label_quality.py."""
from __future__ import annotations

import re
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import psycopg
import torch

from interp.store.features import load_feature_examples
from interp.store.harvest import write_harvest
from interp.store.saes import SAEMeta
from interp.store.vocab import store_vocab, vocab_key
from sae.configs import HarvestConfig
from sae.corpus import iter_texts
from sae.harvest import HarvestState
from sae.records import FeatureExamples

_TOKEN = re.compile(r"\n|[ ]?[A-Za-z_]+|[ ]?\d|[ ]?[^\w\s]|[ \t]+")
# smaller than the defaults, so that a few thousand contexts fill every bin; the shape is the harvest's own
CFG = HarvestConfig(top_k=20, window=24, ctx_len=48, n_bins=4, per_bin=4, n_random=10, pool=128)
BATCH = 64


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


@dataclass
class Planted:
    """The planted SAE in the catalog: its name, its rules and features in the same order, and the harvest's
    count of duplicate contexts it dropped."""
    name: str
    rules: list[Rule]
    features: list[FeatureExamples]
    duplicates_dropped: int


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def contexts(n: int, ctx_len: int = CFG.ctx_len, seed: int = 0) -> list[list[str]]:
    """n consecutive contexts of the builtin corpus, repeats and all (the harvest drops those)."""
    stream: list[str] = []
    for text in iter_texts("builtin", seed=seed):
        stream.extend(tokenize(text))
        if len(stream) >= n * ctx_len:
            break
    return [stream[i:i + ctx_len] for i in range(0, n * ctx_len - ctx_len + 1, ctx_len)]


def _strength(token: str, i: int) -> float:
    # deterministic spread in [0.5, 1.5] so quantiles and the 0-10 scale mean something
    return 0.5 + (zlib.crc32(f"{token}{i}".encode()) % 1000) / 1000


def harvest_state(ctxs: list[list[str]], vocab: dict[str, int], rules: list[Rule]) -> HarvestState:
    """The rules' activations streamed through the real harvest state, a batch of contexts at a time, as a
    dense code over the planted features (every feature's slot present, zero where it does not fire)."""
    n_f, L = len(rules), len(ctxs[0])
    state = HarvestState(n_f, L, CFG)
    for b0 in range(0, len(ctxs), BATCH):
        batch = ctxs[b0:b0 + BATCH]
        ids = torch.tensor([[vocab[t] for t in c] for c in batch], dtype=torch.long)
        vals = torch.tensor([[_strength(t, j) if r.fires(t, c[j - 1] if j else "\n") else 0.0 for r in rules]
                             for c in batch for j, t in enumerate(c)])
        idx = torch.arange(n_f).expand(vals.shape[0], n_f)
        state.update(torch.arange(b0, b0 + len(batch)), ids, vals, idx)
    return state


def _harvest(n_contexts: int, rules: list[Rule]) -> tuple[list[str], HarvestState]:
    ctxs = contexts(n_contexts)
    names = sorted({t for c in ctxs for t in c})
    return names, harvest_state(ctxs, {t: i for i, t in enumerate(names)}, rules)


@contextmanager
def planted_catalog(conn: psycopg.Connection, n_contexts: int = 2000,
                    rules: list[Rule] = RULES) -> Iterator[Planted]:
    """Harvests the planted features into the catalog under a fresh name, reads them back, and deletes the
    SAE (and so its rows) afterwards."""
    names, state = _harvest(n_contexts, rules)
    result = state.result()
    key = vocab_key("planted", names)
    store_vocab(conn, key, names)
    name = f"planted_{uuid.uuid4().hex[:10]}"
    meta = SAEMeta(model="planted", layer=0, site="resid", d_in=len(rules), n_features=len(rules), arch="topk", k=1)
    write_harvest(conn, name, meta, result, tokenizer=key, harvest_info={"corpus": "builtin", "planted": True})
    try:
        features = [load_feature_examples(conn, name, i) for i in range(len(rules))]
        yield Planted(name, list(rules), features, state.duplicates_dropped)
    finally:
        conn.execute("DELETE FROM saes WHERE name = %s", (name,))


def planted_features(n_contexts: int = 2000, rules: list[Rule] = RULES) -> list[tuple[Rule, FeatureExamples]]:
    """The same records without a database: the harvest's result read directly (`HarvestResult.
    feature_examples`, tokens decoded through the same vocabulary), for tests that need no catalog. The
    planted-feature tests check that they equal what the catalog gives back."""
    names, state = _harvest(n_contexts, rules)
    res = state.result()
    return [(rule, res.feature_examples(i, sae="planted", decode=lambda ids: [names[t] for t in ids]))
            for i, rule in enumerate(rules)]


def shuffled_labels(rules: list[Rule]) -> list[str]:
    """Each feature gets the correct label of another feature (a derangement by rotation)."""
    return [rules[(i + 1) % len(rules)].label for i in range(len(rules))]
