"""Batched two-view geometric verification in torch (COLMAP 4.2 semantics), CPU and CUDA.

    from torchsfm.frontend.verification import VerificationOptions, make_pair_batches, verify_pairs
    for rows, batch in make_pair_batches(xy, offsets, pairs, matches, match_offsets, cameras, image_camera):
        geoms = verify_pairs(batch, VerificationOptions(seed=0))   # one TwoViewGeometries per chunk

A pure library: no I/O. See verify.py for the estimator chosen per camera layout, ransac.py for
the round-based LO-RANSAC and decision.py for COLMAP's configuration rules.
"""
from .batch import PairBatch, TwoViewGeometries, make_pair_batches
from .options import VerificationOptions
from .verify import verify_all, verify_pairs

__all__ = ["PairBatch", "TwoViewGeometries", "VerificationOptions", "make_pair_batches", "verify_all", "verify_pairs"]
