"""Scorers of a label, run on the score split only: simulation (OpenAI), detection and fuzzing (EleutherAI),
and the offline embedding scorer (MiniLM). Each returns a `Score` with its per-example breakdown."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from sae.cli_config import opt
from sae.errors import InputError, first_line
from sae.records import Example, FeatureExamples

from . import prompts
from .explainers import window
from .llm import LLMClient, LLMError, NullClient, is_baseline
from .records import ExampleScore, Explanation, LabelResult, Score, Usage
from .scoring import (
    auroc,
    classification_scores,
    normalise_activations,
    simulation_scores,
    simulation_scores_normalised,
)
from .simulator import Simulator

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
SCORERS = ("simulation", "detection", "fuzzing", "embedding")
_LIST = re.compile(r"\[[^\[\]]*\]")


@dataclass
class HeldOut:
    """The score split a scorer may use, and how many of its snippets were dropped because their text also
    appears in the explain split (stored with every score as `leaked_dropped`)."""
    examples: list[Example]
    leaked: int = 0


def score_set(fe: FeatureExamples) -> HeldOut:
    """The score split without any snippet the explainer could have seen. The harvest keeps the splits
    disjoint by text (it drops duplicate contexts); a snippet that still repeats an explain snippet (say two
    contexts that differ only outside the window) is dropped and counted here, never scored, so a leak can
    neither inflate a score nor fail the feature."""
    seen = {tuple(e.token_ids) for e in fe.split("explain")}
    held = [e for e in fe.split("score") if tuple(e.token_ids) not in seen]
    return HeldOut(held, len(fe.split("score")) - len(held))


def pick(exs: list[Example], n_active: int, n_random: int) -> list[Example]:
    """Activating examples spread over the strength range (not only the top) plus random ones."""
    act = sorted((e for e in exs if e.kind != "random"), key=lambda e: -e.max_act)
    if len(act) > n_active:
        act = [act[round(i * (len(act) - 1) / max(1, n_active - 1))] for i in range(n_active)]
    return act + [e for e in exs if e.kind == "random"][:n_random]


def _position(fe: FeatureExamples) -> dict[int, int]:
    """Where each score-split example sits in that split, by identity (equal snippets may repeat)."""
    return {id(e): i for i, e in enumerate(fe.split("score"))}


def _truth(e: Example) -> int:
    return int(e.max_act > 0)


@dataclass(frozen=True)
class ScoreConfig:
    n_active: int = opt(6, "activating score-set snippets per feature")
    n_random: int = opt(6, "non-activating score-set snippets per feature")
    width: int = opt(24, "tokens per snippet")
    batch: int = opt(5, "snippets per detection/fuzzing prompt")
    seed: int = opt(0, "order of the snippets in the prompts")

    def __post_init__(self):
        for name, least in (("n_active", 0), ("n_random", 0), ("width", 1), ("batch", 1)):
            if getattr(self, name) < least:
                raise InputError(f"score config: {name} must be at least {least}, got {getattr(self, name)}")


async def simulation(fe, label, simulator: Simulator, cfg: ScoreConfig | None = None) -> Score:
    cfg = cfg or ScoreConfig()
    held = score_set(fe)
    exs = pick(held.examples, cfg.n_active, cfg.n_random)
    wins = [window(e, cfg.width) for e in exs]
    # the first call runs alone: it shows whether the endpoint returns logprobs, so the rest use one method
    sims = [await simulator.simulate(label, wins[0][0])] if wins else []
    sims += await asyncio.gather(*(simulator.simulate(label, toks) for toks, _ in wins[1:]))
    usage = Usage()
    for s in sims:
        usage.add(s.usage)
    true, predicted = [a for _, a in wins], [s.expected for s in sims]
    vals = simulation_scores(true, predicted)
    max_act = fe.max_act if fe.max_act > 0 else max((e.max_act for e in fe.examples), default=0.0)
    vals.update(simulation_scores_normalised(true, predicted, max_act))
    vals.update(missing_tokens=sum(s.missing for s in sims), sampled_tokens=sum(s.sampled for s in sims),
                leaked_dropped=held.leaked)
    methods = {s.method for s in sims}
    failures = [s.failure for s in sims if s.failure]
    at = _position(fe)
    breakdown = [ExampleScore(example=at[id(e)], kind=e.kind, true=a, predicted=s.expected,
                              missing=s.missing)
                 for e, (_, a), s in zip(exs, wins, sims)]
    return Score(sae=fe.sae, index=fe.index, scorer="simulation", simulator=simulator.client.spec,
                 prompt_version=simulator.prompt_version if methods == {"logprobs"} else simulator.json_version,
                 label=label, method=methods.pop() if len(methods) == 1 else "mixed",
                 value=vals["ev_correlation_score"], values=vals, usage=usage, breakdown=breakdown,
                 failure=f"{len(failures)}/{len(sims)} sequences failed: {failures[0]}" if failures else None)


def _binary_answers(text: str, logprobs, n: int) -> tuple[list[int] | None, list[float] | None]:
    """The first JSON list of n 0/1 answers, and P(1) for each from the top_logprobs of its token."""
    m = _LIST.search(text or "")
    if not m:
        return None, None
    try:
        vals = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None, None
    if len(vals) != n or any(v not in (0, 1) for v in vals):
        return None, None
    if logprobs is None:
        return [int(v) for v in vals], None
    probs, pos = [], 0
    for t in logprobs:
        if pos >= m.start() and t.token.strip() in ("0", "1") and len(probs) < n:
            p0 = math.exp(t.top.get("0", t.top.get(" 0", -math.inf)))
            p1 = math.exp(t.top.get("1", t.top.get(" 1", -math.inf)))
            probs.append(p1 / (p0 + p1) if p0 + p1 > 0 else float(t.token.strip() == "1"))
        pos += len(t.token)
    return [int(v) for v in vals], (probs if len(probs) == n else None)


def _fuzz_marks(exs: list[Example], wins, rng: random.Random) -> list[list[bool]]:
    """Activating snippets mark their firing tokens; the others get as many random marks, on average."""
    marks, counts = [], []
    for e, (_, acts) in zip(exs, wins):
        if _truth(e):
            m = [n > 0 for n in normalise_activations(acts, max(acts))]
            marks.append(m)
            counts.append(sum(m))
        else:
            marks.append(None)
    mean = max(1, round(sum(counts) / len(counts))) if counts else 1
    for i, (toks, _) in enumerate(wins):
        if marks[i] is None:
            chosen = set(rng.sample(range(len(toks)), min(mean, len(toks))))
            marks[i] = [j in chosen for j in range(len(toks))]
    return marks


async def classify(kind: str, fe, label, client, cfg: ScoreConfig | None = None) -> Score:
    """Detection or fuzzing: batches of `cfg.batch` snippets, activating and not mixed, a 0/1 per snippet."""
    cfg = cfg or ScoreConfig()
    rng = random.Random(cfg.seed * 1_000_003 + fe.index)
    held = score_set(fe)
    exs = pick(held.examples, cfg.n_active, cfg.n_random)
    rng.shuffle(exs)
    wins = [window(e, cfg.width) for e in exs]
    marks = _fuzz_marks(exs, wins, rng) if kind == "fuzzing" else [[False] * len(t) for t, _ in wins]
    texts = [prompts.mark(toks, m) for (toks, _), m in zip(wins, marks)]
    prompt = prompts.load(prompts.DEFAULT_VERSIONS[kind])
    batches = [list(range(i, min(i + cfg.batch, len(exs)))) for i in range(0, len(exs), cfg.batch)]

    async def run(idx):
        msgs = prompt.messages(label=prompts.escape(label), n=len(idx),
                               snippets=prompts.numbered_snippets([texts[i] for i in idx]))
        try:
            c = await client.chat(msgs, max_tokens=4 * len(idx) + 8, logprobs=True, top_logprobs=5)
        except LLMError as e:
            return None, None, Usage(), f"error: {e}"
        preds, probs = _binary_answers(c.text, c.logprobs, len(idx))
        return preds, probs, c.usage, None if preds else f"unparseable: {c.text.strip()[:60]!r}"

    results = await asyncio.gather(*(run(b) for b in batches))
    usage, y, yhat, proba, breakdown, failures = Usage(), [], [], [], [], []
    has_probs = True
    at = _position(fe)
    for idx, (preds, probs, u, fail) in zip(batches, results):
        usage.add(u)
        if fail:
            failures.append(fail)
            continue
        has_probs = has_probs and probs is not None
        for j, i in enumerate(idx):
            y.append(_truth(exs[i]))
            yhat.append(preds[j])
            proba.append(probs[j] if probs else None)
            breakdown.append(ExampleScore(example=at[id(exs[i])], kind=exs[i].kind, true=y[-1],
                                          predicted=preds[j], probability=proba[-1]))
    vals = classification_scores(y, yhat, proba if has_probs and y else None) if y else \
        dict.fromkeys(("balanced_accuracy", "precision", "recall", "f1", "auroc"))
    vals["leaked_dropped"] = held.leaked
    return Score(sae=fe.sae, index=fe.index, scorer=kind, simulator=client.spec, prompt_version=prompt.version,
                 label=label, method="logprobs" if has_probs and y else "json", value=vals["balanced_accuracy"],
                 values=vals, usage=usage, breakdown=breakdown,
                 failure=f"{len(failures)}/{len(batches)} batches failed: {failures[0]}" if failures else None)


@lru_cache(maxsize=1)
def minilm_encoder():
    from sentence_transformers import SentenceTransformer

    from sae.models import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu")


_EMBED_CACHE: dict[tuple[int, str], "np.ndarray"] = {}


def _embed(texts: list[str], enc):
    """Unit-norm embeddings, cached: one feature's snippets are embedded once however many labels are scored."""
    import numpy as np

    todo = [t for t in dict.fromkeys(texts) if (id(enc), t) not in _EMBED_CACHE]
    if todo:
        if len(_EMBED_CACHE) > 20_000:
            _EMBED_CACHE.clear()
        for t, v in zip(todo, enc.encode(todo, normalize_embeddings=True, convert_to_numpy=True)):
            _EMBED_CACHE[(id(enc), t)] = v
    return np.stack([_EMBED_CACHE[(id(enc), t)] for t in texts])


