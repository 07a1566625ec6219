"""LLM tokens per labelled and scored feature, per scorer, at the default example counts, against the local
LLM (real prompts, real tokenizer, real answers). Goal: explanation + simulation <= 6k tokens.

    flock /tmp/bench.lock python bench/label_tokens.py [--features 2]

Prints a table and one JSON line."""
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

from interp.explainers import LLMExplainer  # noqa: E402
from interp.local_llm import LocalLLM  # noqa: E402
from interp.scorers import ScoreConfig, classify, simulation  # noqa: E402
from interp.simulator import Simulator  # noqa: E402
from tests.planted import planted_features  # noqa: E402


def main() -> None:
    # a plain SIGTERM would skip LocalLLM's exit and orphan the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=2)
    a = ap.parse_args()
    planted = planted_features()[:a.features]
    cfg = ScoreConfig()
    rows: dict[str, list[tuple[int, int, int]]] = {k: [] for k in ("explanation", "simulation", "detection", "fuzzing")}
    t0 = time.perf_counter()
    with LocalLLM() as srv:
        async def run():
            client = srv.client(concurrency=1, timeout_s=600)
            bar = tqdm(planted, desc="tokens per feature", unit="feature")
            for rule, fe in bar:
                ex = await LLMExplainer(client).explain(fe)
                rows["explanation"].append((ex.usage.prompt_tokens, ex.usage.completion_tokens, ex.usage.calls))
                label = ex.label or rule.label
                for name in ("simulation", "detection", "fuzzing"):
                    s = await (simulation(fe, label, Simulator(client), cfg) if name == "simulation"
                               else classify(name, fe, label, client, cfg))
                    rows[name].append((s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.calls))
                bar.set_postfix(tokens=client.usage.total)
        asyncio.run(run())
    per = {k: {"prompt": mean(r[0] for r in v), "completion": mean(r[1] for r in v), "calls": mean(r[2] for r in v)}
           for k, v in rows.items()}
    print(f"\ndefaults: explain {LLMExplainer.n_examples} snippets x {LLMExplainer.width} tokens; "
          f"score {cfg.n_active}+{cfg.n_random} snippets x {cfg.width} tokens; {len(planted)} features")
    print(f"{'step':<14}{'prompt':>9}{'completion':>12}{'total':>8}{'calls':>7}")
    for k, v in per.items():
        print(f"{k:<14}{v['prompt']:>9.0f}{v['completion']:>12.0f}{v['prompt'] + v['completion']:>8.0f}{v['calls']:>7.1f}")
    both = sum(per[k]["prompt"] + per[k]["completion"] for k in ("explanation", "simulation"))
    print(f"explanation + simulation: {both:.0f} tokens per feature (goal <= 6000)")
    print(json.dumps({"benchmark": "label_tokens", "features": len(planted), "per_feature": per,
                      "explanation_plus_simulation": both, "wall_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
