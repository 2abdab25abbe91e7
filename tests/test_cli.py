"""The command line as a new user meets it (issue 21): one test per fault that user hit.

Featureless images, the multi-model summary, one convention for every verb (COLMAP's names as
aliases, -v/-q anywhere, options derived from the stage dataclasses), `--refine-principal-point
auto|always|never`, the viewer's output path, each fact printed once, one-line errors with exit 2,
the honest demo, and COLMAP's image list, camera parameters and masks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from test_frontend import blobs, name_features
from torchsfm.cli import main, parse
from torchsfm.data.model import ViewGraph, offsets_from_counts
from torchsfm.frontend.colmap_db import FrontendDatabase
from torchsfm.frontend.features import make_extractor
from torchsfm.frontend.ingest import load_uint8
from torchsfm.frontend.options import ExtractOptions, MatchOptions
from torchsfm.io.colmap_model import write_model
from torchsfm.io.database import read_view_graph, write_database
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def subset_view_graph(vg: ViewGraph, keep: torch.Tensor) -> ViewGraph:
    """The pairs `keep` (E,) bool of a view graph, with their matches."""
    per_match = keep[vg.pair_of_match()]
    return ViewGraph(vg.pairs[keep], vg.config[keep], vg.F[keep], vg.E[keep], vg.H[keep], vg.rel_quat[keep],
                     vg.rel_trans[keep], vg.matches[per_match],
                     offsets_from_counts(vg.num_matches()[keep]), vg.valid[keep])


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_db")
    db = root / "database.db"
    write_synthetic_database(synthesize(SyntheticOptions(num_images=8, num_points=300, seed=1)), db)
    return db


@pytest.fixture(scope="module")
def blob_folder(tmp_path_factory):
    """Three textured images (no scene: fine for the front end alone)."""
    root = tmp_path_factory.mktemp("blobs") / "imgs"
    root.mkdir()
    for k in range(3):
        Image.fromarray(blobs(72, 96, seed=k)).save(root / f"im{k}.png")
    return root


# ---------------------------------------------------------------------------------------------
# 1. an image without features among valid ones


def test_featureless_image_is_skipped_with_its_reason_and_the_others_are_mapped(small_db, tmp_path, capsys):
    """A 1x1 PNG gets no SIFT features; its empty keypoint blob used to crash reading the database
    (`cannot reshape array of size 0`). It is now an image in no model, with its reason."""
    db = tmp_path / "database.db"
    db.write_bytes(small_db.read_bytes())
    with FrontendDatabase(db) as fdb, fdb.transaction():
        iid = fdb.add_image("tiny.png", 1)
    with FrontendDatabase(db) as fdb:
        fdb.write_features(iid, np.zeros((0, 6), np.float32), np.zeros((0, 128), np.uint8))
    code, out, _ = cli(capsys, "-q", "map", db, tmp_path / "out", "--device", "cpu")
    assert code == 0
    assert "registered images            8 of 9; 1 in no model (reasons in report.json)" in out
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["image"] for s in rep["skipped"]] == ["tiny.png"] and rep["skipped"][0]["reason"]
    assert rep["summary"]["images_in_no_model"] == 1


def test_extract_keeps_a_featureless_image_and_reports_it(blob_folder, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in blob_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (1, 1), (128, 128, 128)).save(folder / "tiny.png")
    code, _, _ = cli(capsys, "-q", "extract", folder, tmp_path / "db.db", "--threads", "1")
    assert code == 0
    rep = json.loads((tmp_path / "db.extract.json").read_text())
    assert rep["stages"][0]["details"]["no_features"] == ["tiny.png"]
    _, images, keypoints, _ = read_view_graph(tmp_path / "db.db", source="matches")  # readable
    assert dict(zip(images.name, keypoints.count().tolist()))["tiny.png"] == 0


# ---------------------------------------------------------------------------------------------
# 2. several models: every model's size, the images in none, hints not already used


def test_summary_names_every_model_and_the_images_in_none(tmp_path, capsys):
    s = synthesize(SyntheticOptions(num_images=12, num_points=600, layout="ring", seed=5))
    vg = s.view_graph
    part = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)  # components of 6, 4 and 2 (< min_component_size 3) images
    keep = part[vg.pairs[:, 0]] == part[vg.pairs[:, 1]]
    db = tmp_path / "database.db"
    write_database(db, s.gt.cameras, s.gt.images, s.gt.keypoints, subset_view_graph(vg, keep))
    code, out, _ = cli(capsys, "-q", "map", db, tmp_path / "out", "--device", "cpu")
    assert code == 0
    assert re.search(r"models\s+2 \(sparse/0: 6 images, \d+ points; sparse/1: 4 images, \d+ points\)", out), out
    assert "registered images            10 of 12; 2 in no model (reasons in report.json)" in out
    assert "registered_images" not in out and "8 / 12" not in out
    assert "hint:" not in out  # 10 of 12 images are in a model
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["summary"]["model_sizes"][1]["registered_images"] == 4
    skipped = {e["image"]: e["reason"] for e in rep["skipped"]}
    assert set(skipped) == {s.gt.images.name[10], s.gt.images.name[11]}
    assert all("connected component of the view graph (2 images) was not reconstructed: fewer than "
               "min_component_size=3" in r for r in skipped.values())


# ---------------------------------------------------------------------------------------------
# 3. one convention: paths named or positional, COLMAP's aliases, -v/-q anywhere, one-line errors


def test_paths_are_named_or_positional_on_every_verb():
    cases = {
        ("map", "--database_path", "d.db", "--output_path", "o"): {"database": "d.db", "output": "o"},
        ("map", "d.db", "o", "--images", "i"): {"database": "d.db", "output": "o", "images": "i"},
        ("run", "--image_path", "i", "o"): {"images": "i", "output": "o"},
        ("run", "i", "--threads", "2", "o"): {"images": "i", "output": "o"},  # positionals around an option
        ("run", "--images", "i", "--workspace_path", "o"): {"images": "i", "output": "o"},
        ("extract", "i", "d.db"): {"images": "i", "database": "d.db"},
        ("extract", "--image_path", "i", "--database_path", "d.db"): {"images": "i", "database": "d.db"},
        ("match", "--database_path", "d.db"): {"database": "d.db"},
        ("ba", "--input_path", "a", "--output_path", "b"): {"input": "a", "output": "b"},
        ("export", "m", "o", "-f", "ply"): {"input": "m", "output": "o"},
        ("export", "m", "--format", "ply", "--output", "o"): {"input": "m", "output": "o"},
        ("demo",): {"output": None},
    }
    for argv, want in cases.items():
        _, _, args = parse(list(argv))
        for k, v in want.items():
            assert getattr(args, k) == (None if v is None else Path(v)), (argv, k)
    _, _, args = parse(["view", "a", "b", "--output", "v"])
    assert args.input == [Path("a"), Path("b")] and args.output == Path("v")


def test_global_flags_before_or_after_the_verb():
    for argv in (["-q", "--threads", "3", "map", "d", "o"], ["map", "d", "o", "-q", "--threads", "3"],
                 ["map", "-q", "d", "o", "--num_threads", "3"]):
        _, _, args = parse(argv)
        assert (args.quiet, args.verbose, args.threads) == (True, False, 3), argv
    _, _, args = parse(["-v", "ba", "a", "b"])
    assert args.verbose and not args.quiet and args.threads is None


def test_mistakes_are_one_line_errors_with_exit_2(capsys):
    for argv, msg in [(["run", "imgs"], "OUTPUT is required: give it as --output OUTPUT or positionally"),
                      (["run", "a", "b", "c"], "unexpected argument(s): c"),
                      (["map", "d", "o", "--bogus"], "unrecognized arguments: --bogus"),
                      (["match", "d", "--mode", "sideways"], "invalid choice 'sideways'"),
                      (["map", "d", "o", "--refine-principal-point", "sometimes"], "invalid choice 'sometimes'"),
                      (["extract", "i", "d", "--max-features", "many"], "invalid int value: 'many'")]:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and msg in one_line(err), (argv, err)


def test_invalid_mapper_options_fail_before_any_work():
    from torchsfm.commands import CLIError
    from torchsfm.commands.map import mapper_options

    for flags, msg in [(["--recalibration-passes", "-1"], "recalibration.max_passes must be >= 0"),
                       (["--recalibration-min-focal-change", "0"], "recalibration.min_focal_change must be > 0")]:
        _, _, args = parse(["map", "d", "o", *flags])
        with pytest.raises(CLIError, match=msg):
            mapper_options(args)


def test_colmap_option_names_and_value_spellings_reach_the_stage_options():
    from torchsfm.commands.ba import ba_defaults
    from torchsfm.commands.frontend_stages import frontend_options
    from torchsfm.commands.map import mapper_options
    from torchsfm.commands.options import options_from_args

    _, _, args = parse(["extract", "i", "d", "--ImageReader.camera_model", "pinhole", "--camera-mode", "per-image",
                        "--SiftExtraction.max_num_features", "100", "--ImageReader.default_focal_length_factor", "2"])
    ex, _ = frontend_options(args, extract=ExtractOptions())
    assert (ex.camera_model, ex.camera_mode, ex.max_num_features, ex.default_focal_length_factor) == \
        ("PINHOLE", "per_image", 100, 2.0)
    _, _, args = parse(["run", "i", "o", "--camera-mode", "per_image", "--max-features", "50", "--match-mode",
                        "sequential", "--SiftMatching.cross_check", "0", "--TwoViewGeometry.min_num_inliers", "30",
                        "--seed", "4", "--Mapper.ba_refine_focal_length", "0", "--threads", "2"])
    opt = mapper_options(args)
    ex, ma = frontend_options(args, extract=ExtractOptions(), match=MatchOptions(), fixed_match={"seed": opt.seed})
    assert (ex.camera_mode, ex.max_num_features, ex.num_workers) == ("per_image", 50, 2)
    assert (ma.cross_check, ma.min_num_inliers, ma.seed, ma.num_threads) == (False, 30, 4, 2)
    assert args.match_mode == "sequential" and opt.seed == 4 and not opt.bundle_adjustment.refine_focal_length
    _, _, args = parse(["ba", "a", "b", "--BundleAdjustment.refine_principal_point", "1", "--no-refine-extra",
                        "--BundleAdjustment.max_num_iterations", "7"])
    ba = options_from_args(args, "ba", ba_defaults())
    assert ba.refine_principal_point and not ba.refine_extra_params and ba.solver.max_iterations == 7
    assert ba.gauge == "two_cams" and ba.refine_focal_length  # COLMAP bundle_adjuster's defaults otherwise


def test_a_new_stage_option_appears_on_the_command_line_without_cli_code():
    """A field the front end adds later becomes a flag, with its help and choices from the field's
    metadata, and reaches the options."""
    import argparse

    from torchsfm.commands.frontend_stages import MATCH_FLAGS
    from torchsfm.commands.options import add_options, options_from_args

    @dataclasses.dataclass
    class NewMatchOptions(MatchOptions):
        refiner: str = dataclasses.field(default="none", metadata={"choices": ("none", "lm"),
                                                                   "help": "two-view refinement"})
        max_keypoints: int = 1000

    p = argparse.ArgumentParser()
    add_options(p, "match", NewMatchOptions(), MATCH_FLAGS)
    assert "two-view refinement (default: none)" in p.format_help()
    args = p.parse_args(["--refiner", "lm", "--max-keypoints", "5", "--mode", "sequential", "--verifier", "colmap"])
    o = options_from_args(args, "match", NewMatchOptions())
    assert (o.refiner, o.max_keypoints, o.mode, o.verifier) == ("lm", 5, "sequential", "colmap")
    with pytest.raises(SystemExit):
        p.parse_args(["--refiner", "magic"])


def test_every_option_of_every_verb_states_its_default_or_is_a_switch():
    import argparse

    from torchsfm.cli import build_parser
    from torchsfm.commands.options import HelpFormatter

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for verb, p in sub.choices.items():
        fmt = HelpFormatter(p.prog)
        for a in p._actions:
            if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._StoreTrueAction,
                                                      argparse._StoreFalseAction)):
                continue
            text = fmt._expand_help(a)
            switch_alias = a.help.startswith("same as ")  # COLMAP's 0|1 spelling of a listed switch
            assert switch_alias or "default" in text or a.required, (verb, a.option_strings, text)
            if a.choices is not None or (a.metavar or "").startswith("{"):
                assert a.metavar is None or "," in a.metavar or a.choices, (verb, a.option_strings)
            checked += 1
    assert checked > 100


def test_readme_command_reference_is_generated_from_the_parser():
    from torchsfm.cli_reference import BEGIN, markdown

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert BEGIN in text
    assert markdown() in text, "README.md is out of date: python -m torchsfm.cli_reference README.md"


# ---------------------------------------------------------------------------------------------
# 4. --refine-principal-point auto | always | never


@pytest.mark.parametrize("mode", ["never", "always"])
def test_refine_principal_point_can_be_forced_either_way(tmp_path, capsys, mode):
    s = synthesize(SyntheticOptions(num_images=10, num_points=300, layout="sphere", seed=3,
                                    principal_point_offset=(15.0, -10.0)))
    db = tmp_path / "database.db"
    write_synthetic_database(s, db)
    code, _, _ = cli(capsys, "-q", "map", db, tmp_path / "out", "--device", "cpu", "--refine-principal-point", mode)
    assert code == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["config"]["intrinsics"]["principal_point"] == mode
    st = next(st for st in rep["stages"] if st["name"] == "intrinsics_selection")
    cam = next(iter(st["counts"]["cameras"].values()))
    assert mode in cam["reason"] and "held_out" not in cam  # forced: no test
    assert rep["summary"]["principal_point_refined"] is (mode == "always")


def test_refine_principal_point_help_states_the_default(capsys):
    assert main(["map", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--refine-principal-point {auto,always,never}" in text and "(default: auto)" in text


# ---------------------------------------------------------------------------------------------
# 5. view: .html added, never overwritten without --overwrite/--force, default next to the model


def test_view_output_suffix_and_overwrite(tmp_path, capsys):
    from test_export import synthetic

    model = tmp_path / "sparse" / "0"
    write_model(synthetic(rigs=1), model)
    assert cli(capsys, "-q", "view", model, "--output", tmp_path / "x")[0] == 0
    assert (tmp_path / "x.html").is_file() and not (tmp_path / "x").exists()
    before = (tmp_path / "x.html").read_bytes()
    code, _, err = cli(capsys, "-q", "view", model, "--output", tmp_path / "x")
    assert code == 2 and "x.html exists; pass --overwrite (or --force)" in one_line(err)
    assert (tmp_path / "x.html").read_bytes() == before
    assert cli(capsys, "-q", "view", model, "-o", tmp_path / "x", "--force")[0] == 0
    assert cli(capsys, "-q", "view", model)[0] == 0
    assert (tmp_path / "sparse" / "0.html").is_file() and sorted(p.name for p in model.iterdir()) == [
        "cameras.bin", "frames.bin", "images.bin", "points3D.bin", "rigs.bin"]  # the model folder is untouched
    assert cli(capsys, "-q", "view", model)[0] == 2


# ---------------------------------------------------------------------------------------------
# 6. each fact once: the summary, log lines, no progress bars in a redirected log, no COLMAP lines


def _torchsfm(*argv, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torchsfm", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_each_fact_is_printed_once_and_logs_stay_clean(small_db, tmp_path):
    r = _torchsfm("map", small_db, tmp_path / "out", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    assert both.count("torchsfm map: done in") == 1 and r.stdout.startswith("torchsfm map: done in")
    lines = [ln.split(" ", 1)[1] for ln in r.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ", ln)]
    assert lines and len(lines) == len(set(lines)), r.stderr  # no log line twice
    assert "\r" not in r.stderr and "it/s" not in r.stderr  # stderr is a pipe: no progress bars
    assert "torchsfm map: done in" in (tmp_path / "out" / "torchsfm.log").read_text()  # the log keeps it


def test_colmap_log_lines_only_with_verbose(tmp_path):
    from test_export import synthetic, write_gradient_images

    rec = synthetic(rigs=1)
    write_gradient_images(rec, tmp_path / "images")
    write_model(rec, tmp_path / "m")
    glog = re.compile(r"^[IWE]\d{8} ", re.M)
    quiet = _torchsfm("export", tmp_path / "m", tmp_path / "u", "-f", "undistorted", "--images", tmp_path / "images",
                      cwd=tmp_path)
    assert quiet.returncode == 0 and not glog.search(quiet.stderr), quiet.stderr
    loud = _torchsfm("-v", "export", tmp_path / "m", tmp_path / "u2", "-f", "undistorted", "--images",
                     tmp_path / "images", cwd=tmp_path)
    assert loud.returncode == 0 and glog.search(loud.stderr)


def test_demo_help_has_no_doubled_percent(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "20% wrong matches" in out and "%%" not in out


# ---------------------------------------------------------------------------------------------
# 7. errors name the path and exit 2; the minimum number of images is named; failed runs are marked


def test_unusable_output_paths_are_one_line_errors(small_db, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, msg in [(afile, "output folder {} exists and is not a folder"),
                     (afile / "sub", "cannot create output folder {}")]:
        code, _, err = cli(capsys, "map", small_db, out, "--device", "cpu")
        assert code == 2 and msg.format(out) in one_line(err)
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder_is_a_one_line_error(small_db, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = cli(capsys, "map", small_db, ro / "out", "--device", "cpu")
    finally:
        ro.chmod(0o755)
    assert code == 2 and str(ro / "out") in one_line(err)


def test_two_images_are_refused_naming_the_minimum(blob_folder, tmp_path, capsys):
    imgs = tmp_path / "two"
    imgs.mkdir()
    for p in sorted(blob_folder.iterdir())[:2]:
        (imgs / p.name).write_bytes(p.read_bytes())
    code, _, err = cli(capsys, "run", imgs, tmp_path / "out", "--device", "cpu")
    assert code == 2 and "found 2 usable image(s)" in err and "need at least 3" in one_line(err)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())  # marked failed, next to the log
    assert "need at least 3" in rep["summary"]["error"] and (tmp_path / "out" / "torchsfm.log").is_file()


def test_a_failed_map_marks_its_output_folder_failed(tmp_path, capsys):
    db = tmp_path / "garbage.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(3000))
    code, _, err = cli(capsys, "map", db, tmp_path / "out")
    assert code == 2 and "garbage.db" in one_line(err)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "garbage.db" in rep["summary"]["error"] and not (tmp_path / "out" / "sparse").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "torchsfm.log"]


# ---------------------------------------------------------------------------------------------
# 8. the demo's database is honestly verified: both mappers read the same verified inliers


def test_demo_database_holds_verified_inliers_and_glomap_maps_it(tmp_path, capsys):
    code, out, _ = cli(capsys, "-q", "demo", tmp_path / "demo", "--num-images", "12", "--num-points", "500",
                       "--device", "cpu")
    assert code == 0
    assert out.startswith("torchsfm demo: done in")
    # both mappers register every image
    assert re.search(r"^torchsfm\s+12\s", out, re.M) and re.search(r"^GLOMAP \(pycolmap\)\s+12\s", out, re.M), out
    # the same scene as the demo's; its raw matches hold 20% wrong ones, labelled
    s = synthesize(SyntheticOptions(num_images=12, num_points=500, layout="ring", pixel_noise=0.5,
                                    outlier_ratio=0.2, seed=0))
    names = s.gt.images.name
    vg = s.view_graph
    pm = vg.pair_of_match()
    truth = {}
    for (i, j), (a, b), bad in zip(vg.pairs[pm].tolist(), vg.matches.tolist(), s.is_outlier.tolist()):
        truth[(names[i], names[j], a, b)] = truth[(names[j], names[i], b, a)] = bad
    assert 0.15 < float(s.is_outlier.float().mean()) < 0.25
    _, images, _, dvg = read_view_graph(tmp_path / "demo" / "database.db")
    dpm = dvg.pair_of_match()
    verified = [truth[(images.name[i], images.name[j], a, b)]
                for (i, j), (a, b) in zip(dvg.pairs[dpm].tolist(), dvg.matches.tolist())]
    assert len(verified) > 0.5 * int((~s.is_outlier).sum())  # most true matches survive verification
    assert sum(verified) < 0.02 * len(verified)  # and few wrong ones: not the generator's 20%


# ---------------------------------------------------------------------------------------------
# 9. COLMAP's ImageReader options: image list, camera parameters, masks


def test_image_list_maps_a_subset_of_the_folder(blob_folder, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text("im2.png\n\nim0.png\n")
    code, _, _ = cli(capsys, "-q", "extract", blob_folder, tmp_path / "db.db", "--image-list", lst, "--threads", "1")
    assert code == 0 and sorted(name_features(tmp_path / "db.db")) == ["im0.png", "im2.png"]
    lst.write_text("im0.png\nnot_there.png\n")
    code, _, err = cli(capsys, "extract", blob_folder, tmp_path / "db2.db", "--image_list_path", lst)
    assert code == 2 and "1 image(s) of the image list are not in" in one_line(err) and "not_there.png" in err
    code, _, err = cli(capsys, "extract", blob_folder, tmp_path / "db3.db", "--image-list", tmp_path / "nope.txt")
    assert code == 2 and "cannot read image list" in one_line(err)


def test_camera_params_as_colmaps_image_reader(blob_folder, tmp_path, capsys):
    """Known intrinsics: the same cameras as pycolmap's extract_features with camera_params."""
    code, _, _ = cli(capsys, "-q", "extract", blob_folder, tmp_path / "db.db", "--camera-model", "PINHOLE",
                     "--ImageReader.camera_params", "100,110,40.5,30", "--camera-mode", "single", "--threads", "1")
    assert code == 0
    ref = tmp_path / "ref.db"
    pycolmap.extract_features(ref, blob_folder, camera_mode=pycolmap.CameraMode.SINGLE,
                              reader_options=pycolmap.ImageReaderOptions(camera_model="PINHOLE",
                                                                         camera_params="100,110,40.5,30"),
                              extraction_options=pycolmap.FeatureExtractionOptions(num_threads=1),
                              device=pycolmap.Device.cpu)
    cams = []
    for path in (tmp_path / "db.db", ref):
        d = pycolmap.Database.open(str(path))
        cams.append([(c.model.name, list(c.params), c.has_prior_focal_length) for c in d.read_all_cameras()])
        d.close()
    assert cams[0] == cams[1] == [("PINHOLE", [100.0, 110.0, 40.5, 30.0], True)]
    code, _, err = cli(capsys, "extract", blob_folder, tmp_path / "db2.db", "--camera-model", "PINHOLE",
                       "--camera-params", "1,2")
    assert code == 2 and "camera_params gives 2 values; PINHOLE has 4: fx,fy,cx,cy" in one_line(err)
    assert not (tmp_path / "db2.db").exists()