def embedding(fe, label, cfg: ScoreConfig | None = None, encoder=None) -> Score:
    """Offline: AUROC of cosine(label, snippet) separating activating from non-activating snippets."""
    cfg = cfg or ScoreConfig()
    held = score_set(fe)
    exs = pick(held.examples, cfg.n_active, cfg.n_random)
    texts = ["".join(window(e, cfg.width)[0]) for e in exs]
    vecs = _embed([label] + texts, encoder or minilm_encoder())
    sims = (vecs[1:] @ vecs[0]).tolist()
    y = [_truth(e) for e in exs]
    value = auroc(y, sims)
    at = _position(fe)
    return Score(sae=fe.sae, index=fe.index, scorer="embedding", simulator="minilm", prompt_version="embedding-v1",
                 label=label, method="embedding", value=value, values={"auroc": value, "leaked_dropped": held.leaked},
                 breakdown=[ExampleScore(example=at[id(e)], kind=e.kind, true=t, predicted=None, probability=s)
                            for e, t, s in zip(exs, y, sims)])


async def run_scorers(fe: FeatureExamples, label: str, names, client=None,
                      cfg: ScoreConfig | None = None) -> list[Score]:
    """All requested scorers for one label, LLM calls concurrent; no client means the baseline (no LLM)."""
    client = NullClient() if client is None else client
    check_scorers(names, client)
    jobs = []
    for n in names:
        if n == "simulation":
            jobs.append(simulation(fe, label, Simulator(client), cfg))
        elif n in ("detection", "fuzzing"):
            jobs.append(classify(n, fe, label, client, cfg))
        else:
            jobs.append(asyncio.to_thread(embedding, fe, label, cfg))
    return list(await asyncio.gather(*jobs))


