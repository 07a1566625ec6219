"""SAE quality on held-out tokens, through the CLI a user runs: `interp sae train` then `interp sae eval --json`,
for the TopK default and for JumpReLU (whose L0 must settle near its target k). Reports FVU, L0, dead and
dense fractions from the eval, and the training's wall time and peak RSS (of the train subprocess).

    flock /tmp/bench.lock python bench/sae_quality.py [--archs topk,jumprelu] [--tokens 200000]
                                                      [--eval-tokens 50000] [--latents 2048] [--k 16]

Prints a table and one JSON line. Runs are written under --out (default runs/sae-quality)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interp(*args: str) -> tuple[str, float]:
    """Runs `interp ARGS`; returns its stdout and its own peak RSS in GiB (os.wait4: this child's rusage)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "interp.cli", *args], env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            sys.exit(f"interp {' '.join(args)} failed ({p.returncode}): {err.read().strip()[-500:]}")
        return out.read(), usage.ru_maxrss / 2**20      # ru_maxrss is in KiB on Linux


def run_one(arch: str, a) -> dict:
    out = Path(a.out) / arch
    t0 = time.perf_counter()
    _, rss = interp("sae", "train", "--model", a.model, "--layer", str(a.layer), "--corpus", "builtin",
                    "--latents", str(a.latents), "--k", str(a.k), "--arch", arch, "--tokens", str(a.tokens),
                    "--out", str(out))
    train_s = time.perf_counter() - t0
    metrics = json.loads(interp("sae", "eval", str(out), "--corpus", "builtin", "--tokens", str(a.eval_tokens),
                                "--json")[0])
    return {**metrics, "arch": arch, "train_s": round(train_s, 1), "train_peak_rss_gib": round(rss, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="topk,jumprelu")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    ap.add_argument("--eval-tokens", type=int, default=50_000, help="held-out tokens for the eval")
    ap.add_argument("--out", default="runs/sae-quality")
    a = ap.parse_args()

    rows = [run_one(arch, a) for arch in a.archs.split(",")]
    cols = ["fvu", "l0", "dead_frac", "dense_frac"]
    print(f"\n{a.model} layer {a.layer}, {a.latents} latents, k={a.k}; train {a.tokens} tokens, "
          f"eval {a.eval_tokens} held-out tokens")
    print(f"{'arch':<10}" + "".join(f"{c:>12}" for c in cols) + f"{'train s':>10}{'RSS GiB':>10}")
    for r in rows:
        vals = "".join(f"{r.get(c):>12.4f}" if isinstance(r.get(c), (int, float)) else f"{'n/a':>12}" for c in cols)
        print(f"{r['arch']:<10}{vals}{r['train_s']:>10}{str(r['train_peak_rss_gib']):>10}")
    print(json.dumps({"benchmark": "sae_quality", "model": a.model, "layer": a.layer, "latents": a.latents,
                      "k": a.k, "tokens": a.tokens, "eval_tokens": a.eval_tokens, "runs": rows}))


if __name__ == "__main__":
    main()