def test_masks_as_colmaps_image_reader(blob_folder, tmp_path, capsys):
    """MASK_PATH/<image name>.png, zero pixels get no features: the keypoints equal pycolmap's with
    the same masks; an image without its mask is skipped, as pycolmap skips it."""
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.full((72, 96), 255, np.uint8)
    m[:, :48] = 0  # the left half
    Image.fromarray(m).save(masks / "im0.png.png")
    Image.fromarray(np.stack([m.T[:72, :72]] * 3, -1)).save(masks / "im1.png.png")  # RGB, another shape
    code, _, _ = cli(capsys, "-q", "extract", blob_folder, tmp_path / "db.db", "--mask-path", masks, "--threads", "1")
    assert code == 0
    ref = tmp_path / "ref.db"
    pycolmap.extract_features(ref, blob_folder, reader_options=pycolmap.ImageReaderOptions(mask_path=str(masks)),
                              extraction_options=pycolmap.FeatureExtractionOptions(num_threads=1),
                              device=pycolmap.Device.cpu)
    ours, theirs = name_features(tmp_path / "db.db"), name_features(ref)
    assert sorted(ours) == sorted(theirs) == ["im0.png", "im1.png"]
    for name in ("im0.png", "im1.png"):
        np.testing.assert_allclose(ours[name][0][:, :2], theirs[name][0][:, :2], atol=1e-3)
        np.testing.assert_array_equal(ours[name][1], theirs[name][1])
    k0 = ours["im0.png"][0]
    assert len(k0) > 5 and k0[:, 0].min() >= 48
    full, _ = make_extractor(ExtractOptions()).extract(load_uint8(blob_folder / "im0.png"))
    assert (full[:, 0] < 48).sum() > 5  # the mask removed something
    rep = json.loads((tmp_path / "db.extract.json").read_text())
    assert rep["stages"][0]["counts"]["num_masked"] == 2
    assert rep["skipped"] == [{"file": "im2.png", "reason": "mask_missing", "detail": f"no im2.png.png in {masks}"}]
    code, _, err = cli(capsys, "extract", blob_folder, tmp_path / "db2.db", "--mask-path", tmp_path / "nope")
    assert code == 2 and "mask folder" in one_line(err)