def check_scorers(names, client: LLMClient) -> None:
    bad = [n for n in names if n not in SCORERS]
    if bad:
        raise InputError(f"unknown scorer {bad[0]!r}; choose from {', '.join(SCORERS)}")
    if is_baseline(client) and any(n != "embedding" for n in names):
        raise InputError("scorers simulation, detection and fuzzing need an LLM simulator (openai:MODEL, "
                         "openai:local or hf:PATH); with baseline only the embedding scorer runs")


async def label_features(fes: list[FeatureExamples], explainer: str, simulator: str | None, names, *,
                         clients: Mapping[str, LLMClient] | None = None) -> list[LabelResult]:
    """The labelling step for a chunk of features in one event loop (a Celery task runs one): explain each,
    score its label; all LLM calls concurrent under the clients' limits. `clients` may hold ready clients by
    spec (the caller's: used, never closed); the others are made here, inside the running loop (see
    OpenAIClient), and closed here. One spec shares one client, so one concurrency limit. A feature that
    raises is recorded as failed ("error: ...") and does not stop the others."""
    from .explainers import BaselineExplainer, LLMExplainer
    from .llm import make_client

    names = list(names)
    made: dict[str, LLMClient] = {}

    def client_for(spec: str) -> LLMClient:
        if clients and spec in clients:
            return clients[spec]
        if spec not in made:
            made[spec] = make_client(spec)
        return made[spec]

    try:
        exp_client = client_for(explainer)
        needs_sim = any(n != "embedding" for n in names)
        sim_client = client_for(simulator or explainer) if needs_sim else NullClient()
        check_scorers(names, sim_client)
        exp = BaselineExplainer() if is_baseline(exp_client) else LLMExplainer(exp_client)
        return list(await asyncio.gather(*(_label_one(fe, exp, exp_client.spec, sim_client, names) for fe in fes)))
    finally:
        for c in made.values():
            await c.close()


