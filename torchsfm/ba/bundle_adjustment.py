"""Bundle adjustment of a Reconstruction: reprojection error over poses, intrinsics and points.

Residual of an observation (image i, point j, keypoint x): project(camera(i), R_i X_j + t_i) - x,
zeroed (with zero Jacobians) while the point is behind the camera (COLMAP's depth guard), so the
cost is exactly the one pycolmap/Ceres minimise. Pose updates on the left:
R <- Exp(dw) R, t <- Exp(dw) t + dt (the chart of cameras.projection).

Parameters in the solver (torchsfm.solver):
- camera block = one registered image: [pose (6) | its camera's refined intrinsics (m)], where m
  is the largest number of refined intrinsics over the cameras in use;
- eliminated block = one 3D point (Schur complement, 3x3 inverses);
- the reduced system is [poses | intrinsics]: `cam_param_map` sends each image's intrinsic
  columns to its camera's unknowns, so intrinsics shared by many images are one set of unknowns
  (the solver assembles P^T S P). Constant poses, constant intrinsics and gauge-fixed
  coordinates map to -1. This keeps every camera block the same size (batched GEMMs) while the
  number of intrinsic unknowns stays per camera, not per image.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cameras.models import model_groups, param_mask, used_mask
from ..cameras.projection import project_world
from ..data.model import Reconstruction, Tracks
from ..geometry import se3, so3
from ..solver import layout
from ..solver.lm import solve
from ..solver.options import SolverOptions, SolverSummary
from ..solver.problem import Linearization, Step

logger = logging.getLogger(__name__)

GAUGES = ("none", "two_cams")


@dataclass
class BundleAdjustmentOptions:
    refine_focal_length: bool = True
    refine_principal_point: bool = False
    refine_extra_params: bool = True
    refine_poses: bool = True
    refine_points: bool = True
    # Points observed by fewer registered images are left out (and unchanged).
    min_track_length: int = 0
    # Rows (into Images / Points3D / Cameras) held constant.
    constant_images: list[int] = field(default_factory=list)
    constant_points: list[int] = field(default_factory=list)
    constant_cameras: list[int] = field(default_factory=list)  # intrinsics of these cameras
    # (C, MAX_CAMERA_PARAMS) bool: the intrinsics refined per camera, replacing the three refine_*
    # switches above (per-camera model selection: torchsfm.mapper.intrinsics_selection)
    intrinsics_mask: torch.Tensor | None = None
    # Gauge: "none" leaves the 7-dof similarity to the LM damping (as Ceres does when nothing is
    # fixed); "two_cams" fixes the first image's pose and the largest coordinate of the second
    # image's translation relative to it (COLMAP's TWO_CAMS_FROM_WORLD).
    gauge: str = "none"
    solver: SolverOptions = field(default_factory=SolverOptions)


class ReprojectionProblem:
    """`SparseProblem` over a Reconstruction's registered images, cameras and points."""

    point_dim = 3

    def __init__(self, rec: Reconstruction, options: BundleAdjustmentOptions | None = None):
        o = options or BundleAdjustmentOptions()
        if o.gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, not {o.gauge!r}")
        self.rec = rec
        dev = rec.device
        self.dtype = rec.dtype
        imgs, tracks = rec.images, rec.tracks
        I, P = len(imgs), len(rec.points3D)
        # observations in the problem: registered images, long enough tracks
        obs_ok = imgs.registered[tracks.image]
        track_len = torch.bincount(tracks.point[obs_ok], minlength=P)
        obs_ok &= track_len[tracks.point] >= max(int(o.min_track_length), 1)
        self.obs = torch.nonzero(obs_ok)[:, 0]
        img_of_obs = tracks.image[self.obs]
        # camera blocks: images with observations
        self.images = torch.unique(img_of_obs)
        block_of_image = torch.full((I,), -1, dtype=torch.long, device=dev)
        block_of_image[self.images] = torch.arange(self.images.numel(), device=dev)
        self.cam_index = block_of_image[img_of_obs]
        self.points = torch.unique(tracks.point[self.obs])
        pt_row = torch.full((P,), -1, dtype=torch.long, device=dev)
        pt_row[self.points] = torch.arange(self.points.numel(), device=dev)
        self.point_index = pt_row[tracks.point[self.obs]]
        self.xy = rec.observation_xy_of(Tracks(tracks.point[self.obs], tracks.image[self.obs],
                                                tracks.keypoint[self.obs]))  # gathered once, only these
        # observations per evaluation chunk: ~1 kB of projection temporaries each (solver chunk_bytes)
        chunk_bytes = o.solver.chunk_bytes or ((4 << 20) if dev.type == "cpu" else (512 << 20))
        self.obs_chunk = max(1 << 16, chunk_bytes // 1024)
        self.num_cams, self.num_points = int(self.images.numel()), int(self.points.numel())

        # state
        self.R = so3.quat_to_matrix(imgs.quat[self.images])
        self.t = imgs.trans[self.images].clone()
        self.params = rec.cameras.params.clone()
        self.X = rec.points3D.xyz[self.points].clone()
        self.camera_of_block = imgs.camera[self.images]
        # each evaluation chunk's camera-model rows, found once (a host read), not per iteration
        self._groups: dict[tuple, list] = {}
        n_obs = int(self.cam_index.numel())
        for s in range(0, n_obs, self.obs_chunk) if n_obs > self.obs_chunk else [None]:
            self._chunk_groups(slice(None) if s is None else slice(s, s + self.obs_chunk))

        # intrinsics: refined columns per camera, padded to m
        cams = rec.cameras
        if o.intrinsics_mask is not None:
            refine = o.intrinsics_mask.to(dev, torch.bool) & used_mask(cams)
        else:
            refine = param_mask(cams, o.refine_focal_length, o.refine_principal_point, o.refine_extra_params)
        if o.constant_cameras:
            refine[torch.as_tensor(o.constant_cameras, device=dev)] = False
        used_cams = torch.zeros(len(cams), dtype=torch.bool, device=dev)
        used_cams[self.camera_of_block] = True
        refine &= used_cams[:, None]
        m = int(refine.sum(1).max()) if len(cams) else 0
        # column j of camera c's refined list -> its parameter column (pad: 0, masked below)
        order = torch.sort((~refine).to(torch.int8), dim=1, stable=True).indices[:, :m]  # refined first
        self.intr_cols = order  # (num cameras, m)
        self.intr_valid = torch.gather(refine, 1, order) if m else refine[:, :0]
        self.m = m
        self.cam_dim = 6 + m

        # reduced numbering: free pose coordinates, then intrinsics per camera
        pose_free = torch.full((self.num_cams, 6), bool(o.refine_poses), dtype=torch.bool, device=dev)
        if o.constant_images:
            const = torch.zeros(I, dtype=torch.bool, device=dev)
            const[torch.as_tensor(o.constant_images, device=dev)] = True
            pose_free &= ~const[self.images][:, None]
        if o.gauge == "two_cams" and o.refine_poses and self.num_cams >= 2:
            pose_free[0] = False
            c0 = se3.center(self.R[0], self.t[0])
            c1 = se3.center(self.R[1], self.t[1])
            # in camera 1's frame the baseline changes its translation along R1 (c1 - c0)
            base = self.R[1] @ (c1 - c0)
            pose_free[1, 3 + int(base.abs().argmax())] = False
        n_pose = int(pose_free.sum())
        pm = torch.full((self.num_cams, self.cam_dim), -1, dtype=torch.long, device=dev)
        pm[:, :6][pose_free] = torch.arange(n_pose, device=dev)
        intr_ids = torch.full((len(cams), m), -1, dtype=torch.long, device=dev)
        n_intr = int(self.intr_valid.sum())
        intr_ids[self.intr_valid] = n_pose + torch.arange(n_intr, device=dev)
        pm[:, 6:] = intr_ids[self.camera_of_block]
        self.cam_param_map = pm
        self.n_pose = n_pose
        # reduced intrinsic unknown -> (camera row, parameter column)
        cam_rows = torch.arange(len(cams), device=dev)[:, None].expand(-1, m)
        self.intr_unknown_cam = cam_rows[self.intr_valid]
        self.intr_unknown_col = self.intr_cols[self.intr_valid]

        self.point_free = torch.full((self.num_points,), bool(o.refine_points), dtype=torch.bool, device=dev)
        if o.constant_points:
            constp = torch.zeros(P, dtype=torch.bool, device=dev)
            constp[torch.as_tensor(o.constant_points, device=dev)] = True
            self.point_free &= ~constp[self.points]
        self._trial = None

    # -- model --------------------------------------------------------------------------------
    def _chunk_groups(self, sl: slice) -> list:
        key = (sl.start, sl.stop)
        if key not in self._groups:
            self._groups[key] = model_groups(self.rec.cameras, self.camera_of_block[self.cam_index[sl]])
        return self._groups[key]

    def _evaluate(self, R, t, params, X, jacobian: bool, sl: slice = slice(None)):
        """Residuals (and Jacobians) of the observations `sl`."""
        cams = self.rec.cameras
        if params is not cams.params:
            cams = type(cams)(cams.camera_id, cams.model_id, cams.width, cams.height, params,
                              cams.has_prior_focal_length)
        ci, pi, xy = self.cam_index[sl], self.point_index[sl], self.xy[sl]
        cam = self.camera_of_block[ci]
        proj = project_world(cams, cam, R[ci], t[ci], X[pi], jacobian=jacobian, groups=self._chunk_groups(sl))
        valid = proj.valid
        r = torch.where(valid[:, None], proj.uv - xy, torch.zeros_like(xy))
        if not jacobian:
            return r, None, None
        Jintr = torch.gather(proj.J_params, 2, self.intr_cols[cam][:, None, :].expand(-1, 2, -1))
        Jintr = Jintr * self.intr_valid[cam][:, None, :].to(Jintr.dtype)
        Jc = torch.cat([proj.J_pose, Jintr], 2)
        Jp = proj.J_X * self.point_free[pi][:, None, None].to(proj.J_X.dtype)
        return r, Jc, Jp  # invalid rows already have zero Jacobians

    def _evaluate_chunked(self, R, t, params, X, jacobian: bool, soa: bool = False):
        """`_evaluate` over all observations in chunks written into the outputs: the projection's
        Jacobian temporaries (~1 kB per observation) stay bounded by the chunk, not the problem.
        soa: the outputs in the solver's layout (observations last), each chunk transposed as it
        is written, so the whole problem is never held in both layouts at once."""
        n = int(self.cam_index.numel())
        if n <= self.obs_chunk:
            out = self._evaluate(R, t, params, X, jacobian)
            return tuple(None if p is None else layout.rows_to_soa(p) for p in out) if soa else out
        out = None
        for s in range(0, n, self.obs_chunk):
            part = self._evaluate(R, t, params, X, jacobian, slice(s, s + self.obs_chunk))
            if out is None:
                out = [None if p is None else p.new_empty((*p.shape[1:], n) if soa else (n, *p.shape[1:]))
                       for p in part]
            for o, p in zip(out, part):
                if p is not None and soa:
                    o[..., s:s + p.shape[0]] = layout.rows_to_soa(p)
                elif p is not None:
                    o[s:s + p.shape[0]] = p
        return tuple(out)

    def _retract(self, step: Step):
        R, t = se3.left_update(self.R, self.t, step.cams[:, :6])
        params = self.params
        if self.intr_unknown_cam.numel():
            params = params.clone()
            params.index_put_((self.intr_unknown_cam, self.intr_unknown_col), step.reduced[self.n_pose:],
                              accumulate=True)
        return R, t, params, self.X + step.points

    # -- SparseProblem --------------------------------------------------------------------------
    def linearize(self) -> Linearization:
        r, Jc, Jp = self._evaluate_chunked(self.R, self.t, self.params, self.X, True, soa=True)
        return Linearization(r, Jc, Jp, "soa")

    def residuals(self, step: Step | None = None) -> Tensor:
        if step is None:
            return self._evaluate_chunked(self.R, self.t, self.params, self.X, False)[0]
        self._trial = (step, self._retract(step))
        return self._evaluate_chunked(*self._trial[1], False)[0]

    def accept(self, step: Step) -> None:
        if self._trial is not None and self._trial[0] is step:
            self.R, self.t, self.params, self.X = self._trial[1]
        else:
            self.R, self.t, self.params, self.X = self._retract(step)
        self._trial = None

    def parameter_norm(self) -> Tensor:
        # Ceres' |x| over the parameter blocks: unit quaternions, translations, intrinsics, points
        return torch.sqrt(self.num_cams + self.t.square().sum() + self.params.square().sum() + self.X.square().sum())

    # -- results ----------------------------------------------------------------------------
    def cost(self) -> float:
        return 0.5 * float(self.residuals().to(torch.float64).square().sum())

    def write(self, rec: Reconstruction | None = None) -> Reconstruction:
        """The input with the adjusted poses, intrinsics, points and point errors.

        Copy-on-write: new image, camera and point containers (their adjusted tensors are new);
        keypoints, tracks and the view graph are shared with the input, since no stage modifies
        its input in place. A BA round so copies O(images + points), never the matches."""
        src = rec or self.rec
        moved = (self.cam_param_map[:, :6] >= 0).any(1)  # constant poses keep their exact quaternion
        quat, trans = src.images.quat.clone(), src.images.trans.clone()
        quat[self.images[moved]] = so3.matrix_to_quat(self.R[moved]).to(quat.dtype)
        trans[self.images[moved]] = self.t[moved].to(trans.dtype)
        xyz, error = src.points3D.xyz.clone(), src.points3D.error.clone()
        xyz[self.points] = self.X.to(xyz.dtype)
        r = self.residuals()
        err = torch.zeros(self.num_points, dtype=r.dtype, device=r.device).index_add_(0, self.point_index, r.norm(dim=1))
        cnt = torch.bincount(self.point_index, minlength=self.num_points).clamp_min(1)
        error[self.points] = (err / cnt).to(error.dtype)
        return Reconstruction(dataclasses.replace(src.cameras, params=self.params.clone()),
                              dataclasses.replace(src.images, quat=quat, trans=trans), src.keypoints,
                              dataclasses.replace(src.points3D, xyz=xyz, error=error), src.tracks, src.view_graph,
                              dict(src.meta))


def bundle_adjust(rec: Reconstruction, options: BundleAdjustmentOptions | None = None
                  ) -> tuple[Reconstruction, SolverSummary]:
    """Jointly refine poses, intrinsics and points of `rec`; returns (adjusted copy, summary).

    Runs on rec's device and dtype. The input is not modified (the result shares its unchanged
    tensors: keypoints, tracks, view graph).
    """
    o = options or BundleAdjustmentOptions()
    problem = ReprojectionProblem(rec, o)
    if problem.num_cams == 0 or problem.obs.numel() == 0:
        summary = SolverSummary(termination="no_parameters", message="no observations to adjust")
        return Reconstruction(rec.cameras, rec.images, rec.keypoints, rec.points3D, rec.tracks, rec.view_graph,
                              dict(rec.meta)), summary
    summary = solve(problem, o.solver)
    logger.info("bundle adjustment: %s", summary.brief())
    return problem.write(), summary
