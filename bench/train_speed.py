"""TopK SAE training step: ours (sae.archs.TopKSAE on sae.kernels) against eai-sparsify 1.3.3's SparseCoder.

Same config, same device, same process, equal batch, same initial weights, same learning rate and the same
synthetic activations (a sparse mix of random unit directions, so FVU after training means something).
Each side steps with its own trainer's Adam: ours fused (sae.optim.adam, with the decoder's projection and
unit norm in its CUDA pass), sparsify's torch.optim.Adam's
default; a third column runs ours with sparsify's optimiser, so the kernels' share shows on its own.
Steps alternate in blocks between the sides, so a busy shared machine slows all alike.
Prints a table and one JSON line.

    flock /tmp/bench.lock python bench/train_speed.py            # CPU: d=384, 4096 latents, k=16
    python bench/train_speed.py --gpu                            # the two H100 configs of ARCHITECTURE.md

Needs: pip install --no-deps eai-sparsify==1.3.3 natsort simple-parsing docstring-parser einops accelerate
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from sparsify_parity import sparsify_classes  # bench/ is on the path of a script run from it

from sae.archs import SAEConfig, TopKSAE
from sae.optim import SAEAdam, adam

CPU_CONFIGS = [dict(name="cpu-384-4k", d=384, m=4096, k=16, batch=4096)]
GPU_CONFIGS = [dict(name="gpt2s-32k", d=768, m=32768, k=32, batch=8192),
               dict(name="llama8b-131k", d=4096, m=131072, k=64, batch=4096)]


class Synthetic:
    """x = 20 random directions (of n_true unit ones) per token with random weights, a mean offset and noise."""

    def __init__(self, d: int, n_true: int, device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dirs = torch.randn(n_true, d, generator=g)
        self.dirs = (dirs / dirs.norm(dim=1, keepdim=True)).to(device)
        self.offset = (torch.randn(d, generator=g) * 0.5).to(device)
        self.n_true, self.d, self.device = n_true, d, device
        self.g = torch.Generator(device=device).manual_seed(seed + 1)

    def batch(self, n: int, active: int = 20) -> torch.Tensor:
        idx = torch.randint(0, self.n_true, (n, active), generator=self.g, device=self.device)
        mags = torch.rand(n, active, generator=self.g, device=self.device) * 2
        x = torch.nn.functional.embedding_bag(idx, self.dirs, per_sample_weights=mags, mode="sum") + self.offset
        return x + 0.05 * torch.randn(n, self.d, generator=self.g, device=self.device)


def optimiser_step(coder, opt, loss) -> None:
    """The rest of a step, the same for both coders (the methods share their names): backward, the gradient
    along each decoder row removed, the optimiser's step, and the decoder rows back to unit norm. Our trainer's
    optimiser (sae.optim.SAEAdam) does the projection and the norm inside its step."""
    loss.backward()
    apart = not isinstance(opt, SAEAdam)
    if apart:
        coder.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if apart:
        coder.set_decoder_norm_to_unit_norm()


def make_steps(c, device, SparseCoder, SparseCoderConfig, first: torch.Tensor, lr: float):
    """Three steps from the same initial weights: sparsify's, ours with the trainer's optimiser
    (sae.optim.adam, fused), and ours with sparsify's (torch.optim.Adam's default, what sparsify's trainer
    takes for `--optimizer adam` without bitsandbytes), so the table says what the kernels alone give."""
    sp = SparseCoder(c["d"], SparseCoderConfig(num_latents=c["m"], k=c["k"]), device=device)
    with torch.no_grad():
        sp.b_dec.copy_(first.mean(0))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def ours_like_sp(optimiser):
        sae = TopKSAE(SAEConfig(d_in=c["d"], n_latents=c["m"], k=c["k"]), device=device)
        with torch.no_grad():
            for mine, theirs in ((sae.W_enc, sp.encoder.weight), (sae.b_enc, sp.encoder.bias),
                                 (sae.W_dec, sp.W_dec), (sae.b_dec, sp.b_dec)):
                mine.copy_(theirs)
        opt = optimiser(sae)

        def step(x):
            with autocast:
                out = sae.training_step(x)
            optimiser_step(sae, opt, out.loss)
            return out.fvu
        return step

    opt_sp = torch.optim.Adam(sp.parameters(), lr=lr)

    def step_sp(x):
        out = sp(x)  # sparsify wraps its forward in bf16 autocast on CUDA itself
        optimiser_step(sp, opt_sp, out.fvu)
        return out.fvu

    return {"sparsify": step_sp, "ours": ours_like_sp(lambda sae: adam(sae, lr)),
            "ours_sp_opt": ours_like_sp(lambda sae: torch.optim.Adam(sae.parameters(), lr=lr))}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(c, device, steps: int, block: int, lr: float, classes) -> dict:
    data = Synthetic(c["d"], min(4 * c["m"], 65536), device)
    first = data.batch(c["batch"])
    steps_fn = make_steps(c, device, *classes, first, lr)
    times = {name: [] for name in steps_fn}
    fvu = {name: [] for name in steps_fn}
    peak = {}
    for b0 in range(0, steps, block):
        xs = [data.batch(c["batch"]) for _ in range(min(block, steps - b0))]
        for name, step in steps_fn.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for x in xs:
                sync(device)
                t0 = time.perf_counter()
                f = step(x)
                sync(device)
                times[name].append(time.perf_counter() - t0)
                fvu[name].append(float(f.detach()))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    warm = min(3, steps - 1)
    res = {"config": c["name"], "d": c["d"], "latents": c["m"], "k": c["k"], "batch": c["batch"], "steps": steps}
    for name in steps_fn:
        med = statistics.median(times[name][warm:])
        res[f"{name}_tok_s"] = round(c["batch"] / med)
        res[f"{name}_ms_step"] = round(med * 1e3, 2)
        res[f"{name}_fvu_end"] = round(statistics.mean(fvu[name][-block:]), 4)
        if name in peak:
            res[f"{name}_peak_gib"] = round(peak[name], 2)
    res["speedup"] = round(res["ours_tok_s"] / res["sparsify_tok_s"], 2)
    res["speedup_same_optimiser"] = round(res["ours_sp_opt_tok_s"] / res["sparsify_tok_s"], 2)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="run the GPU configs on cuda")
    ap.add_argument("--steps", type=int, default=60, help="training steps per implementation")
    ap.add_argument("--block", type=int, default=10, help="steps in a row before switching implementation")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    classes = sparsify_classes()
    rows = [run_config(c, device, args.steps, args.block, args.lr, classes)
            for c in (GPU_CONFIGS if args.gpu else CPU_CONFIGS)]
    dev_name = torch.cuda.get_device_name() if args.gpu else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {dev_name}, torch {torch.__version__}")
    print(f"{'config':<14}{'sparsify tok/s':>16}{'ours tok/s':>12}{'speedup':>9}{'same optimiser':>16}"
          f"{'sparsify FVU':>14}{'ours FVU':>10}" + ("  peak GiB (sparsify/ours)" if args.gpu else ""))
    for r in rows:
        print(f"{r['config']:<14}{r['sparsify_tok_s']:>16,}{r['ours_tok_s']:>12,}{r['speedup']:>8}x"
              f"{r['speedup_same_optimiser']:>15}x{r['sparsify_fvu_end']:>14}{r['ours_fvu_end']:>10}"
              + (f"  {r.get('sparsify_peak_gib')}/{r.get('ours_peak_gib')}" if args.gpu else ""))
    print(json.dumps({"bench": "train_speed", "device": dev_name, "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
