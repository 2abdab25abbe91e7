"""A rendered low-texture scene with ground truth: a dark, nearly uniform object on black.

The hard case for SIFT: a matte object (albedo about 0.18 with a 6 % band-limited texture, so the
surface has little to detect) lit by one fixed light, rendered by sphere tracing a signed
distance field (a sphere, a tilted torus and a rounded box), no background, 8-bit with sensor
noise. Cameras sit on a ring looking at the object. Same seed, same bytes.

    python -m torchsfm.synthetic.low_texture OUT [--preset faint|medium] [--images 16] [--seed 0]

`faint` (the default) is a 6 % texture of long waves: SIFT finds about 17 keypoints per image.
`medium` is a 20 % texture with finer grain (96 waves up to 150 rad per unit): SIFT finds about
160 per image, like the dark object of issue 17 (about 250, 6 of 16 registered).

writes OUT/images/*.png and OUT/gt/ (COLMAP text model: one PINHOLE camera, poses, no points), the
layout of ../shared/data's scenes.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class LowTextureScene:
    num_images: int = 16
    width: int = 640
    height: int = 480
    focal: float = 600.0
    ring_radius: float = 3.2
    elevation_deg: float = 20.0
    albedo: float = 0.18
    texture_contrast: float = 0.06  # relative amplitude of the surface texture
    texture_waves: int = 24
    texture_max_frequency: float = 24.0  # rad per scene unit (the object is ~1.6 units wide, ~300 px)
    noise_dn: float = 1.0  # sensor noise, 8-bit units
    seed: int = 0


PRESETS = {"faint": {}, "medium": {"texture_contrast": 0.2, "texture_waves": 96, "texture_max_frequency": 150.0}}


def _sdf(p: torch.Tensor) -> torch.Tensor:
    sphere = p.norm(dim=-1) - 0.55
    c, s = math.cos(0.6), math.sin(0.6)  # torus tilted about x
    q = torch.stack([p[..., 0], c * p[..., 1] - s * p[..., 2], s * p[..., 1] + c * p[..., 2]], -1) - p.new_tensor([0, 0.1, 0])
    torus = torch.stack([q[..., [0, 2]].norm(dim=-1) - 0.75, q[..., 1]], -1).norm(dim=-1) - 0.13
    b = (p - p.new_tensor([0.45, -0.35, 0.35])).abs() - 0.22
    box = b.clamp_min(0).norm(dim=-1) + b.max(-1).values.clamp_max(0) - 0.05
    return torch.minimum(torch.minimum(sphere, torus), box)


def _normal(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    e = torch.eye(3, dtype=p.dtype) * eps
    g = torch.stack([_sdf(p + e[i]) - _sdf(p - e[i]) for i in range(3)], -1)
    return torch.nn.functional.normalize(g, dim=-1)


def ring_poses(scene: LowTextureScene) -> tuple[np.ndarray, np.ndarray]:
    """cam_from_world rotations (N, 3, 3) and translations (N, 3) of cameras on the ring,
    looking at the origin (x right, y down, z forward)."""
    el = math.radians(scene.elevation_deg)
    Rs, ts = [], []
    for k in range(scene.num_images):
        az = 2 * math.pi * k / scene.num_images
        centre = scene.ring_radius * np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
        z = -centre / np.linalg.norm(centre)
        x = np.cross(z, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        R = np.stack([x, y, z])
        Rs.append(R)
        ts.append(-R @ centre)
    return np.stack(Rs), np.stack(ts)


def render(scene: LowTextureScene, R: np.ndarray, t: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """One 8-bit grey image (H, W) of the object seen from cam_from_world (R, t)."""
    dt = torch.float64
    W, H = scene.width, scene.height
    ys, xs = torch.meshgrid(torch.arange(H, dtype=dt) + 0.5, torch.arange(W, dtype=dt) + 0.5, indexing="ij")
    rays_cam = torch.stack([(xs - W / 2) / scene.focal, (ys - H / 2) / scene.focal, torch.ones_like(xs)], -1).reshape(-1, 3)
    Rt = torch.from_numpy(R).to(dt)
    origin = -(Rt.T @ torch.from_numpy(t).to(dt))
    d = torch.nn.functional.normalize(rays_cam @ Rt, dim=-1)  # world directions (R^T applied row-wise)
    dist = torch.zeros(len(d), dtype=dt)
    hit = torch.zeros(len(d), dtype=torch.bool)
    for _ in range(160):
        p = origin + dist[:, None] * d
        s = _sdf(p)
        hit |= s.abs() < 1e-5
        dist = torch.where(hit, dist, dist + s)
    hit &= dist < 2 * scene.ring_radius
    p = origin + dist[:, None] * d
    n = _normal(p[hit])
    light = torch.nn.functional.normalize(torch.tensor([0.4, -0.5, 0.8], dtype=dt), dim=0)
    shade = 0.1 + 0.9 * (n @ light).clamp_min(0)
    g = torch.Generator().manual_seed(scene.seed)  # the texture is fixed to the object: same for every view
    freq = torch.nn.functional.normalize(torch.randn(scene.texture_waves, 3, generator=g, dtype=dt), dim=1)
    freq = freq * (6 + (scene.texture_max_frequency - 6) * torch.rand(scene.texture_waves, 1, generator=g, dtype=dt))
    phase = 2 * math.pi * torch.rand(scene.texture_waves, generator=g, dtype=dt)
    texture = torch.sin(p[hit] @ freq.T + phase).sum(1) / math.sqrt(scene.texture_waves / 2)
    albedo = scene.albedo * (1 + scene.texture_contrast * texture)
    img = torch.zeros(len(d), dtype=dt)
    img[hit] = 255 * albedo * shade
    img = img + scene.noise_dn * torch.randn(len(d), generator=generator, dtype=dt)
    return img.clamp(0, 255).round().to(torch.uint8).reshape(H, W).numpy()


def write_scene(out: str | Path, scene: LowTextureScene | None = None) -> Path:
    """Render the scene into OUT/images and its ground truth into OUT/gt (COLMAP text)."""
    import pycolmap
    from PIL import Image

    scene = scene or LowTextureScene()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "gt").mkdir(parents=True, exist_ok=True)
    Rs, ts = ring_poses(scene)
    gen = torch.Generator().manual_seed(scene.seed + 1)
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, "PINHOLE", scene.focal, scene.width, scene.height)
    cam.params = [scene.focal, scene.focal, scene.width / 2, scene.height / 2]
    rec.add_camera_with_trivial_rig(cam)
    for k, (R, t) in enumerate(zip(Rs, ts)):
        name = f"view{k:03d}.png"
        Image.fromarray(render(scene, R, t, gen)).save(out / "images" / name)
        image = pycolmap.Image(name=name, camera_id=1, image_id=k + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(R), t))
    rec.write_text(str(out / "gt"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="faint",
                    help="texture: faint (6 %%, long waves) or medium (20 %%, finer grain) (default: %(default)s)")
    ap.add_argument("--texture-contrast", type=float, help="relative amplitude of the surface texture (the preset's)")
    ap.add_argument("--texture-waves", type=int, help="number of sine waves summed into the texture (the preset's)")
    ap.add_argument("--texture-max-frequency", type=float, help="highest spatial frequency of the texture, radians "
                    "per scene unit; the object is about 1.6 units wide (the preset's)")
    a = ap.parse_args(argv)
    given = {k: getattr(a, k) for k in ("texture_contrast", "texture_waves", "texture_max_frequency")}
    params = PRESETS[a.preset] | {k: v for k, v in given.items() if v is not None}
    write_scene(a.out, LowTextureScene(num_images=a.images, seed=a.seed, **params))


if __name__ == "__main__":
    main()
