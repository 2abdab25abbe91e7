"""Options of the batched two-view verification engine.

The first block carries COLMAP 4.2's `TwoViewGeometryOptions` and `RANSACOptions` under their
names and with their defaults (flattened: `max_error`, `confidence`, ... are RANSAC's), so a
COLMAP user finds the knobs they know. The second block is ours: how the work is batched.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VerificationOptions:
    # --- COLMAP TwoViewGeometryOptions ---
    min_num_inliers: int = 15
    min_E_F_inlier_ratio: float = 0.95
    max_H_inlier_ratio: float = 0.8
    watermark_min_inlier_ratio: float = 0.7
    watermark_border_size: float = 0.1
    watermark_detection_max_error: float = 4.0  # px
    detect_watermark: bool = True
    multiple_ignore_watermark: bool = True  # kept for the option set; multiple_models is not implemented
    two_view_min_inlier_ratio: float = 0.0  # COLMAP's TwoViewGeometryOptions.min_inlier_ratio
    compute_relative_pose: bool = True
    # --- COLMAP RANSACOptions ---
    max_error: float = 4.0  # px: squared Sampson / transfer error <= max_error^2
    confidence: float = 0.999
    min_num_trials: int = 100
    max_num_trials: int = 10000
    min_inlier_ratio: float = 0.25  # caps the trials through COLMAP's dynamic bound
    dyn_num_trials_multiplier: float = 3.0
    seed: int = 0
    # --- engine knobs (ours) ---
    trials_per_round: int = 100  # minimal samples per pair and round; later rounds grow to max_trials_per_round
    max_trials_per_round: int = 800
    growth_trials: int = 100  # PROSAC-like: the first trials sample from the best-ranked matches only
    growth_start: float = 0.25  # fraction of the matches the first trial samples from
    shared_focal: bool = True  # COLMAP's shared-focal path for pairs sharing a camera without focal prior
    stop_at_decision_floor: bool = True  # stop a pair once no model that could change its config is left to find
    lo_iterations: int = 4  # IRLS refits of the round's best model on its inliers
    preemptive_points: int = 32  # count all models on this many matches first (0: off) ...
    preemptive_keep: int = 16  # ... and score only the best this many per pair and round on all
    max_elements: int = 2**25  # memory budget: elements of the largest scoring buffer per chunk

    def check(self) -> "VerificationOptions":
        """Raise ValueError on values COLMAP's Check() would reject (and on our own knobs)."""
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"VerificationOptions: {what}")

        need(self.min_num_inliers >= 0, "min_num_inliers must be >= 0")
        for name in ("min_E_F_inlier_ratio", "max_H_inlier_ratio", "watermark_min_inlier_ratio",
                     "watermark_border_size", "min_inlier_ratio", "confidence", "two_view_min_inlier_ratio"):
            v = getattr(self, name)
            need(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v}")
        need(self.max_error > 0, "max_error must be > 0")
        need(self.watermark_detection_max_error > 0, "watermark_detection_max_error must be > 0")
        need(0 <= self.min_num_trials <= self.max_num_trials, "need 0 <= min_num_trials <= max_num_trials")
        need(self.dyn_num_trials_multiplier > 0, "dyn_num_trials_multiplier must be > 0")
        need(1 <= self.trials_per_round <= self.max_trials_per_round, "need 1 <= trials_per_round <= max_trials_per_round")
        need(self.growth_trials >= 0 and 0 < self.growth_start <= 1, "need growth_trials >= 0, 0 < growth_start <= 1")
        need(self.lo_iterations >= 0, "lo_iterations must be >= 0")
        need(self.preemptive_points >= 0 and self.preemptive_keep >= 1, "need preemptive_points >= 0, preemptive_keep >= 1")
        need(self.max_elements >= 2**16, "max_elements must be >= 65536")
        return self
