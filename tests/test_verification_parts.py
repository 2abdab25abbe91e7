"""Unit tests of the verification engine's parts: sampling, closed-form algebra, solvers, batching."""
from __future__ import annotations

import math

import pytest
import torch

from torchsfm.data.model import Cameras
from torchsfm.frontend.verification import PairBatch, VerificationOptions, make_pair_batches, verify_all, verify_pairs
from torchsfm.frontend.verification.linalg import cubic_real_roots, essential_from_rank2, rank2, smallest_eigvec_sym3
from torchsfm.frontend.verification.ransac import max_trials_for_ratio, num_trials_bound
from torchsfm.frontend.verification.sampling import growth_pool, sample_distinct, stream_keys
from torchsfm.frontend.verification.solvers import four_point_homography, seven_point
from torchsfm.geometry import so3


def test_samples_are_distinct_uniform_and_device_independent(device):
    keys = stream_keys(0, 1, torch.arange(50, device=device))
    pool = torch.full((50, 400), 9, device=device)
    s = sample_distinct(keys, torch.zeros(50, dtype=torch.long, device=device), 400, 7, pool)
    assert s.shape == (50, 400, 7) and int(s.min()) >= 0 and int(s.max()) <= 8
    assert bool((s[..., 1:] > s[..., :-1]).all())  # distinct (sorted ascending)
    # all 36 subsets of 7 out of 9 are about equally frequent
    code = (torch.ones_like(s) << s).sum(-1).flatten()
    counts = torch.bincount(torch.unique(code, return_inverse=True)[1])
    assert counts.numel() == math.comb(9, 7)
    assert counts.min() > 0.7 * counts.float().mean() and counts.max() < 1.3 * counts.float().mean()
    # the same trials drawn in two halves equal one draw; and equal on the CPU
    a = sample_distinct(keys, torch.full((50,), 100, device=device), 50, 7, pool[:, :50])
    b = sample_distinct(keys, torch.full((50,), 125, device=device), 25, 7, pool[:, :25])
    assert torch.equal(a[:, 25:], b)
    assert torch.equal(s.cpu(), sample_distinct(keys.cpu(), torch.zeros(50, dtype=torch.long), 400, 7, pool.cpu()))


def test_growth_pool_starts_small_and_reaches_all():
    n = torch.tensor([100, 9])
    t = torch.arange(0, 120, 10)[None].expand(2, -1)
    pool = growth_pool(n, t, 7, 100, 0.25)
    assert pool[0, 0] == 25 and pool[0, -1] == 100 and bool((pool[0, 1:] >= pool[0, :-1]).all())
    assert bool((pool[1] <= 9).all()) and bool((pool[1] >= 7).all())


def test_trial_bound_matches_colmap():
    # COLMAP's ComputeNumTrials: ceil(log(1 - p) / log(1 - prod_i (k - i) / (n - i)) * multiplier)
    k, n = 60, 100
    prob = math.prod((k - i) / (n - i) for i in range(7))
    expected = math.ceil(math.log(0.001) / math.log(1 - prob) * 3)
    assert num_trials_bound(torch.tensor([k]), torch.tensor([n]), 7, 0.999, 3.0).item() == expected
    assert num_trials_bound(torch.tensor([100]), torch.tensor([100]), 7, 0.999, 3.0).item() == 1
    assert math.isinf(num_trials_bound(torch.tensor([6]), torch.tensor([100]), 7, 0.999, 3.0).item())
    opt = VerificationOptions()
    assert max_trials_for_ratio(torch.tensor([0.25]), 7, opt).item() == 10000  # capped by max_num_trials
    prob = math.prod((25000 - i) / (100000 - i) for i in range(4))  # COLMAP: ratio * 100000 of 100000
    assert max_trials_for_ratio(torch.tensor([0.25]), 4, opt).item() == math.ceil(math.log(0.001) / math.log(1 - prob) * 3)


