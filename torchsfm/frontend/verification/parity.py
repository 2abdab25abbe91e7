"""pycolmap's verification on the same flat data, and the agreement measures of the parity tests
and benchmarks/bench_verification.py (accept/reject agreement, inlier-set Jaccard, confusion)."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from ...data.model import Cameras
from ...segments import rows_of
from ...io.database import UNVERIFIED_CONFIGS
from .options import VerificationOptions

CONFIG_NAMES = {0: "undefined", 1: "degenerate", 2: "calibrated", 3: "uncalibrated", 4: "planar", 5: "panoramic",
                6: "planar_or_panoramic", 7: "watermark", 8: "multiple", 9: "calibrated_rig"}


def pycolmap_options(opt: VerificationOptions):
    """The pycolmap.TwoViewGeometryOptions equal to `opt`."""
    import pycolmap

    o = pycolmap.TwoViewGeometryOptions()
    for name in ("min_num_inliers", "min_E_F_inlier_ratio", "max_H_inlier_ratio", "watermark_min_inlier_ratio",
                 "watermark_border_size", "watermark_detection_max_error", "detect_watermark",
                 "multiple_ignore_watermark", "compute_relative_pose"):
        setattr(o, name, getattr(opt, name))
    o.min_inlier_ratio = opt.two_view_min_inlier_ratio
    o.ransac.max_error = opt.max_error
    o.ransac.confidence = opt.confidence
    o.ransac.min_num_trials = opt.min_num_trials
    o.ransac.max_num_trials = opt.max_num_trials
    o.ransac.min_inlier_ratio = opt.min_inlier_ratio
    o.ransac.dyn_num_trials_multiplier = opt.dyn_num_trials_multiplier
    o.ransac.random_seed = opt.seed
    return o


def pycolmap_cameras(cameras: Cameras) -> list:
    """One pycolmap.Camera per row (camera_id, model, size, parameters, focal prior kept)."""
    import pycolmap

    from ...data.camera_models import model_info

    out = []
    for i in range(len(cameras)):
        info = model_info(int(cameras.model_id[i]))
        cam = pycolmap.Camera.create_from_model_id(int(cameras.camera_id[i]), getattr(pycolmap.CameraModelId, info.name),
                                                   1.0, int(cameras.width[i]), int(cameras.height[i]))
        cam.params = cameras.params[i, :info.num_params].double().cpu().numpy()
        cam.has_prior_focal_length = bool(cameras.has_prior_focal_length[i])
        out.append(cam)
    return out


def pycolmap_verify(xy: Tensor, offsets: Tensor, pairs: Tensor, matches: Tensor, match_offsets: Tensor,
                    cameras: Cameras, image_camera: Tensor, options: VerificationOptions | None = None
                    ) -> tuple[Tensor, Tensor, float, float]:
    """pycolmap.estimate_two_view_geometry on every pair (one thread): config (P,), flat inlier
    mask (Q,) aligned with `matches`, and the wall and CPU seconds spent in the estimator."""
    import pycolmap

    opt = pycolmap_options(options or VerificationOptions())
    cams = pycolmap_cameras(cameras)
    xy_np, off = xy.double().cpu().numpy(), offsets.cpu().numpy()
    m_np, mo = matches.cpu().numpy(), match_offsets.cpu().numpy()
    cam_of = image_camera.cpu().numpy()
    config = np.zeros(pairs.shape[0], np.int64)
    inliers = np.zeros(m_np.shape[0], bool)
    seconds = cpu = 0.0
    for p, (a, b) in enumerate(pairs.cpu().numpy()):
        m = m_np[mo[p]:mo[p + 1]]
        t, c = time.perf_counter(), time.process_time()
        g = pycolmap.estimate_two_view_geometry(cams[cam_of[a]], xy_np[off[a]:off[a + 1]], cams[cam_of[b]],
                                                xy_np[off[b]:off[b + 1]], m.astype(np.uint32), opt)
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        config[p] = int(g.config)
        im = np.asarray(g.inlier_matches, np.int64).reshape(-1, 2)
        if len(im) and len(m):
            key = m[:, 0] * (int(m[:, 1].max()) + 1) + m[:, 1]
            inliers[mo[p]:mo[p + 1]] = np.isin(key, im[:, 0] * (int(m[:, 1].max()) + 1) + im[:, 1])
    return torch.from_numpy(config), torch.from_numpy(inliers), seconds, cpu


def accepted(config: Tensor) -> Tensor:
    """Pairs a mapper uses: not undefined, degenerate, watermark or multiple."""
    return ~torch.isin(config, torch.tensor(UNVERIFIED_CONFIGS, device=config.device))


def compare(config_a: Tensor, inliers_a: Tensor, config_b: Tensor, inliers_b: Tensor, match_offsets: Tensor) -> dict:
    """Accept/reject agreement, inlier-set Jaccard over the pairs either side accepts, and the
    configuration confusion counts {(a, b): n} of two verifications of the same matches."""
    acc_a, acc_b = accepted(config_a.cpu()), accepted(config_b.cpu())
    P = config_a.numel()
    pair = rows_of(match_offsets.cpu())
    a, b = inliers_a.cpu() & acc_a[pair], inliers_b.cpu() & acc_b[pair]
    inter = torch.zeros(P).index_add_(0, pair, (a & b).float())
    union = torch.zeros(P).index_add_(0, pair, (a | b).float())
    either = acc_a | acc_b
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.ones(P))[either]
    confusion: dict = {}
    for x, y in zip(config_a.tolist(), config_b.tolist()):
        k = (CONFIG_NAMES.get(x, str(x)), CONFIG_NAMES.get(y, str(y)))
        confusion[k] = confusion.get(k, 0) + 1
    return {
        "pairs": P, "accepted_a": int(acc_a.sum()), "accepted_b": int(acc_b.sum()),
        "agreement": float((acc_a == acc_b).float().mean()) if P else 1.0,
        "jaccard_median": float(jac.median()) if jac.numel() else 1.0,
        "jaccard_mean": float(jac.mean()) if jac.numel() else 1.0,
        "inliers_a": int(a.sum()), "inliers_b": int(b.sum()),
        "confusion": {f"{k[0]}->{k[1]}": v for k, v in sorted(confusion.items())},
    }


def match_without_verification(database, num_threads: int | None = None) -> None:
    """Raw matches of all image pairs of a database with features (pycolmap's exhaustive matcher,
    COLMAP's defaults: ratio 0.8, distance 0.7, cross-check). COLMAP 4.2 stores a pair's matches
    only when its verification ran (min_num_inliers 10**6 stores nothing), so the verification
    is made a no-op instead: one RANSAC trial, no minimum."""
    import os

    import pycolmap

    mo = pycolmap.FeatureMatchingOptions()
    mo.num_threads = num_threads or os.cpu_count() or 1
    vo = pycolmap.TwoViewGeometryOptions()
    vo.min_num_inliers, vo.ransac.max_num_trials, vo.ransac.min_num_trials = 0, 1, 0
    pycolmap.match_exhaustive(str(database), matching_options=mo, verification_options=vo, device=pycolmap.Device.cpu)


def flat_inputs(database, per_image_cameras: bool = False) -> dict:
    """The raw matches of a database as `verify_all` / `make_pair_batches` take them: xy, offsets,
    pairs, matches, match_offsets, cameras, image_camera (+ names, image_ids). With
    `per_image_cameras` every image gets its own copy of its camera (COLMAP then no longer
    takes the shared-camera path)."""
    from ...io.database import read_view_graph

    cameras, images, keypoints, vg = read_view_graph(database, source="matches")
    image_camera = images.camera
    if per_image_cameras:
        rows = image_camera
        cameras = Cameras(camera_id=torch.arange(1, rows.numel() + 1), model_id=cameras.model_id[rows],
                          width=cameras.width[rows], height=cameras.height[rows], params=cameras.params[rows],
                          has_prior_focal_length=cameras.has_prior_focal_length[rows])
        image_camera = torch.arange(rows.numel())
    return {"xy": keypoints.xy, "offsets": keypoints.offsets, "pairs": vg.pairs, "matches": vg.matches,
            "match_offsets": vg.match_offsets, "cameras": cameras, "image_camera": image_camera,
            "names": list(images.name), "image_ids": images.image_id}
