"""Host syncs per solver iteration (issue 18), the command line of torchsfm.bench.syncs.

    python benchmarks/count_syncs.py MODEL [torchsfm ba flags]     # one `torchsfm ba` configuration,
                                                                   # as ../shared/tools/count_syncs.py
    python benchmarks/count_syncs.py --table --model MODEL --bal FILE [--device cuda] [--md OUT]

The table has one row per solver path (dense, pcg, pcg_explicit), loss (trivial, Huber) and
precision, for `torchsfm ba` on MODEL and the solver on the BAL problem FILE, and rotation
averaging's IRLS (dense, cg, and on the CPU cholesky) on a synthetic ring of 200 images. Each
figure: runs of 2 and 12 iterations with every tolerance 0, the difference in syncs (reads +
data-dependent shapes) divided by 10.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchsfm.bench.syncs import bal_syncs, per_iteration, rotation_averaging_syncs  # noqa: E402


def ba_syncs(model: str, extra: list[str], n1: int = 2, n2: int = 12) -> tuple[float, dict]:
    """Syncs per LM iteration of `torchsfm ba MODEL OUT --max-iterations n --*-tolerance 0 EXTRA`."""
    from torchsfm.cli import main

    def run(iters: int) -> int:
        buf, err = io.StringIO(), io.StringIO()
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            try:
                main(["ba", model, out, "--max-iterations", str(iters), "--function-tolerance", "0",
                      "--gradient-tolerance", "0", "--parameter-tolerance", "0", *extra])
            except SystemExit:
                pass
        m = re.search(r"iterations\D*(\d+)", buf.getvalue())
        if not m:
            raise RuntimeError(f"could not read the iteration count; ba said: {err.getvalue().strip()[-300:]}")
        return int(m.group(1))

    return per_iteration(run, n1, n2)


def table(model: str | None, bal_file: str | None, device: str) -> str:
    """Markdown: syncs per iteration for each solver path, loss and precision."""
    lines = ["| problem | path | loss | dtype | syncs / iteration (reads + shapes) |", "|---|---|---|---|---|"]

    def row(name, path, loss, dtype, res):
        per, k = res
        lines.append(f"| {name} | {path} | {loss} | {dtype} | {per:.1f} ({k['reads']:.1f} + {k['shapes']:.1f}) |")
        print(lines[-1], flush=True)

    for dtype in ("float64", "float32"):
        for path in ("dense", "pcg", "pcg_explicit"):
            for loss in ("trivial", "huber"):
                if model:
                    row(f"ba {model}", path, loss, dtype, ba_syncs(model, ["--linear-solver", path, "--loss", loss,
                                                                         "--dtype", dtype, "--device", device]))
                if bal_file:
                    row(f"BAL {bal_file.split('/')[-1]}", path, loss, dtype,
                        bal_syncs(bal_file, device, dtype, path, loss))
        for path in ("dense", "cg") + (("cholesky",) if device == "cpu" else ()):
            row("rotation averaging, ring of 200", path, "IRLS", dtype, rotation_averaging_syncs(device, dtype, path))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):  # count_syncs.py's interface: MODEL [ba flags]
        per, kinds = ba_syncs(argv[0], argv[1:])
        print(f"syncs_per_iter={per:.1f} ({' '.join(f'{k}={v:.1f}' for k, v in kinds.items())})")
        return 0
    ap = argparse.ArgumentParser(prog="python benchmarks/count_syncs.py",
                                 description="Host syncs per solver iteration. MODEL [torchsfm ba flags] counts one "
                                 "`torchsfm ba` configuration; --table counts every solver path, loss and precision.")
    ap.add_argument("--table", action="store_true", required=True)
    ap.add_argument("--model", help="a COLMAP model folder (torchsfm ba)")
    ap.add_argument("--bal", help="a BAL problem file (.txt or .txt.bz2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--md", help="write the table to this file")
    args = ap.parse_args(argv)
    text = table(args.model, args.bal, args.device)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
