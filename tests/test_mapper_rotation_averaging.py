import math

import pytest
import torch

from test_mapper_scene import rotation_error_deg
from torchsfm.geometry import so3
from torchsfm.mapper.graph import REASON_COMPONENT
from torchsfm.mapper.rotation_averaging import RotationAveragingOptions, rotation_averaging
from torchsfm.synthetic import SyntheticOptions, synthesize


def scene(seed=0, num_images=20, layout="ring"):
    sc = synthesize(SyntheticOptions(num_images=num_images, num_points=600, layout=layout, seed=seed))
    return sc.gt.images.rotation, sc.mapper_input()


@pytest.mark.parametrize("solver", ["dense", "cholesky", "cg"])
def test_noiseless_relative_rotations_give_exact_rotations(device, dtype, solver):
    from conftest import tol

    R_gt, rec = scene()
    out, rep = rotation_averaging(rec.to(device, dtype), RotationAveragingOptions(linear_solver=solver))
    assert bool(out.images.registered.all())
    assert rep.num_edges_dropped == 0
    assert out.images.quat.dtype == dtype
    err = rotation_error_deg(R_gt, out.images.rotation.cpu().double())
    assert float(err.max()) < tol(dtype, 0.01, 0.02)
    # The gauge: the root image has the identity rotation.
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(out.images.rotation[rep.root].cpu().double(), eye, atol=tol(dtype, 1e-12, 1e-6))


def test_noise_and_corrupted_edges(device):
    R_gt, rec = scene(seed=1, layout="random")
    vg = rec.view_graph
    E = len(vg)
    g = torch.Generator().manual_seed(5)
    noise = so3.exp(torch.randn(E, 3, generator=g, dtype=torch.float64) * math.radians(0.3))
    R_rel = noise @ so3.quat_to_matrix(vg.rel_quat)
    bad = torch.randperm(E, generator=g)[:6]
    # Corrupt by large rotations (>= 30 deg) about random axes.
    axis = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=-1)
    ang = math.radians(30) + torch.rand(6, 1, generator=g, dtype=torch.float64) * math.radians(120)
    R_rel[bad] = so3.exp(axis * ang) @ R_rel[bad]
    vg.rel_quat = so3.matrix_to_quat(R_rel)
    out, rep = rotation_averaging(rec.to(device))
    err = rotation_error_deg(R_gt, out.images.rotation.cpu())
    assert bool(out.images.registered.all())
    assert float(err.max()) < 0.5
    valid = out.view_graph.valid.cpu()
    assert not bool(valid[bad].any()), "corrupted edges must be dropped"
    assert int((~valid).sum()) <= 6 + 2  # hardly any good edge is lost
    assert float(rep.residual_deg[valid].max()) < RotationAveragingOptions().max_rotation_error_deg


def test_disconnected_graph_keeps_largest_component(device):
    R_gt, rec = scene(seed=2)
    vg = rec.view_graph
    group_a = torch.arange(20) < 7  # images 0..6 against 7..19: cut every edge across
    cross = group_a[vg.pairs[:, 0]] != group_a[vg.pairs[:, 1]]
    vg.valid = vg.valid & ~cross
    out, rep = rotation_averaging(rec.to(device))
    reg = out.images.registered.cpu()
    assert torch.equal(reg, ~group_a)
    assert out.meta["image_reason"][:7] == [REASON_COMPONENT] * 7
    assert all(r == "" for r in out.meta["image_reason"][7:])
    assert not bool(out.view_graph.valid.cpu()[group_a[vg.pairs[:, 0]]].any())
    err = rotation_error_deg(R_gt[~group_a], out.images.rotation.cpu()[~group_a])
    assert float(err.max()) < 0.01
    assert rep.num_images_registered == 13


def test_no_valid_pairs_registers_nothing():
    _, rec = scene(seed=3, num_images=6)
    rec.view_graph.valid[:] = False
    out, rep = rotation_averaging(rec)
    assert not bool(out.images.registered.any())
    assert rep.num_edges_used == 0
