"""Global image descriptors for retrieval, built from the database's own SIFT features.

VLAD (Jegou et al. 2010) over a k-means codebook trained on the fly from a sample of the
collection's descriptors, so no vocabulary has to be downloaded or shipped: residuals to the
nearest visual word are summed per word, intra-normalised per word, power-normalised (signed
square root) and L2-normalised. Everything is batched tensors; images are streamed in chunks
so memory stays bounded on large collections.
"""
from __future__ import annotations

import sqlite3

import numpy as np
import torch
from torch import Tensor

from .colmap_db import read_descriptors


def sift_to_float(desc: Tensor) -> Tensor:
    """uint8 SIFT (COLMAP stores L1-root-normalised values x 512) -> unit L2 float rows."""
    return torch.nn.functional.normalize(desc.float(), dim=-1)


def kmeans(x: Tensor, k: int, iterations: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """Spherical k-means (cosine assignment) on unit rows x (S, D) -> centres (k, D).
    k-means++-free random init; empty clusters are re-seeded from random samples."""
    s = x.shape[0]
    k = min(k, s)
    perm = torch.randperm(s, generator=generator)[:k].to(x.device)
    c = x[perm].clone()
    for _ in range(iterations):
        a = (x @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        empty = counts == 0
        if empty.any():
            refill = torch.randint(0, s, (int(empty.sum()),), generator=generator).to(x.device)
            sums[empty] = x[refill]
        c = torch.nn.functional.normalize(sums, dim=1)
    return c


def vlad(desc: Tensor, image: Tensor, num_images: int, centres: Tensor) -> Tensor:
    """VLAD of many images at once. desc (N, D) unit rows, image (N,) row of each descriptor
    -> (num_images, k*D), unit L2 (all-zero rows for images without descriptors)."""
    k, d = centres.shape
    a = (desc @ centres.T).argmax(dim=1)
    res = desc - centres[a]
    v = torch.zeros(num_images * k, d, dtype=desc.dtype, device=desc.device).index_add_(0, image * k + a, res)
    v = torch.nn.functional.normalize(v, dim=1).reshape(num_images, k * d)  # intra-normalisation
    v = v.sign() * v.abs().sqrt()
    return torch.nn.functional.normalize(v, dim=1)


def global_descriptors(
    conn: sqlite3.Connection,
    image_ids: list[int],
    num_words: int = 64,
    iterations: int = 20,
    num_samples: int = 100_000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    chunk: int = 64,
) -> Tensor:
    """(n, num_words * 128) VLAD descriptors of the given images, read from a COLMAP database."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(image_ids)
    per_image = max(1, -(-num_samples // max(n, 1)))
    samples = []
    for s in range(0, n, chunk):
        for d in read_descriptors(conn, image_ids[s : s + chunk]):
            if len(d):
                pick = rng.choice(len(d), size=min(per_image, len(d)), replace=False)
                samples.append(torch.from_numpy(d[np.sort(pick)]))
    if not samples:
        raise ValueError("no descriptors in the database: run `torchsfm extract` first")
    x = sift_to_float(torch.cat(samples).to(device))
    centres = kmeans(x, num_words, iterations, gen)
    if centres.shape[0] < num_words:  # tiny collections: pad with unused words
        centres = torch.cat([centres, centres.new_zeros(num_words - centres.shape[0], centres.shape[1])])
    out = []
    for s in range(0, n, chunk):
        descs = read_descriptors(conn, image_ids[s : s + chunk])
        counts = torch.tensor([len(d) for d in descs], device=device)
        flat = sift_to_float(torch.from_numpy(np.concatenate(descs)).to(device))
        img = torch.repeat_interleave(torch.arange(len(descs), device=device), counts)
        out.append(vlad(flat, img, len(descs), centres))
    return torch.cat(out)
