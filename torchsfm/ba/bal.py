"""BAL ("Bundle Adjustment in the Large", Agarwal et al. 2010) problems.

Format: `<C> <P> <N>`, N lines `cam pt x y`, 9*C camera values (angle-axis[3], t[3], f, k1, k2),
3*P point values. Projection of world point X: P = R X + t, p = -P.xy / P.z,
u = f (1 + k1 |p|^2 + k2 |p|^4) p; residual u - observed.

The BAL camera looks down -z. With M = diag(1, 1, -1), X' = M X, R' = M R M, t' = M t give
P'.xy / P'.z = -P.xy / P.z with positive depth, so a BAL camera is exactly a COLMAP RADIAL camera
(f, cx = cy = 0, k1, k2) in the mirrored world. That is how BAL problems reach pycolmap/Ceres
and the data model.

`BALProblem` implements the solver's `SparseProblem` with its own residual and analytic
Jacobians, so the solver can be tested and benchmarked without the camera-model module.
"""
from __future__ import annotations

import bz2
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..geometry import se3, so3
from ..solver import layout
from ..solver.problem import Linearization, Step

MIRROR = np.diag([1.0, 1.0, -1.0])


@dataclass
class BALData:
    name: str
    cam_index: np.ndarray  # (N,) int64
    point_index: np.ndarray  # (N,) int64
    observations: np.ndarray  # (N, 2)
    cameras: np.ndarray  # (C, 9): angle-axis, t, f, k1, k2
    points: np.ndarray  # (P, 3)

    @property
    def num_cameras(self) -> int:
        return int(self.cameras.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_observations(self) -> int:
        return int(self.observations.shape[0])


def load_bal(path: str | os.PathLike) -> BALData:
    path = str(path)
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rt") as fh:
        vals = np.array(fh.read().split(), dtype=np.float64)
    nc, npt, nobs = (int(v) for v in vals[:3])
    o = 3
    ob = vals[o : o + 4 * nobs].reshape(nobs, 4)
    o += 4 * nobs
    cams = vals[o : o + 9 * nc].reshape(nc, 9).copy()
    o += 9 * nc
    pts = vals[o : o + 3 * npt].reshape(npt, 3).copy()
    o += 3 * npt
    if o != vals.size:
        raise ValueError(f"{path}: expected {o} values, found {vals.size}")
    name = os.path.basename(path).split(".")[0]
    return BALData(name, ob[:, 0].astype(np.int64), ob[:, 1].astype(np.int64), ob[:, 2:4].copy(), cams, pts)


def rotations(data: BALData) -> np.ndarray:
    return so3.exp(torch.from_numpy(data.cameras[:, :3])).numpy()


def camera_points(data: BALData) -> np.ndarray:
    """P = R X + t per observation (N, 3), BAL convention (in front of the camera: P.z < 0)."""
    R = rotations(data)
    X = data.points[data.point_index]
    return np.einsum("nij,nj->ni", R[data.cam_index], X) + data.cameras[data.cam_index, 3:6]


def drop_behind(data: BALData) -> BALData:
    """Drop observations whose point is behind its camera (P.z >= 0) at the initial state.

    COLMAP/Ceres (through pycolmap) zero such residuals while plain BAL counts them; dropping them
    up front makes both conventions minimise the same function. Points left without
    observations are removed.
    """
    keep = camera_points(data)[:, 2] < 0
    if keep.all():
        return data
    used = np.unique(data.point_index[keep])
    remap = np.full(data.num_points, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return replace(
        data, cam_index=data.cam_index[keep], point_index=remap[data.point_index[keep]],
        observations=data.observations[keep], points=data.points[used],
    )


def residuals_np(data: BALData) -> np.ndarray:
    P = camera_points(data)
    c = data.cameras[data.cam_index]
    p = -P[:, :2] / P[:, 2:3]
    n2 = (p * p).sum(1, keepdims=True)
    return c[:, 6:7] * (1.0 + c[:, 7:8] * n2 + c[:, 8:9] * n2 * n2) * p - data.observations


def cost_np(data: BALData) -> float:
    """0.5 * sum |r|^2, trivial loss (numpy reference)."""
    return 0.5 * float((residuals_np(data) ** 2).sum())


# ----------------------------------------------------------------------------------------------
class BALProblem:
    """BAL camera (9 parameters per camera block: dw, dt, df, dk1, dk2) + points, for the solver.

    Pose update on the left, as everywhere in torchsfm: R <- Exp(dw) R, t <- Exp(dw) t + dt.
    `constant_cameras` (C,) bool keeps whole cameras fixed (gauge or tests).
    """

    cam_dim = 9
    point_dim = 3

    def __init__(self, data: BALData, device="cpu", dtype=torch.float64, constant_cameras: Tensor | None = None):
        T = lambda x, dt=dtype: torch.as_tensor(np.ascontiguousarray(x), dtype=dt, device=device)  # noqa: E731
        self.data = data
        self.cam_index = T(data.cam_index, torch.long)
        self.point_index = T(data.point_index, torch.long)
        self.obs = T(data.observations)
        self.obs_soa = self.obs.T.contiguous()
        self.R = so3.exp(T(data.cameras[:, :3]))
        self.t = T(data.cameras[:, 3:6])
        self.intr = T(data.cameras[:, 6:9])
        self.X = T(data.points)
        self.num_cams, self.num_points = data.num_cameras, data.num_points
        self.cam_param_map = None
        if constant_cameras is not None:
            from ..solver.problem import compact_param_map, identity_param_map

            pm = identity_param_map(self.num_cams, 9, device=self.cam_index.device)
            pm[constant_cameras.to(pm.device)] = -1
            self.cam_param_map, _ = compact_param_map(pm)
        self._trial = None

    # -- model ------------------------------------------------------------------------------
    def _project(self, R, t, intr, X, jacobian: bool):
        """Residuals (2, N) and, with jacobian, Jc (2, 9, N), Jp (2, 3, N): SoA layout, each
        quantity a contiguous vector over observations."""
        C = R.shape[0]
        cam = layout.gather_soa(torch.cat([R.reshape(C, 9), t, intr], 1), self.cam_index)  # (15, N)
        Xo = layout.gather_soa(X, self.point_index)  # (3, N)
        Rc = cam[:9]
        P = [Rc[3 * j] * Xo[0] + Rc[3 * j + 1] * Xo[1] + Rc[3 * j + 2] * Xo[2] + cam[9 + j] for j in range(3)]
        iz = 1.0 / P[2]
        p0, p1 = -P[0] * iz, -P[1] * iz
        n = p0 * p0 + p1 * p1
        f, k1, k2 = cam[12], cam[13], cam[14]
        s = 1 + (k1 + k2 * n) * n
        fs = f * s
        r = torch.stack([fs * p0, fs * p1]) - self.obs_soa
        if not jacobian:
            return r, None, None
        # A = du/dP = du/dp dp/dP with du/dp = f s I + f g p p^T, dp/dP = -(1/z) [I | p]
        fg = f * 2 * (k1 + 2 * k2 * n)
        m = -iz
        a01 = m * fg * p0 * p1
        h = m * (fs + fg * n)
        A = ((m * (fs + fg * p0 * p0), a01, h * p0), (a01, m * (fs + fg * p1 * p1), h * p1))
        Jc = torch.empty(2, 9, r.shape[1], dtype=r.dtype, device=r.device)
        Jp = torch.empty(2, 3, r.shape[1], dtype=r.dtype, device=r.device)
        fn = f * n
        for i, (a0, a1, a2) in enumerate(A):
            pi_ = p0 if i == 0 else p1
            # left update: dP/dw = -[P]x, so d r_i / dw = -a [P]x = P x a
            torch.sub(P[1] * a2, P[2] * a1, out=Jc[i, 0])
            torch.sub(P[2] * a0, P[0] * a2, out=Jc[i, 1])
            torch.sub(P[0] * a1, P[1] * a0, out=Jc[i, 2])
            Jc[i, 3], Jc[i, 4], Jc[i, 5] = a0, a1, a2
            torch.mul(s, pi_, out=Jc[i, 6])
            torch.mul(fn, pi_, out=Jc[i, 7])
            torch.mul(Jc[i, 7], n, out=Jc[i, 8])
            for j in range(3):  # d r_i / dX = a R
                torch.addcmul(a0 * Rc[j], a1, Rc[3 + j], out=Jp[i, j])
                Jp[i, j].addcmul_(a2, Rc[6 + j])
        return r, Jc, Jp

    def _retract(self, step: Step):
        R, t = se3.left_update(self.R, self.t, step.cams[:, :6])
        return R, t, self.intr + step.cams[:, 6:9], self.X + step.points

    # -- SparseProblem -------------------------------------------------------------------------
    def linearize(self) -> Linearization:
        r, Jc, Jp = self._project(self.R, self.t, self.intr, self.X, True)
        return Linearization(r, Jc, Jp, layout="soa")

    def residuals(self, step: Step | None = None) -> Tensor:
        if step is None:
            return self._project(self.R, self.t, self.intr, self.X, False)[0].T
        self._trial = (step, self._retract(step))
        return self._project(*self._trial[1], False)[0].T

    def accept(self, step: Step) -> None:
        if self._trial is not None and self._trial[0] is step:
            self.R, self.t, self.intr, self.X = self._trial[1]
        else:
            self.R, self.t, self.intr, self.X = self._retract(step)
        self._trial = None

    def parameter_norm(self) -> float:
        return float(torch.sqrt(self.R.square().sum() + self.t.square().sum() + self.intr.square().sum()
                                + self.X.square().sum()))

    def to_data(self) -> BALData:
        cams = torch.cat([so3.log(self.R), self.t, self.intr], 1).cpu().double().numpy()
        return replace(self.data, cameras=cams, points=self.X.cpu().double().numpy())


# ----------------------------------------------------------------------------------------------
def mirrored_poses(data: BALData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R', t', X') of the equivalent COLMAP-convention (+z looking) scene."""
    R = rotations(data)
    return MIRROR @ R @ MIRROR, data.cameras[:, 3:6] @ MIRROR, data.points @ MIRROR


def to_reconstruction(data: BALData, dtype=torch.float64):
    """The BAL problem as a torchsfm Reconstruction with one RADIAL camera per image."""
    from ..data.camera_models import model_id
    from ..data.model import MAX_CAMERA_PARAMS, Cameras, Images, Keypoints, Points3D, Reconstruction, Tracks, offsets_from_counts

    C, P, N = data.num_cameras, data.num_points, data.num_observations
    Rm, tm, Xm = mirrored_poses(data)
    params = np.zeros((C, MAX_CAMERA_PARAMS))
    params[:, 0] = data.cameras[:, 6]
    params[:, 3:5] = data.cameras[:, 7:9]
    # keypoints: observations of each image, in image order
    order = np.argsort(data.cam_index, kind="stable")
    counts = np.bincount(data.cam_index, minlength=C)
    kp_of_obs = np.empty(N, dtype=np.int64)
    kp_of_obs[order] = np.arange(N) - np.repeat(np.cumsum(counts) - counts, counts)
    tr = np.argsort(data.point_index, kind="stable")
    L = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long)  # noqa: E731
    F = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)  # noqa: E731
    return Reconstruction(
        cameras=Cameras(
            camera_id=torch.arange(1, C + 1), model_id=torch.full((C,), model_id("RADIAL")),
            width=torch.full((C,), 2000), height=torch.full((C,), 2000), params=F(params),
            has_prior_focal_length=torch.zeros(C, dtype=torch.bool),
        ),
        images=Images(
            image_id=torch.arange(1, C + 1), name=[f"{i:06d}" for i in range(C)], camera=torch.arange(C),
            quat=so3.matrix_to_quat(F(Rm)), trans=F(tm), registered=torch.ones(C, dtype=torch.bool),
        ),
        keypoints=Keypoints(xy=F(data.observations[order]), offsets=offsets_from_counts(L(counts))),
        points3D=Points3D(
            point3D_id=torch.arange(1, P + 1), xyz=F(Xm), rgb=torch.zeros(P, 3, dtype=torch.uint8),
            error=torch.full((P,), -1.0, dtype=dtype),
        ),
        tracks=Tracks(point=L(data.point_index[tr]), image=L(data.cam_index[tr]), keypoint=L(kp_of_obs[tr])),
        meta={"source": f"BAL {data.name} (mirrored z)"},
    )


def to_pycolmap(data: BALData):
    """The BAL problem as a pycolmap.Reconstruction (RADIAL, cx = cy = 0, one camera per image).

    Used as the Ceres anchor: pycolmap's C++ bundle adjuster then minimises the same function.
    """
    import pycolmap

    C = data.num_cameras
    Rm, tm, Xm = mirrored_poses(data)
    rec = pycolmap.Reconstruction()
    order = np.argsort(data.cam_index, kind="stable")
    counts = np.bincount(data.cam_index, minlength=C)
    starts = np.concatenate([[0], np.cumsum(counts)])
    kp_of_obs = np.empty(data.num_observations, dtype=np.int64)
    kp_of_obs[order] = np.arange(data.num_observations) - np.repeat(starts[:-1], counts)
    for c in range(C):
        f, k1, k2 = data.cameras[c, 6:9]
        cam = pycolmap.Camera.create_from_model_name(c + 1, "RADIAL", float(f), 2000, 2000)
        cam.params = np.array([f, 0.0, 0.0, k1, k2])
        rec.add_camera_with_trivial_rig(cam)
        img = pycolmap.Image(name=f"{c:06d}", keypoints=data.observations[order[starts[c] : starts[c + 1]]],
                             camera_id=c + 1, image_id=c + 1)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(pycolmap.Rotation3d(Rm[c]), tm[c]))
    tr = np.argsort(data.point_index, kind="stable")
    pcount = np.bincount(data.point_index, minlength=data.num_points)
    pstart = np.concatenate([[0], np.cumsum(pcount)])
    for j in range(data.num_points):
        obs = tr[pstart[j] : pstart[j + 1]]
        track = pycolmap.Track([pycolmap.TrackElement(int(data.cam_index[a]) + 1, int(kp_of_obs[a])) for a in obs])
        rec.add_point3D(Xm[j], track)
    return rec


