"""Sub-pixel keypoint refinement by patch alignment, in batches of matches (`keypoint_refinement`
drives it from a database).

Learned detectors place keypoints to a fraction of their network's pixel: under a known
homography ALIKED's matched keypoints are 0.23 px off, SIFT's 0.07 (README). For every inlier
match, the second image's patch is aligned to the first's by Gauss-Newton on an affine warp
(shift and 2x2, started from the pair's rotation and scale; intensities normalised per patch), so
each match says how far its second keypoint should move given the first: c_j - A c_i = d. One
correction per keypoint then follows by weighted least squares over all matches at once, each
match weighted by the information its patch carries about the shift (an edge constrains only the
shift across it), with `prior` * |c|^2 pulling keypoints towards their detections (and fixing
each track's free common shift). Translation-only alignment makes ALIKED's keypoints worse
(0.30 px): its patches are turned and scaled between views.

Images are sampled from flat banks (channels, pixels) by bilinear gathers, so a batch of matches
spanning many images is one gather, on the banks' device, with no loop over images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..solver import pcg


def image_channels(grey: np.ndarray, device: torch.device) -> Tensor:
    """(H * W, 3) float32 on `device`: intensity in [0, 1] and its central differences along x
    and y (zero on the border), pixels row-major (a pixel's three values side by side, so that a
    bilinear gather reads them together)."""
    s = torch.from_numpy(np.array(grey, copy=True)).to(device=device, dtype=torch.float32) / 255.0
    gx, gy = torch.zeros_like(s), torch.zeros_like(s)
    gx[:, 1:-1] = (s[:, 2:] - s[:, :-2]) / 2
    gy[1:-1] = (s[2:] - s[:-2]) / 2
    return torch.stack([s, gx, gy], -1).reshape(-1, 3)


@dataclass
class ImageBank:
    """Images concatenated into one (total pixels, 3) tensor; image k starts at offset[k]."""

    data: Tensor
    offset: Tensor  # (k,) int64
    width: Tensor  # (k,) int64
    height: Tensor  # (k,) int64

    @staticmethod
    def build(channels: list[Tensor], sizes: list[tuple[int, int]]) -> ImageBank:
        dev = channels[0].device
        n = torch.tensor([w * h for w, h in sizes], dtype=torch.int64, device=dev)
        return ImageBank(torch.cat(channels, 0), torch.cumsum(n, 0) - n,
                         torch.tensor([w for w, _ in sizes], dtype=torch.int64, device=dev),
                         torch.tensor([h for _, h in sizes], dtype=torch.int64, device=dev))

    def sample(self, image: Tensor, pts: Tensor) -> tuple[Tensor, Tensor]:
        """Bilinear values (m, P, 3) at points (m, P, 2) in COLMAP pixels (centres at +0.5) of
        bank image `image` (m,), and (m,) whether every point lies inside its image."""
        w, h = self.width[image][:, None], self.height[image][:, None]
        wf, hf = w.to(pts.dtype), h.to(pts.dtype)
        u, v = pts[..., 0] - 0.5, pts[..., 1] - 0.5
        inside = ((u >= 0) & (v >= 0) & (u <= wf - 1) & (v <= hf - 1)).all(1)
        u0 = torch.minimum(u.floor().clamp_min(0), (wf - 2).clamp_min(0))
        v0 = torch.minimum(v.floor().clamp_min(0), (hf - 2).clamp_min(0))
        fu, fv = (u - u0).clamp(0, 1), (v - v0).clamp(0, 1)
        base = self.offset[image][:, None] + v0.long() * w + u0.long()
        out = 0
        for corner, wt in ((base, (1 - fu) * (1 - fv)), (base + 1, fu * (1 - fv)), (base + w, (1 - fu) * fv),
                           (base + w + 1, fu * fv)):
            out = out + self.data.index_select(0, corner.reshape(-1)).view(*corner.shape, 3) * wt[..., None]
        return out, inside


def patch_offsets(radius: int, device: torch.device) -> Tensor:
    """(P, 2) integer offsets of a (2 radius + 1)^2 patch, x fastest."""
    o = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    oy, ox = torch.meshgrid(o, o, indexing="ij")
    return torch.stack([ox.reshape(-1), oy.reshape(-1)], -1)


def _normalised(s: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-mean unit-norm intensities (m, P) and the gradients (m, P, 2) scaled alike."""
    v = s[..., 0] - s[..., 0].mean(1, keepdim=True)
    n = v.norm(dim=1, keepdim=True).clamp_min(1e-9)
    return v / n, s[..., 1:] / n[..., None]


@dataclass
class Alignment:
    """Per match: the second keypoint's shift d (m, 2), the warp A (m, 2, 2) from first-image to
    second-image offsets, the final normalised correlation (m,), the information (m, 2, 2) the
    patch carries about d (warp marginalised, over the residual variance), and whether both
    patches lay inside their images (m,)."""

    shift: Tensor
    warp: Tensor
    ncc: Tensor
    information: Tensor
    inside: Tensor