def test_cubic_roots():
    r = torch.tensor([[1.0, -2.0, 3.5], [0.5, 0.5, -1.0]], dtype=torch.float64)
    c3 = torch.tensor([2.0, -1.0], dtype=torch.float64)
    c2 = -c3 * r.sum(1)
    c1 = c3 * (r[:, 0] * r[:, 1] + r[:, 0] * r[:, 2] + r[:, 1] * r[:, 2])
    c0 = -c3 * r.prod(1)
    roots, valid = cubic_real_roots(c3, c2, c1, c0)
    assert bool(valid.all())
    assert torch.allclose(roots.sort(1).values, r.sort(1).values, atol=1e-6)
    # one real root (x^3 + x + 1), and a degenerate quadratic (c3 = 0)
    roots, valid = cubic_real_roots(*(torch.tensor([v], dtype=torch.float64) for v in (1.0, 0.0, 1.0, 1.0)))
    assert valid.tolist() == [[True, False, False]] and abs(roots[0, 0].item() + 0.6823278) < 1e-6
    roots, valid = cubic_real_roots(*(torch.tensor([v], dtype=torch.float64) for v in (0.0, 1.0, -3.0, 2.0)))
    assert sorted(roots[valid].tolist()) == pytest.approx([1.0, 2.0])


def test_closed_form_projections():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(200, 3, 3, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(F)
    ref2 = U @ torch.diag_embed(S * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)) @ Vh
    assert torch.allclose(rank2(F), ref2, atol=1e-8)
    E = essential_from_rank2(ref2)
    refE = U @ torch.diag_embed(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).expand(200, 3)) @ Vh
    assert torch.allclose(E, refE, atol=1e-8)
    S3 = F.transpose(1, 2) @ F
    v = smallest_eigvec_sym3(ref2.transpose(1, 2) @ ref2)
    assert torch.allclose((ref2 @ v[..., None]).norm(dim=1), torch.zeros(200, 1, dtype=torch.float64), atol=1e-9)
    assert S3.shape == (200, 3, 3)


def test_minimal_solvers_exact(device):
    g = torch.Generator().manual_seed(1)
    B = 64
    R = so3.random_rotation(B, generator=g).to(device)
    t = torch.randn(B, 3, generator=g, dtype=torch.float64).to(device)
    X = (torch.randn(B, 7, 3, generator=g, dtype=torch.float64) + torch.tensor([0, 0, 5.0], dtype=torch.float64)).to(device)
    x1 = X[..., :2] / X[..., 2:]
    X2 = (R[:, None] @ X[..., None])[..., 0] + t[:, None]
    x2 = X2[..., :2] / X2[..., 2:]
    F, valid = seven_point(x1, x2)
    E = so3.skew(t) @ R
    E = E / E.flatten(1).norm(dim=1)[:, None, None]
    err = torch.minimum((F - E[:, None]).flatten(2).norm(dim=2), (F + E[:, None]).flatten(2).norm(dim=2))
    assert bool((torch.where(valid, err, 9.0).min(1).values < 1e-6).all())
    noise = torch.randn(B, 3, 3, generator=g, dtype=torch.float64).to(device)
    H = torch.eye(3, dtype=torch.float64, device=device) + 0.1 * noise
    p1 = torch.randn(B, 4, 2, generator=g, dtype=torch.float64).to(device)
    q = (H[:, None] @ torch.cat([p1, torch.ones_like(p1[..., :1])], -1)[..., None])[..., 0]
    Hs, ok = four_point_homography(p1, q[..., :2] / q[..., 2:])
    Hn = H / H.flatten(1).norm(dim=1)[:, None, None]
    assert bool(ok.all())
    assert torch.minimum((Hs - Hn).flatten(1).norm(dim=1), (Hs + Hn).flatten(1).norm(dim=1)).max() < 1e-8
    # collinear points: a singular system is flagged, never a NaN model
    Hs, ok = four_point_homography(torch.zeros(2, 4, 2, dtype=torch.float64, device=device), q[:2, :, :2])
    assert not bool(ok.any()) and bool(torch.isfinite(Hs).all())


