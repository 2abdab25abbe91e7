"""What the front end tells the user: the typed results of `extract` and `match` (filled into a
`torchsfm.report.StageReport` by the CLI, like every stage's), aggregated warnings, progress bars."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from ..report import progress_bar as progress  # noqa: F401 - the front end's name for it
from .ingest import SkippedFile


def _counts(items) -> str:
    c = collections.Counter(items)
    return ", ".join(f"{n} {k}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def log_aggregated(logger: logging.Logger, headline: str, lines: list[str], limit: int = 20) -> None:
    """One warning for many items: a headline, then up to `limit` item lines."""
    if not lines:
        return
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more (see the run report)"] if len(lines) > limit else [])
    logger.warning("%s\n  %s", headline, "\n  ".join(shown))


@dataclass(kw_only=True)
class ExecutorCounts:
    """Where the stage's work units ran (`--executor`): tasks, distinct worker processes, and
    tasks resubmitted because their worker or node died."""

    executor: str = "local"
    num_tasks: int = 0
    num_workers: int = 0
    num_retries: int = 0
    task_seconds: float = 0.0  # summed inside the tasks
    driver_seconds: float = 0.0  # this process's own work besides waiting for tasks
    shipped_bytes: int = 0  # inputs put in Ray's object store

    def set_executor(self, stats) -> None:
        self.executor, self.num_tasks = stats.executor, stats.num_tasks
        self.num_workers, self.num_retries = stats.num_workers, stats.num_retries
        self.task_seconds, self.driver_seconds = round(stats.task_seconds, 3), round(stats.driver_seconds, 3)
        self.shipped_bytes = stats.shipped_bytes

    def executor_note(self) -> str:
        """'; ray: 12 tasks on 2 workers, 1 retry' (nothing for the local executor)."""
        if self.executor == "local":
            return ""
        r = self.num_retries
        return f"; {self.executor}: {self.num_tasks} tasks on {self.num_workers} workers, {r} retr{'y' if r == 1 else 'ies'}"


@dataclass
class ExtractReport(ExecutorCounts):
    image_dir: str
    database: str
    num_files: int = 0  # files found under the image folder
    num_images: int = 0  # usable images (all of them are in the database afterwards)
    num_registered: int = 0  # images added to the database by this run
    num_extracted: int = 0  # images whose features were computed by this run
    num_resumed: int = 0  # images skipped because the database already had their features
    num_cameras: int = 0
    num_keypoints: int = 0  # in the whole database
    device: str = "cpu"
    skipped: list[SkippedFile] = field(default_factory=list)
    exif_focal_ignored: list[dict] = field(default_factory=list)  # {name, detail}
    exif_orientation: dict = field(default_factory=dict)  # name -> EXIF orientation (!= 1)
    no_features: list[str] = field(default_factory=list)  # images where SIFT found nothing
    num_masked: int = 0  # images whose features this run extracted with a mask (--mask-path)
    elapsed_s: float = 0.0

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        skipped = f", skipped {len(self.skipped)} files ({_counts(s.reason for s in self.skipped)})" if self.skipped else ""
        return (
            f"extract: {self.num_images} images in {self.num_cameras} camera(s) "
            f"({self.num_extracted} extracted, {self.num_resumed} already done){skipped}; "
            f"{self.num_keypoints} keypoints in {self.database} [{self.elapsed_s:.1f} s, {self.device}{self.executor_note()}]"
        )


@dataclass
class MatchReport(ExecutorCounts):
    database: str
    mode: str
    num_images: int = 0
    num_candidate_pairs: int = 0  # pairs proposed by the pair generator
    num_matched: int = 0  # pairs matched by this run
    num_resumed: int = 0  # candidate pairs already in the database (not redone)
    num_verified: int = 0  # pairs in the database with a verified geometry (>= min inliers)
    num_inlier_matches: int = 0  # in the whole database
    configs: dict = field(default_factory=dict)  # configuration type name -> pair count
    device: str = "cpu"
    verifier: str = "torch"
    num_raw_matches: int = 0  # raw matches found by this run (torch verifier)
    stage_times: dict = field(default_factory=dict)  # seconds: read / match / verify / write (torch verifier)
    elapsed_s: float = 0.0

    def summary(self) -> str:
        return (
            f"match ({self.mode}): {self.num_candidate_pairs} candidate pairs over {self.num_images} images "
            f"({self.num_matched} matched, {self.num_resumed} already done); {self.num_verified} verified pairs, "
            f"{self.num_inlier_matches} inlier matches in {self.database} [{self.elapsed_s:.1f} s, {self.verifier} on {self.device}"
            f"{self.executor_note()}]"
        )


@dataclass
class FallbackReport:
    """What the learned fallback (`frontend.fallback`) added to a SIFT database."""

    database: str
    features: str
    min_pairs: int
    min_inlier_ratio: float
    num_images: int = 0
    weak_images: list[str] = field(default_factory=list)  # fewer than min_pairs SIFT-verified pairs
    num_learned_images: int = 0  # weak images and their candidate partners: learned features
    num_candidate_pairs: int = 0  # candidate pairs with a weak image that SIFT did not verify
    num_merged_pairs: int = 0  # of those, verified with learned features and merged
    still_weak: list[str] = field(default_factory=list)  # weak after the merge too
    sidecar: str = ""  # the learned features' own database
    stage_times: dict = field(default_factory=dict)  # seconds: extract / match / merge
    elapsed_s: float = 0.0

    def summary(self) -> str:
        head = (f"fallback ({self.features}): {len(self.weak_images)} of {self.num_images} images have fewer than "
                f"{self.min_pairs} SIFT-verified pairs")
        if not self.weak_images:
            return head + f" [{self.elapsed_s:.1f} s]"
        return (f"{head}; {self.num_candidate_pairs} of their pairs matched with LightGlue over "
                f"{self.num_learned_images} images, {self.num_merged_pairs} verified and merged; "
                f"{len(self.still_weak)} still weak [{self.elapsed_s:.1f} s]")


@dataclass
class RefineReport:
    """What keypoint refinement (`frontend.keypoint_refinement`) did to a database's keypoints."""

    database: str
    device: str = "cpu"
    num_images: int = 0  # images with keypoints in refined matches
    num_pairs: int = 0  # verified pairs whose inlier matches were aligned
    num_matches: int = 0  # inlier matches aligned
    num_kept: int = 0  # of those, aligned well enough to count (correlation, shift, inside the image)
    num_keypoints: int = 0  # keypoints corrected
    median_shift_px: float = 0.0  # the kept matches' alignment shifts
    median_correction_px: float = 0.0  # the keypoints' corrections
    skipped_images: list[str] = field(default_factory=list)  # "name: reason" (their matches left out)
    stage_times: dict = field(default_factory=dict)  # seconds: decode / align / solve / write
    elapsed_s: float = 0.0

    def summary(self) -> str:
        return (f"keypoint refinement: {self.num_keypoints} keypoints of {self.num_images} images corrected by a "
                f"median {self.median_correction_px:.2f} px, from {self.num_kept} of {self.num_matches} inlier matches "
                f"in {self.num_pairs} pairs [{self.elapsed_s:.1f} s on {self.device}]")
