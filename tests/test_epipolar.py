"""Batched epipolar geometry: Sampson errors and the per-pair pose refinement."""
import torch

from torchsfm.geometry import so3
from torchsfm.data.model import spread_subset
from torchsfm.geometry.epipolar import _sampson_jacobian, _soa, refine_relative_poses, sampson_error


def two_view(num_pairs=6, per_pair=80, seed=0, noise_px=0.0, f=800.0):
    """Random pairs of cameras (cam2_from_cam1 = R, t) seeing random points; normalised coords."""
    g = torch.Generator().manual_seed(seed)
    R = so3.exp(0.2 * torch.randn(num_pairs, 3, generator=g, dtype=torch.float64))
    t = torch.nn.functional.normalize(torch.randn(num_pairs, 3, generator=g, dtype=torch.float64), dim=1)
    pair = torch.arange(num_pairs).repeat_interleave(per_pair)
    X = torch.randn(pair.numel(), 3, generator=g, dtype=torch.float64) + torch.tensor([0, 0, 6.0], dtype=torch.float64)
    x1 = X[:, :2] / X[:, 2:]
    Y = (R[pair] @ X[:, :, None])[:, :, 0] + t[pair]
    x2 = Y[:, :2] / Y[:, 2:]
    x1 = x1 + noise_px / f * torch.randn(x1.shape, generator=g, dtype=torch.float64)
    x2 = x2 + noise_px / f * torch.randn(x2.shape, generator=g, dtype=torch.float64)
    fm = torch.full((pair.numel(),), f, dtype=torch.float64)
    return x1, x2, pair, R, t, fm


def test_sampson_error_is_zero_on_exact_matches_and_in_pixels():
    x1, x2, pair, R, t, f = two_view()
    E = (so3.skew(t) @ R)[pair]
    assert float(sampson_error(x1, x2, E, f, f).abs().max()) < 1e-9
    # moving x2 by 1 px across its epipolar line: the Sampson distance splits the correction
    # over both images, |l2| / sqrt(|l1|^2 + |l2|^2) px (1/sqrt(2) for lines of equal weight)
    h1 = torch.cat([x1, torch.ones_like(x1[:, :1])], 1)
    line = (E @ h1[:, :, None])[:, :2, 0]
    n = torch.nn.functional.normalize(line, dim=1)
    err = sampson_error(x1, x2 + n / f[:, None], E, f, f).abs()
    h2 = torch.cat([x2, torch.ones_like(x2[:, :1])], 1)
    line1 = (E.transpose(1, 2) @ h2[:, :, None])[:, :2, 0]
    expect = line.norm(dim=1) / (line.square().sum(1) + line1.square().sum(1)).sqrt()
    assert torch.allclose(err, expect, rtol=1e-3)


def test_sampson_jacobian_matches_finite_differences():
    x1, x2, pair, R, t, f = two_view(noise_px=2.0)
    p = torch.cat([x1, x2], 1).T.contiguous()
    E = (so3.skew(t) @ R)[pair]
    dE = torch.randn(E.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-7
    num = (sampson_error(x1, x2, E + h * dE, f, f) - sampson_error(x1, x2, E - h * dE, f, f)) / (2 * h)
    ana = _sampson_jacobian(p, _soa(E), _soa(dE), f, f)
    assert torch.allclose(ana, num, rtol=1e-5, atol=1e-6)


def test_refinement_recovers_perturbed_poses_and_keeps_exact_ones():
    x1, x2, pair, R, t, f = two_view(num_pairs=8, per_pair=120, seed=2)
    g = torch.Generator().manual_seed(3)
    dR = so3.exp(torch.deg2rad(torch.tensor(2.0)) * torch.nn.functional.normalize(
        torch.randn(8, 3, generator=g, dtype=torch.float64), dim=1))
    R0 = torch.cat([R[:4], (dR @ R)[4:]])  # the first four exact, the others 2 deg off
    t0 = torch.nn.functional.normalize(t + torch.cat([torch.zeros(4, 3, dtype=torch.float64),
                                                      0.05 * torch.randn(4, 3, generator=g, dtype=torch.float64)]), dim=1)
    Rr, tr, r = refine_relative_poses(x1, x2, pair, R0, t0, f, f, loss_scale=1.0, iterations=15)
    rot = torch.rad2deg(so3.log(Rr @ R.transpose(1, 2)).norm(dim=1))
    assert float(rot.max()) < 1e-4
    assert float(torch.rad2deg(torch.acos((tr * t).sum(1).clamp(max=1))).max()) < 1e-3
    assert float(r.abs().max()) < 1e-4  # Sampson errors of all matches at the result


def test_refinement_on_a_subset_sees_every_pair_and_reports_all_matches():
    x1, x2, pair, R, t, f = two_view(num_pairs=3, per_pair=500, seed=4, noise_px=0.5)
    keep = spread_subset(pair, 3, 64)
    assert torch.equal(torch.bincount(pair[keep], minlength=3), torch.tensor([63, 63, 63]))  # stride 8 of 500
    Rr, tr, r = refine_relative_poses(x1, x2, pair, R, t, f, f, loss_scale=1.0, iterations=5, max_matches=64)
    assert r.shape == pair.shape
    assert float(r.abs().median()) < 1.0
