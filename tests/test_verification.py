"""Known-answer tests of the batched two-view verification engine on synthetic pairs."""
from __future__ import annotations

import pytest
import torch
from verification_scenes import W, H, batch_of, make_pair

from torchsfm.cameras.models import project
from torchsfm.data.model import (TWO_VIEW_CALIBRATED, TWO_VIEW_DEGENERATE, TWO_VIEW_PANORAMIC, TWO_VIEW_PLANAR,
                                 TWO_VIEW_UNCALIBRATED, TWO_VIEW_WATERMARK)
from torchsfm.frontend.verification import VerificationOptions, verify_pairs
from torchsfm.geometry import so3


def _sign_free(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a / a.norm()
    b = b / b.norm()
    return min((a - b).norm().item(), (a + b).norm().item())


def _median_sampson(F: torch.Tensor, p) -> float:
    """Median Sampson error (px) of the true matches of pair p under a pixel-frame F."""
    x1 = torch.cat([p.xy1, torch.ones(len(p.xy1), 1, dtype=torch.float64)], 1)[p.true]
    x2 = torch.cat([p.xy2, torch.ones(len(p.xy2), 1, dtype=torch.float64)], 1)[p.true]
    Fx1, Ftx2 = x1 @ F.T, x2 @ F
    num = (x2 * Fx1).sum(1)
    return (num.abs() / (Fx1[:, :2].square().sum(1) + Ftx2[:, :2].square().sum(1)).sqrt()).median().item()


def _recall_precision(geoms, pairs):
    rec, prec = [], []
    for i, p in enumerate(pairs):
        inl = geoms.inliers[i, :p.xy1.shape[0]].cpu()
        tp = (inl & p.true).sum().item()
        rec.append(tp / p.true.sum().item())
        prec.append(tp / max(1, inl.sum().item()))
    return sum(rec) / len(rec), sum(prec) / len(prec)


# noiseless and inlier-only: exact; with outliers the most-inliers model may include a few
# outliers that fall within the threshold by chance (COLMAP's criterion too), so tolerances widen
@pytest.mark.parametrize("noise,outliers,f_tol,rot_tol_deg", [(0.0, 0.0, 1e-8, 1e-6), (0.0, 0.3, 1e-2, 0.2),
                                                              (0.5, 0.3, 2e-2, 1.5)])
def test_fundamental_recovered(device, noise, outliers, f_tol, rot_tol_deg):
    pairs = [make_pair("general", 150, outliers, noise, seed=s) for s in range(6)]
    g = verify_pairs(batch_of(pairs, device=device))
    assert g.config.tolist() == [TWO_VIEW_UNCALIBRATED] * 6
    for i, p in enumerate(pairs):
        assert _sign_free(g.F[i].cpu(), p.F) < f_tol
        # the estimate explains the true matches about as well as the ground truth does (noiseless
        # with outliers: chance inliers near the 4 px threshold may keep it off zero)
        assert _median_sampson(g.F[i].cpu(), p) <= 1.15 * _median_sampson(p.F, p) + (0.2 if outliers else 1e-6)
        R = so3.quat_to_matrix(g.rel_quat[i].cpu())
        assert so3.angle_between(R[None], p.R[None]).item() * 180 / torch.pi < rot_tol_deg
        assert torch.dot(g.rel_trans[i].cpu(), p.t / p.t.norm()) > 1 - rot_tol_deg
    assert bool(g.pose_valid.all())
    rec, prec = _recall_precision(g, pairs)
    assert rec > (0.999 if noise == 0 else 0.99) and prec > 0.97


def test_essential_recovered_with_focal_priors(device):
    pairs = [make_pair("general", 150, 0.3, 0.5, seed=s) for s in range(6)]
    g = verify_pairs(batch_of(pairs, prior_focal=True, device=device))
    assert g.config.tolist() == [TWO_VIEW_CALIBRATED] * 6
    Kinv = torch.linalg.inv(pairs[0].K)
    for i, p in enumerate(pairs):
        E_true = so3.skew(p.t[None])[0] @ p.R
        assert _sign_free(g.E[i].cpu(), E_true) < 3e-2
        assert _median_sampson(Kinv.T @ g.E[i].cpu() @ Kinv, p) <= 1.15 * _median_sampson(p.F, p) + 0.05
        sv = torch.linalg.svdvals(g.E[i].cpu())
        assert abs(sv[0] - sv[1]) < 1e-9 and sv[2] < 1e-9  # on the essential manifold
        R = so3.quat_to_matrix(g.rel_quat[i].cpu())
        assert so3.angle_between(R[None], p.R[None]).item() * 180 / torch.pi < 1.5
    rec, prec = _recall_precision(g, pairs)
    assert rec > 0.99 and prec > 0.97


def test_planar_scene_is_planar(device):
    pairs = [make_pair("planar", 150, 0.3, 0.5, seed=s) for s in range(4)]
    g = verify_pairs(batch_of(pairs, device=device))
    assert g.config.tolist() == [TWO_VIEW_PLANAR] * 4
    for i, p in enumerate(pairs):
        assert _sign_free(g.H[i].cpu(), p.Hm) < 2e-2
    assert bool(g.pose_valid.all())


def test_pure_rotation_is_panoramic(device):
    pairs = [make_pair("rotation", 150, 0.3, 0.1, seed=s) for s in range(4)]
    g = verify_pairs(batch_of(pairs, device=device))
    assert g.config.tolist() == [TWO_VIEW_PANORAMIC] * 4
    for i, p in enumerate(pairs):
        assert _sign_free(g.H[i].cpu(), p.Hm) < 1e-2
        R = so3.quat_to_matrix(g.rel_quat[i].cpu())
        assert so3.angle_between(R[None], p.R[None]).item() * 180 / torch.pi < 0.2
        assert g.rel_trans[i].abs().max() == 0


def test_random_matches_are_degenerate(device):
    g_ = torch.Generator().manual_seed(3)
    # 40 uniform random matches, none consistent (from ~100 on, a 7-dof F finds 15 chance inliers
    # among 10,000 samples, in COLMAP as here)
    pairs = [make_pair("general", 10, 0.0, 0.5, seed=s) for s in range(4)]
    for p in pairs:
        p.xy1 = torch.rand(40, 2, generator=g_, dtype=torch.float64) * torch.tensor([W, H])
        p.xy2 = torch.rand(40, 2, generator=g_, dtype=torch.float64) * torch.tensor([W, H])
        p.true = torch.zeros(40, dtype=torch.bool)
    g = verify_pairs(batch_of(pairs, device=device))
    assert g.config.tolist() == [TWO_VIEW_DEGENERATE] * 4
    assert g.num_inliers.tolist() == [0] * 4 and not bool(g.inliers.any())


def test_border_watermark(device):
    g_ = torch.Generator().manual_seed(5)
    n = 60  # the same overlay near the bottom-left corner of both images, plus random matches
    xy = torch.rand(n, 2, generator=g_, dtype=torch.float64) * torch.tensor([50.0, 40.0]) + torch.tensor([5.0, 550.0])
    noise = torch.rand(20, 4, generator=g_, dtype=torch.float64) * torch.tensor([W, H, W, H])
    p = make_pair("general", 10, 0.0, 0.0, seed=0)
    p.xy1 = torch.cat([xy, noise[:, :2]])
    p.xy2 = torch.cat([xy + 0.3 * torch.randn(n, 2, generator=g_, dtype=torch.float64), noise[:, 2:]])
    g = verify_pairs(batch_of([p], device=device))
    assert g.config.tolist() == [TWO_VIEW_WATERMARK]


def test_too_few_matches_and_fisheye_without_prior_are_degenerate(device):
    small = make_pair("general", 12, 0.0, 0.5, seed=1)  # < min_num_inliers matches
    g = verify_pairs(batch_of([small], device=device))
    assert g.config.tolist() == [TWO_VIEW_DEGENERATE]
    fish = make_pair("general", 100, 0.0, 0.5, seed=1)
    f, c = fish.K[0, 0], fish.K[:2, 2]
    params = torch.tensor([f, f, c[0], c[1], 0, 0, 0, 0], dtype=torch.float64)
    for xy in (fish.xy1, fish.xy2):  # the same rays through an equidistant fisheye lens
        ray = torch.cat([(xy - c) / f, torch.ones(len(xy), 1, dtype=torch.float64)], 1)
        xy.copy_(project(5, params, ray))
    b = batch_of([fish], model_id=5, device=device)
    assert verify_pairs(b).config.tolist() == [TWO_VIEW_DEGENERATE]
    b.has_prior_focal1[:] = True
    b.has_prior_focal2[:] = True
    assert verify_pairs(b).config.tolist() == [TWO_VIEW_CALIBRATED]


@pytest.mark.parametrize("outlier_ratio", [0.1, 0.35, 0.6])
def test_inlier_recall_precision_across_outlier_ratios(device, outlier_ratio):
    pairs = [make_pair("general", 120, outlier_ratio, 0.5, seed=10 + s) for s in range(8)]
    g = verify_pairs(batch_of(pairs, device=device))
    rec, prec = _recall_precision(g, pairs)
    assert rec > 0.98 and prec > 0.95, (rec, prec)


def test_deterministic_and_padding_invariant(device):
    pairs = [make_pair("general", 80 + 20 * s, 0.4, 0.5, seed=20 + s) for s in range(4)]
    opt = VerificationOptions(seed=7)
    a = verify_pairs(batch_of(pairs, device=device, seeds=[11, 12, 13, 14]), opt)
    b = verify_pairs(batch_of(pairs, device=device, seeds=[11, 12, 13, 14]), opt)
    for f in ("config", "F", "H", "inliers", "num_trials", "rel_quat"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    # pair 2 alone, padded to a longer batch, keeps its result (same pair seed)
    c = verify_pairs(batch_of([pairs[2]], device=device, seeds=[13], pad_to=400), opt)
    n = pairs[2].xy1.shape[0]
    assert torch.equal(c.inliers[0, :n], a.inliers[2, :n]) and not bool(c.inliers[0, n:].any())
    assert c.config[0] == a.config[2] and c.num_trials[0] == a.num_trials[2]
    assert torch.allclose(c.F[0], a.F[2], atol=1e-6)
    # another seed gives other samples
    d = verify_pairs(batch_of(pairs, device=device, seeds=[11, 12, 13, 14]), VerificationOptions(seed=8))
    assert not torch.equal(d.F, a.F)


def test_non_finite_matches_are_skipped(device):
    p = make_pair("general", 150, 0.3, 0.5, seed=4)
    ref = verify_pairs(batch_of([p], device=device))
    q = make_pair("general", 150, 0.3, 0.5, seed=4)
    q.xy1 = torch.cat([q.xy1[:5], torch.full((3, 2), float("nan"), dtype=torch.float64), q.xy1[5:]])
    q.xy2 = torch.cat([q.xy2[:5], torch.full((3, 2), float("inf"), dtype=torch.float64), q.xy2[5:]])
    g = verify_pairs(batch_of([q], device=device))
    assert g.config.tolist() == ref.config.tolist()
    assert not bool(g.inliers[0, 5:8].any())
    assert g.inliers[0].sum() == pytest.approx(ref.inliers[0].sum().item(), abs=3)


def test_shared_camera_focal_recovered(device):
    """One camera without focal prior (COLMAP's shared-focal path): the focal is estimated, so F
    and the pose are right although the camera's focal is 30 % off."""
    pairs = [make_pair("general", 150, 0.3, 0.5, seed=30 + s) for s in range(4)]
    b = batch_of(pairs, same_camera=True, device=device)
    b.params1[:, 0] *= 0.7
    b.params2[:, 0] *= 0.7
    g = verify_pairs(b)
    assert g.config.tolist() == [TWO_VIEW_UNCALIBRATED] * 4
    for i, p in enumerate(pairs):
        assert _sign_free(g.F[i].cpu(), p.F) < 3e-2
        assert _median_sampson(g.F[i].cpu(), p) <= 1.15 * _median_sampson(p.F, p) + 0.05
        R = so3.quat_to_matrix(g.rel_quat[i].cpu())
        assert so3.angle_between(R[None], p.R[None]).item() * 180 / torch.pi < 1.5
    rec, prec = _recall_precision(g, pairs)
    assert rec > 0.98 and prec > 0.95
    # without the shared-focal path the same pairs are verified by F alone, with the same inliers
    f = verify_pairs(b, VerificationOptions(shared_focal=False))
    assert f.config.tolist() == [TWO_VIEW_UNCALIBRATED] * 4
    assert (f.inliers != g.inliers).sum() <= 0.02 * g.inliers.sum()


@pytest.mark.parametrize("prior_focal", [False, True])
def test_min_inlier_ratio_rejects_pairs_with_many_outliers(device, prior_focal):
    """COLMAP's TwoViewGeometryOptions.min_inlier_ratio (`--min-inlier-ratio`; 0.8 by default for
    LightGlue matches): a pair whose geometry explains too small a share of its matches is
    degenerate, whatever its inlier count."""
    pairs = [make_pair("general", 150, r, 0.5, seed=s) for s, r in enumerate([0.1, 0.35])]
    plain = verify_pairs(batch_of(pairs, prior_focal=prior_focal, device=device))
    assert TWO_VIEW_DEGENERATE not in plain.config.tolist()
    assert plain.num_inliers[1] > 140  # well above min_num_inliers: only the ratio can reject it
    gated = verify_pairs(batch_of(pairs, prior_focal=prior_focal, device=device),
                         VerificationOptions(two_view_min_inlier_ratio=0.8))
    assert gated.config[0] != TWO_VIEW_DEGENERATE and gated.num_inliers[0] == plain.num_inliers[0]
    assert gated.config[1] == TWO_VIEW_DEGENERATE and gated.num_inliers[1] == 0


def test_min_inlier_ratio_auto_follows_the_matcher():
    from torchsfm.frontend.options import LIGHTGLUE_MIN_INLIER_RATIO, MatchOptions
    from torchsfm.frontend.torch_matcher import verification_options

    assert verification_options(MatchOptions()).two_view_min_inlier_ratio == 0.0  # COLMAP's
    lg = MatchOptions(matcher="lightglue")
    assert verification_options(lg).two_view_min_inlier_ratio == LIGHTGLUE_MIN_INLIER_RATIO == 0.8
    assert verification_options(MatchOptions(matcher="lightglue", min_inlier_ratio=0.5)).two_view_min_inlier_ratio == 0.5
    with pytest.raises(ValueError, match="min_inlier_ratio"):
        MatchOptions(min_inlier_ratio=1.5)
