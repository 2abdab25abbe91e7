"""Track building on a database's verified matches: time, CPU time and peak memory, optionally
against another source tree (a git revision checked out elsewhere), each in its own process.

    python benchmarks/bench_tracks.py out/bench/corridor1000/database.db
    mkdir /tmp/tsfm-main && git archive main | tar -x -C /tmp/tsfm-main
    python benchmarks/bench_tracks.py out/bench/corridor1000/database.db --ref-tree /tmp/tsfm-main

Prints one JSON line per tree and whether both built the same tracks (same point, image and
keypoint arrays). Run it on a quiet machine; CPU time is less affected by other jobs than wall time.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time, torch
torch.set_num_threads(1)
from torchsfm.api import load_mapper_input
from torchsfm.mapper.tracks import establish_tracks
rec = load_mapper_input(sys.argv[1])
def hwm():
    return float(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
def rss():
    return float(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
start = rss()
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
t, c = time.perf_counter(), time.process_time()
out, rep = establish_tracks(rec)
sec, cpu = time.perf_counter() - t, time.process_time() - c
h = hashlib.sha256()
for a in (out.tracks.point, out.tracks.image, out.tracks.keypoint):
    h.update(a.long().numpy().tobytes())
print(json.dumps({"seconds": sec, "cpu_seconds": cpu, "rss_start_mb": start, "peak_rss_mb": hwm(),
                  "tracks": rep.num_tracks, "observations": rep.num_observations,
                  "matches": rep.num_matches, "cut": rep.num_matches_cut, "tracks_sha256": h.hexdigest()}))
"""


def run(tree: Path, db: Path) -> dict:
    # every allocation of 64 kB and more mapped and returned at once: the peak RSS is the peak of live
    # memory, not of what the allocator happened to keep
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
           "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(db)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("database", type=Path)
    ap.add_argument("--ref-tree", type=Path, help="another torchsfm source tree to compare with")
    a = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    res = {"this": run(here, a.database)}
    if a.ref_tree:
        res["ref"] = run(a.ref_tree.resolve(), a.database)
        res["same_tracks"] = res["this"]["tracks_sha256"] == res["ref"]["tracks_sha256"]
        res["cpu_ratio_this_over_ref"] = res["this"]["cpu_seconds"] / res["ref"]["cpu_seconds"]
    print(json.dumps(res, indent=1))
