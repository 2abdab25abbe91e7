"""Global positioning from known rotations: the convex start and BATA."""
import pytest
import torch

from conftest import tol
from torchsfm import metrics
from torchsfm.mapper.global_positioning import GlobalPositioningOptions, global_positioning
from torchsfm.mapper.tracks import establish_tracks
from torchsfm.synthetic import SyntheticOptions, synthesize


def posed_input(layout: str, seed: int, **kw):
    sc = synthesize(SyntheticOptions(num_images=12, num_points=500, layout=layout, seed=seed, **kw))
    rec = sc.mapper_input()
    rec.images.quat = sc.gt.images.quat.clone()  # rotations known, centres unknown
    rec.images.registered[:] = True
    rec, _ = establish_tracks(rec)
    return sc, rec


@pytest.mark.parametrize("layout", ["ring", "random"])
def test_convex_start_is_exact_on_noiseless_data_and_bata_has_little_left(layout, device, dtype):
    sc, rec = posed_input(layout, seed=7)
    out, counts = global_positioning(rec.to(device, dtype), GlobalPositioningOptions())
    assert out.dtype == dtype
    ev = metrics.evaluate(out.to("cpu", torch.float64), sc.gt)
    assert ev["num_registered"] == 12
    assert ev["median_translation_error_deg"] < tol(dtype, 1e-4, 1e-2)
    # float32: at a noiseless optimum the cost is rounding noise, so the function tolerance fires later
    assert counts["iterations"] <= tol(dtype, 5, 12) and counts["observations_dropped"] == 0


def test_random_start_glomap_style_still_available():
    sc, rec = posed_input("ring", seed=8)
    out, counts = global_positioning(rec, GlobalPositioningOptions(init="random"))
    assert metrics.evaluate(out, sc.gt)["median_translation_error_deg"] < 1e-3
    assert counts["init_iterations"] == 0
    with pytest.raises(ValueError, match="init must be"):
        global_positioning(rec, GlobalPositioningOptions(init="spiral"))


def test_trimming_keeps_wrong_rays_out_of_the_start():
    """Wrong keypoints in 3% of the observations: the least-squares start is solved again without
    the rays it cannot fit, and BATA then starts next to the solution."""
    sc, rec = posed_input("ring", seed=9)
    g = torch.Generator().manual_seed(0)
    bad = torch.rand(len(rec.tracks), generator=g) < 0.03
    kp = rec.keypoints
    n = kp.count()[rec.tracks.image[bad]]
    rec.tracks.keypoint[bad] = (torch.rand(int(bad.sum()), generator=g) * n).to(rec.tracks.keypoint.dtype)
    out, counts = global_positioning(rec, GlobalPositioningOptions())
    assert metrics.evaluate(out, sc.gt)["median_translation_error_deg"] < 0.05
    assert counts["observations_dropped"] >= 0.8 * int(bad.sum())
    one, _ = global_positioning(rec, GlobalPositioningOptions(init_trim_rounds=0))
    assert metrics.evaluate(one, sc.gt)["median_translation_error_deg"] < 0.5


@pytest.mark.parametrize("convex", [False, True])
def test_positioning_problem_in_row_chunks_equals_one_piece(monkeypatch, convex):
    """BATA's (and the convex start's) per-observation parts run in row chunks on the CPU: the
    same residuals, Jacobians and scales as in one piece."""
    import torchsfm.runtime.chunks as chunks
    from torchsfm.mapper.global_positioning import ConvexInitProblem, PositioningProblem
    from torchsfm.solver.problem import Step

    g = torch.Generator().manual_seed(4)
    C, P, N = 6, 20, 61
    c, X = torch.randn(C, 3, generator=g, dtype=torch.float64), 3 * torch.randn(P, 3, generator=g, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(N, 3, generator=g, dtype=torch.float64), dim=1)
    ci, pi = torch.randint(0, C, (N,), generator=g), torch.randint(0, P, (N,), generator=g)
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.5

    def run():
        prob = (ConvexInitProblem(c, X, v, ci, pi, w, 0) if convex else PositioningProblem(c, X, v, ci, pi, w, 0, 1e-5))
        lin = prob.linearize()
        step = Step(0.1 * torch.ones(C, 3, dtype=torch.float64), -0.1 * torch.ones(P, 3, dtype=torch.float64),
                    torch.zeros(0, dtype=torch.float64))
        return [prob.s, lin.residuals, lin.jac_cam, lin.jac_point, prob.residuals(), prob.residuals(step)]

    whole = run()
    monkeypatch.setattr(chunks, "CPU_CHUNK_ROWS", 8)
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    prob = ConvexInitProblem(c, X, v, ci, pi, w, 0) if convex else PositioningProblem(c, X, v, ci, pi, w, 0, 1e-5)
    assert prob.linearize().layout == "soa"  # written in the solver's layout
    if convex:  # exact Jacobians (BATA's are Kaufman's variable-projection approximation)
        from torchsfm.solver import check_jacobians

        chk = check_jacobians(prob, eps=1e-6)
        assert chk.max_rel_error_cam < 1e-6 and chk.max_rel_error_point < 1e-6, chk
