"""JumpReLU quality on the quality-bar configuration: MiniLM layer 3, 2,048 latents, k=16 (the L0 target),
200k training tokens, evaluated on 50k held-out tokens. Goal: dead <= 0.10, L0 within 10% of k, FVU <= 0.20.

Runs the two CLI commands the issue names (train, then eval --json) and prints a table and one JSON line.
Run with `flock /tmp/bench.lock nice python bench/jumprelu_quality.py`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/j")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    train = ["interp", "sae", "train", "--model", "minilm", "--layer", "3", "--corpus", "builtin",
             "--latents", str(args.latents), "--k", str(args.k), "--arch", "jumprelu", "--tokens", str(args.tokens),
             "--out", args.out]
    t0 = time.perf_counter()
    subprocess.run(train, check=True, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    ev = subprocess.run(["interp", "sae", "eval", args.out, "--corpus", "builtin", "--tokens", "50000", "--json"],
                        check=True, capture_output=True, text=True)
    m = json.loads(ev.stdout)
    goals = {"dead_frac": (m["dead_frac"], m["dead_frac"] <= 0.10, "<= 0.10"),
             "l0": (m["l0"], abs(m["l0"] - args.k) <= 0.1 * args.k, f"{0.9 * args.k:.1f} .. {1.1 * args.k:.1f}"),
             "fvu": (m["fvu"], m["fvu"] <= 0.20, "<= 0.20")}
    print(f"jumprelu quality: minilm layer 3, {args.latents} latents, k={args.k}, {args.tokens} training tokens "
          f"({train_s:.0f} s), eval on {m['tokens']} held-out tokens")
    print(f"{'metric':<12}{'value':>10}  {'goal':<14}met")
    for name, (value, ok, goal) in goals.items():
        print(f"{name:<12}{value:>10.4f}  {goal:<14}{'yes' if ok else 'NO'}")
    print(json.dumps({"benchmark": "jumprelu_quality", "latents": args.latents, "k": args.k, "tokens": args.tokens,
                      "train_s": round(train_s, 1), "fvu": round(m["fvu"], 4), "l0": round(m["l0"], 2),
                      "dead_frac": round(m["dead_frac"], 4), "goals_met": all(g[1] for g in goals.values())}))


if __name__ == "__main__":
    main()