def _flat_problem(num_images=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(50, 120, (num_images,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    xy = torch.rand(int(offsets[-1]), 2, generator=g, dtype=torch.float64) * 500
    pairs = torch.combinations(torch.arange(num_images), 2)
    ms, mo = [], [0]
    for a, b in pairs.tolist():
        k = int(torch.randint(0, 40, (1,), generator=g))
        m = torch.stack([torch.randperm(int(counts[a]), generator=g)[:k], torch.randperm(int(counts[b]), generator=g)[:k]], 1)
        ms.append(m)
        mo.append(mo[-1] + m.shape[0])
    cams = Cameras(camera_id=torch.tensor([1, 2]), model_id=torch.tensor([0, 2]), width=torch.tensor([500, 500]),
                   height=torch.tensor([500, 500]),
                   params=torch.tensor([[600.0, 250, 250] + [0] * 9, [650.0, 250, 250, 0.01] + [0] * 8], dtype=torch.float64),
                   has_prior_focal_length=torch.tensor([False, True]))
    image_camera = torch.tensor([0, 1] * (num_images // 2))
    return xy, offsets, pairs, torch.cat(ms), torch.tensor(mo), cams, image_camera


def test_make_pair_batches_gathers_every_pair_once():
    xy, off, pairs, matches, mo, cams, icam = _flat_problem()
    seen = []
    for rows, b in make_pair_batches(xy, off, pairs, matches, mo, cams, icam, max_elements=300, max_pairs=4):
        assert isinstance(b, PairBatch)
        b.check()
        assert b.num_pairs <= 4 and b.num_pairs * b.xy1.shape[1] <= max(300, b.xy1.shape[1])
        for k, p in enumerate(rows.tolist()):
            a, c = pairs[p].tolist()
            n = int(mo[p + 1] - mo[p])
            assert b.num_matches[k] == n and b.pair_seed[k] == p
            m = matches[mo[p]:mo[p + 1]]
            assert torch.equal(b.xy1[k, :n], xy[off[a] + m[:, 0]]) and torch.equal(b.xy2[k, :n], xy[off[c] + m[:, 1]])
            assert not bool(b.xy1[k, n:].any())
            assert b.camera_model_id1[k] == cams.model_id[icam[a]]
            assert b.has_prior_focal2[k] == cams.has_prior_focal_length[icam[c]]
            assert b.same_camera[k] == (icam[a] == icam[c])
        seen += rows.tolist()
    assert sorted(seen) == list(range(pairs.shape[0]))


def test_verify_all_is_chunking_invariant():
    xy, off, pairs, matches, mo, cams, icam = _flat_problem(seed=3)
    a = verify_all(xy, off, pairs, matches, mo, cams, icam, max_elements=2**21)
    b = verify_all(xy, off, pairs, matches, mo, cams, icam, max_elements=200)
    assert a.inliers.shape == (matches.shape[0],)
    for f in ("config", "num_inliers", "inliers", "num_trials"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    # other padding changes the summation order of the refits' reductions: equal up to rounding
    assert torch.allclose(a.F, b.F, atol=1e-9) and torch.allclose(a.H, b.H, atol=1e-9)


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_H_inlier_ratio"):
        VerificationOptions(max_H_inlier_ratio=1.5).check()
    with pytest.raises(ValueError, match="min_num_trials"):
        VerificationOptions(min_num_trials=20000).check()


def test_bad_batch_is_refused():
    xy, off, pairs, matches, mo, cams, icam = _flat_problem()
    _, b = next(iter(make_pair_batches(xy, off, pairs, matches, mo, cams, icam)))
    b.params1 = b.params1[:, :4]
    with pytest.raises(ValueError, match="params1"):
        verify_pairs(b)
