"""Every architecture learns on synthetic sparse data, keeps its invariants, and folds its input scale."""
import pytest
import torch

from sae.archs import ARCHS, SAEConfig, build


def sparse_data(n=256, d=16, n_true=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, n_true, generator=g) < 0.06) * torch.rand(n, n_true, generator=g) * 3
    return codes @ dirs + 0.5


def run(arch, steps=40, lr=1e-2):
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=16, n_latents=64, arch=arch, k=4))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    x = sparse_data()
    sae.b_dec.data = x.mean(0)
    fvus = []
    for _ in range(steps):
        out = sae.training_step(x)
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        parallel = (sae.W_dec.grad * sae.W_dec.data).sum(-1)
        assert parallel.abs().max() < 1e-5
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        fvus.append(float(out.fvu.detach()))
    return sae, fvus


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_arch_reduces_fvu_and_keeps_unit_decoder(arch):
    sae, fvus = run(arch)
    assert fvus[-1] < 0.6 * fvus[0], (fvus[0], fvus[-1])
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_thresholds_stay_float32_and_learn(arch):
    bf16 = build(SAEConfig(d_in=16, n_latents=64, arch=arch, k=4), dtype=torch.bfloat16)
    assert bf16.W_enc.dtype == torch.bfloat16 and bf16.threshold.dtype == torch.float32
    torch.manual_seed(0)
    initial = build(SAEConfig(d_in=16, n_latents=64, arch=arch, k=4)).threshold.detach().clone()
    sae, _ = run(arch, steps=30)
    assert sae.threshold.dtype == torch.float32
    assert (sae.threshold.detach() - initial).abs().max() > 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fold_input_scale(arch):
    sae, _ = run(arch, steps=20)
    sae.eval()
    x = sparse_data(seed=3) * 7.0          # raw activations at some large norm
    scale = 0.37
    want = sae(x * scale) / scale          # the trained model sees scaled inputs
    sae.fold_input_scale(scale)
    got = sae(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_jumprelu_calibration_starts_l0_at_k_and_the_penalty_pulls_toward_k():
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=16, n_latents=64, arch="jumprelu", k=4))
    x = sparse_data(n=512)
    sae.b_dec.data = x.mean(0)
    l0 = lambda: float((sae.pre_acts(x) > sae.threshold).float().sum(-1).mean())
    assert l0() > 16            # the fixed initial threshold fires on far more than k latents
    sae.calibrate(x)
    assert abs(l0() - 4) < 0.5
    pre = sae.pre_acts(x)
    loss_at = lambda shift: float(sae.sparsity_loss(pre + shift, None, None))
    coef = sae.cfg.l0_coef
    assert loss_at(0.0) < 0.05 * coef < min(loss_at(-10.0), loss_at(10.0))   # too few and too many both cost


def test_jumprelu_controller_moves_every_threshold_toward_the_target_l0():
    sae = build(SAEConfig(d_in=16, n_latents=64, arch="jumprelu", k=4))
    before = sae.log_threshold.detach().clone()
    sae.after_step(8.0)                       # twice the target: every threshold rises
    up = sae.log_threshold.detach().clone()
    assert (up > before).all()
    sae.after_step(2.0)                       # half the target: they come down
    assert (sae.log_threshold.detach() < up).all()
    at_target = sae.log_threshold.detach().clone()
    sae.after_step(4.0)                       # on target: nothing moves
    assert torch.equal(sae.log_threshold.detach(), at_target)


def test_a_dead_jumprelu_latent_gets_a_way_back():
    """A latent whose threshold no input reaches: the reconstruction gives it no gradient, the dead-latent loss
    pulls its threshold down and its encoder row toward the residual."""
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=16, n_latents=64, arch="jumprelu", k=4))
    x = sparse_data()
    sae.b_dec.data = x.mean(0)
    sae.calibrate(x)
    with torch.no_grad():
        sae.log_threshold[7] = 20.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[7] = True
    for mask in (None, dead):
        sae.zero_grad()
        sae.training_step(x, dead=mask).loss.backward()
        if mask is None:
            assert sae.log_threshold.grad[7] == 0 and sae.W_enc.grad[7].abs().max() == 0
    assert sae.log_threshold.grad[7] > 0          # descending the loss lowers the threshold
    assert sae.W_enc.grad[7].abs().max() > 0