def from_pycolmap(rec, data: BALData) -> BALData:
    """Read a solved pycolmap reconstruction (from `to_pycolmap(data)`) back into BAL form."""
    C = data.num_cameras
    cams = data.cameras.copy()
    for c in range(C):
        img = rec.image(c + 1)
        T = img.cam_from_world()
        Rm = T.rotation.matrix()
        cams[c, :3] = so3.log(torch.from_numpy(MIRROR @ Rm @ MIRROR)).numpy()
        cams[c, 3:6] = np.asarray(T.translation) @ MIRROR
        p = rec.camera(c + 1).params
        cams[c, 6:9] = [p[0], p[3], p[4]]
    pts = np.stack([rec.point3D(j + 1).xyz for j in range(data.num_points)]) @ MIRROR
    return replace(data, cameras=cams, points=pts)


def synthetic_bal(num_cams: int, num_points: int, obs_per_point: float, seed: int = 0, noise_px: float = 1.0,
                  perturb: float = 1e-2) -> BALData:
    """A BAL-format scene for scaling runs: cameras on a ring looking inwards at a point cloud,
    each point seen by a contiguous arc of ~obs_per_point cameras; noisy observations and
    perturbed cameras/points."""
    rng = np.random.default_rng(seed)
    ang = np.linspace(0, 2 * np.pi, num_cams, endpoint=False)
    centers = np.stack([10 * np.cos(ang), 10 * np.sin(ang), rng.normal(0, 0.3, num_cams)], 1)
    z = centers / np.linalg.norm(centers, axis=1, keepdims=True)  # BAL looks down -z: away from scene
    x = np.cross(np.array([0.0, 0.0, 1.0]), z)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.cross(z, x)
    R = np.stack([x, y, z], 1)
    t = -np.einsum("nij,nj->ni", R, centers)
    w = so3.log(torch.from_numpy(R)).numpy()
    f = rng.uniform(400, 600, num_cams)
    cams = np.concatenate([w, t, f[:, None], np.zeros((num_cams, 2))], 1)
    pts = rng.normal(0, 2.0, (num_points, 3))
    k = np.minimum(np.maximum(2, rng.poisson(max(obs_per_point - 2, 0), num_points) + 2), num_cams)
    start = rng.integers(0, num_cams, num_points)
    pt_idx = np.repeat(np.arange(num_points), k)
    off = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
    cam_idx = (np.repeat(start, k) + off) % num_cams
    order = np.lexsort((pt_idx, cam_idx))
    data = BALData(f"synthetic-{num_cams}-{num_points}", cam_idx[order].astype(np.int64),
                   pt_idx[order].astype(np.int64), np.zeros((k.sum(), 2)), cams, pts)
    data.observations = residuals_np(data) + rng.normal(0, noise_px, (data.num_observations, 2))
    data.cameras[:, :6] += rng.normal(0, perturb, (num_cams, 6))
    data.points += rng.normal(0, perturb * 5, pts.shape)
    return data