def align_patches(bank1: ImageBank, image1: Tensor, x1: Tensor, bank2: ImageBank, image2: Tensor, x2: Tensor,
                  warp0: Tensor, radius: int, iterations: int, affine: bool = True) -> Alignment:
    """Align the patch around each x2 (image2 of bank2) to the patch around x1 (image1 of bank1)
    by `iterations` Gauss-Newton steps on an affine warp started at warp0 (m, 2, 2), or on the
    shift alone (`affine` False, warp0 kept). Float64 arithmetic on the banks' device; a fixed
    number of steps, no host reads."""
    dt = torch.float64
    offs = patch_offsets(radius, x1.device)
    s1, in1 = bank1.sample(image1, (x1[:, None] + offs[None]).float())
    p1, _ = _normalised(s1.to(dt))
    d = torch.zeros(len(x2), 2, dtype=dt, device=x2.device)
    A = warp0.to(dt).clone()
    k = 6 if affine else 2
    eye = torch.eye(6, dtype=dt, device=x2.device)
    for it in range(iterations + 1):
        s2, in2 = bank2.sample(image2, (x2[:, None] + d[:, None] + torch.einsum("mab,pb->mpa", A, offs)).float())
        p2, g2 = _normalised(s2.to(dt))
        r = p2 - p1
        J = torch.cat([g2, g2 * offs[None, :, :1], g2 * offs[None, :, 1:]], -1)[..., :k]  # d r / d (shift, A by columns)
        H = torch.einsum("mpa,mpb->mab", J, J)
        if it == iterations:  # the last evaluation only scores
            break
        step, info = torch.linalg.solve_ex(H + 1e-6 * eye[:k, :k], -torch.einsum("mpa,mp->ma", J, r))
        step = torch.where((info == 0)[:, None], step, 0).nan_to_num(0.0)  # flat patches stay put
        d = d + step[:, :2]
        if affine:
            A = A + torch.stack([step[:, 2:4], step[:, 4:6]], -1)
    marg = H[:, :2, :2]
    if affine:  # information about the shift alone: the 4 warp parameters marginalised out
        Hta, Haa = H[:, :2, 2:], H[:, 2:, 2:]
        marg = marg - Hta @ torch.linalg.solve_ex(Haa + 1e-9 * eye[:4, :4], Hta.transpose(1, 2))[0]
    sigma2 = (r * r).sum(1) / (r.shape[1] - k)
    information = marg / sigma2.clamp_min(1e-8)[:, None, None]
    ncc = 1 - (r * r).sum(1) / 2
    ok = torch.isfinite(information).flatten(1).all(1) & torch.isfinite(d).all(1)
    return Alignment(d, A, ncc, information.nan_to_num(0.0), in1 & in2 & ok)


def pair_warps(pair: Tensor, x1: Tensor, x2: Tensor, num_pairs: int) -> Tensor:
    """(num_pairs, 2, 2): the rotation and scale that best map each pair's centred first
    keypoints onto its second ones (complex least squares), by scatters over `pair` (m,)."""
    dt = torch.float64
    cnt = torch.zeros(num_pairs, dtype=dt, device=x1.device).index_add_(0, pair, torch.ones(len(pair), dtype=dt, device=x1.device))

    def centred(x: Tensor) -> Tensor:
        mean = torch.zeros(num_pairs, 2, dtype=dt, device=x.device).index_add_(0, pair, x.to(dt))
        return x.to(dt) - (mean / cnt.clamp_min(1)[:, None])[pair]

    p, q = centred(x1), centred(x2)
    # s = sum(conj(z) u) / sum(|z|^2) with z = p, u = q as complex numbers
    re = torch.zeros(num_pairs, dtype=dt, device=x1.device).index_add_(0, pair, p[:, 0] * q[:, 0] + p[:, 1] * q[:, 1])
    im = torch.zeros(num_pairs, dtype=dt, device=x1.device).index_add_(0, pair, p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0])
    zz = torch.zeros(num_pairs, dtype=dt, device=x1.device).index_add_(0, pair, (p * p).sum(1)).clamp_min(1e-12)
    a, b = re / zz, im / zz
    return torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)


def solve_corrections(num_keypoints: int, first: Tensor, second: Tensor, warp: Tensor, shift: Tensor,
                      weight: Tensor, prior: float, max_iterations: int = 500) -> Tensor:
    """Corrections c (num_keypoints, 2) minimising sum_e |c_second - A_e c_first - d_e|^2 in the
    metric W_e, plus prior |c|^2: conjugate gradients with a 2x2 block-Jacobi preconditioner, on
    the inputs' device (the host reads one flag per block of iterations)."""
    dt, dev = torch.float64, shift.device
    A, W, d = warp.to(dt), weight.to(dt), shift.to(dt)
    AtW = A.transpose(1, 2) @ W

    def matvec(flat: Tensor) -> Tensor:
        c = flat.view(num_keypoints, 2)
        res = torch.einsum("eab,eb->ea", W, c[second] - torch.einsum("eab,eb->ea", A, c[first]))
        out = (prior * c).index_add(0, second, res).index_add(0, first, -torch.einsum("eba,eb->ea", A, res))
        return out.reshape(-1)

    diag = prior * torch.eye(2, dtype=dt, device=dev).expand(num_keypoints, 2, 2).clone()
    diag.index_add_(0, second, W).index_add_(0, first, AtW @ A)
    inv = torch.linalg.inv(diag)
    Wd = torch.einsum("eab,eb->ea", W, d)
    b = torch.zeros(num_keypoints, 2, dtype=dt, device=dev).index_add_(0, second, Wd)
    b.index_add_(0, first, -torch.einsum("eba,eb->ea", A, Wd))
    res = pcg.solve(matvec, lambda r: torch.einsum("nab,nb->na", inv, r.view(num_keypoints, 2)).reshape(-1),
                    b.reshape(-1), max_iterations=max_iterations, rtol=1e-8)
    return res.x.view(num_keypoints, 2)