async def _label_one(fe: FeatureExamples, exp, spec: str, sim_client: LLMClient, names: list[str]) -> LabelResult:
    try:
        ex = await exp.explain(fe)
    except Exception as e:
        _log_failure(fe, "explaining", e)
        failed = Explanation(sae=fe.sae, index=fe.index, label=None, explainer=spec,
                             prompt_version=exp.prompt_version, failure=f"error: {first_line(e)}")
        return LabelResult(explanation=failed)
    if not ex.ok:
        return LabelResult(explanation=ex)
    try:
        return LabelResult(explanation=ex, scores=await run_scorers(fe, ex.label, names, sim_client))
    except Exception as e:
        _log_failure(fe, "scoring", e)
        ex.failure = f"error: scoring failed: {first_line(e)}"
        return LabelResult(explanation=ex)


def _log_failure(fe: FeatureExamples, step: str, e: Exception) -> None:
    # bad input and LLM failures are one line; anything else is a bug whose traceback must not be lost
    log.warning("feature %s/%d: %s failed: %s", fe.sae, fe.index, step, first_line(e),
                exc_info=not isinstance(e, (InputError, LLMError)))


async def label_feature(fe: FeatureExamples, explainer: str, simulator: str | None, names, *,
                        clients: Mapping[str, LLMClient] | None = None) -> LabelResult:
    return (await label_features([fe], explainer, simulator, names, clients=clients))[0]


def read_feature_file(path: str) -> FeatureExamples:
    """A FeatureExamples record from JSON, for debugging one feature without the catalog: either the record
    itself ({"sae", "index", "examples": [{token_ids, acts, kind, split, quantile_bin, tokens}], ...}) or the
    output of `interp feature NAME IDX --json` as it is (the record sits in its "examples" object)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise InputError(f"feature file {path!r} not found; give a JSON file with sae, index and examples "
                         "(`interp feature NAME IDX --json` writes one)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(raw.get("examples"), dict):
            raw = raw["examples"]
        exs = [Example(**e) for e in raw["examples"]]
        fields = {k: raw[k] for k in ("sae", "index", "max_act", "density") if k in raw}
        return FeatureExamples(examples=exs, **fields)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a feature file ({first_line(e)}); expected the output of "
                         "`interp feature NAME IDX --json`, or "
                         '{"sae": ..., "index": ..., "examples": [{"token_ids": [...], "acts": [...], ...}]}') from None