def test_run_accepts_the_image_reader_options():
    _, _, args = parse(["run", "i", "o", "--image-list", __file__, "--camera-params", "1,2,3,4",
                        "--camera-model", "pinhole", "--mask-path", "m"])
    from torchsfm.commands.frontend_stages import frontend_options

    ex, _ = frontend_options(args, extract=ExtractOptions())
    assert ex.camera_params == "1,2,3,4" and ex.mask_path == "m" and len(ex.image_names) > 10


def test_config_file_then_the_flags_given(tmp_path):
    """--config is the base; only flags that were typed override it (a default never does)."""
    from torchsfm.commands.map import mapper_options
    from torchsfm.config import dumps
    from torchsfm.mapper.pipeline import MapperOptions

    cfg = tmp_path / "config.json"
    base = MapperOptions(seed=5, device="cpu")
    base.intrinsics.principal_point = "never"
    base.bundle_adjustment.solver.max_iterations = 9
    cfg.write_text(dumps(base))
    opt = mapper_options(parse(["map", "d", "o", "--config", str(cfg)])[2])
    assert (opt.seed, opt.device, opt.intrinsics.principal_point, opt.bundle_adjustment.solver.max_iterations) == \
        (5, "cpu", "never", 9)
    opt = mapper_options(parse(["map", "d", "o", "--config", str(cfg), "--seed", "7", "--ba-max-iterations", "3"])[2])
    assert (opt.seed, opt.device, opt.bundle_adjustment.solver.max_iterations) == (7, "cpu", 3)


def test_ba_never_replaces_a_file_with_its_model(tmp_path, capsys):
    from test_export import synthetic

    write_model(synthetic(rigs=1), tmp_path / "m")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    code, _, err = cli(capsys, "ba", tmp_path / "m", afile, "--device", "cpu")
    assert code == 2 and f"output model {afile} exists and is not a folder" in one_line(err)
    assert afile.read_text() == "keep me"
