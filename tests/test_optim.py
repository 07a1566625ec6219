"""The trainer's Adam keeps the decoder's rows at unit norm, and its fused CUDA pass (a Triton kernel, run here by
Triton's CPU interpreter) equals the three steps apart: projection, torch's Adam, unit norm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sae.archs import SAEConfig, build
from sae.optim import SAEAdam

ROOT = Path(__file__).resolve().parents[1]


def trained(fused: bool, steps: int = 3, d: int = 48):
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=d, n_latents=64, arch="topk", k=4))
    opt = SAEAdam(sae, 1e-2, fused_decoder=fused)
    x = torch.randn(128, d, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        sae.training_step(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sae, opt


def test_the_step_projects_the_decoder_gradient_and_keeps_rows_at_unit_norm():
    sae, opt = trained(fused=False)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    torch.manual_seed(0)
    ref = build(SAEConfig(d_in=48, n_latents=64, arch="topk", k=4))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x = torch.randn(128, 48, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        ref.training_step(x).loss.backward()
        ref.remove_gradient_parallel_to_decoder_directions()
        ref_opt.step()
        ref_opt.zero_grad()
        ref.set_decoder_norm_to_unit_norm()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(sae, name), getattr(ref, name), atol=1e-6), name


COMPARE = """
import json, torch
from tests.test_optim import trained
out = {}
for d in (48, 64):
    a, oa = trained(False, d=d)
    b, ob = trained(True, d=d)
    out[d] = {"params": max(float((getattr(a, n) - getattr(b, n)).abs().max()) for n in ("W_enc", "b_enc", "W_dec", "b_dec")),
              "moments": max(float((oa.state[a.W_dec][k] - ob.state[b.W_dec][k]).abs().max()) for k in ("exp_avg", "exp_avg_sq")),
              "step": float(ob.state[b.W_dec]["step"]), "keys": sorted(ob.state_dict()["state"][2]),
              "norm": float((b.W_dec.norm(dim=1) - 1).abs().max())}
print(json.dumps(out))
"""


def test_the_fused_decoder_kernel_equals_the_three_steps_apart():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", COMPARE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for d, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert r["params"] < 1e-5 and r["moments"] < 1e-7, (d, r)      # d=48: a row narrower than its block
        assert r["step"] == 3 and r["keys"] == ["exp_avg", "exp_avg_sq", "step"] and r["norm"] < 1e-6, (d, r)
