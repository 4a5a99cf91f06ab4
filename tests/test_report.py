"""The HTML report of ``skdfm evaluate --report``: its header, counts, histogram
and the mistakes it lists."""

import copy
import html
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skdfm
from skdfm._evaluation.evaluation import evaluate_mvtec
from skdfm._evaluation.report import (
    MAX_PICTURES,
    confusion_counts,
    model_description,
    score_histogram,
    write_report,
)

pytest.importorskip("matplotlib")


def write_category(root, n_good=3, n_defective=10, size=32):
    """test/good and test/crack of random pictures (crack with masks)."""
    rng = np.random.default_rng(0)
    for kind, n in (("good", n_good), ("crack", n_defective)):
        (root / "test" / kind).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size, size, 3), "uint8")
            Image.fromarray(pixels).save(root / "test" / kind / f"{i:03d}.png")
    (root / "ground_truth" / "crack").mkdir(parents=True)
    for i in range(n_defective):
        mask = np.zeros((size, size), np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(
            root / "ground_truth" / "crack" / f"{i:03d}_mask.png"
        )
    return root


def text_of(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def calibrated(fitted_pipeline, defect_images):
    images, y, masks = defect_images
    model = copy.deepcopy(fitted_pipeline)
    skdfm.calibrate_pixel_threshold(model, images[y == 1][20:])
    return model


def test_header_says_which_model_made_the_scores(calibrated, tmp_path):
    root = write_category(tmp_path / "tiles", n_defective=2)
    result = evaluate_mvtec(calibrated, root)
    path = write_report(
        tmp_path / "out", calibrated, result, model_file="m.skdfm", category=root
    )
    page = open(path, encoding="utf-8").read()
    header = text_of(page.split("<h2>Metrics</h2>")[0])
    detector, weights = calibrated[-1], calibrated[0].weights_source_
    assert weights.startswith("random init (seed ")
    for expected in (
        "model file " + str(Path("m.skdfm").absolute()),
        "backbone test_resnet",
        "layer(s) layer2",
        "input size 64 x 64 px",
        "2 x 2 average pooling",
        f"weights {weights}",
        f"pca_level 0.95 \N{RIGHTWARDS ARROW} {detector.n_components_} components",
        "score type fre",
        "image score sum",
        f"image threshold {-detector.offset_:.6g}",
        detector.threshold_method_,
        f"pixel threshold {detector.pixel_threshold_:.6g}",
        "a quantile of good images' map values",
        f"skdfm {skdfm.__version__}",
    ):
        assert expected in header, expected
    # random weights: in red, with a warning that the verdicts mean nothing
    assert f"<td class='alarm'>{weights}</td>" in page
    assert "class='warning'>Random weights" in page
    assert "come" in header and "from random features" in header


def test_header_of_an_exported_model(calibrated, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = skdfm.export(calibrated, tmp_path / "m.onnx")
    exported = skdfm.ExportedModel(path)
    # what the export now carries for the header
    weights = calibrated[0].weights_source_
    assert exported.metadata_["weights_source"] == weights
    assert exported.metadata_["pca_level"] == 0.95
    assert exported.metadata_["pixel_threshold_method"] == "contamination"
    rows = {field: (value, alarm) for field, value, alarm in
            model_description(exported, path)}  # fmt: skip
    assert rows["weights"] == (weights, True)
    assert rows["backbone"][0] == "test_resnet" and rows["layer(s)"][0] == "layer2"
    assert "onnx export, precision float32, run by onnxruntime" in rows["format"][0]
    assert rows["configuration"][0].startswith("pca_level 0.95")
    assert "contamination" in rows["image threshold"][0]
    assert rows["pixel threshold"][0].startswith(f"{exported.pixel_threshold_:.6g}")
    # a file exported before these were recorded: said, not guessed
    for key in ("weights_source", "pca_level", "pixel_threshold_method"):
        del exported.metadata_[key]
    rows = {field: (value, alarm) for field, value, alarm in
            model_description(exported, path)}  # fmt: skip
    assert rows["weights"] == (
        "not recorded (exported by an skdfm that did not record it)",
        False,
    )
    assert rows["configuration"][0].startswith(
        f"{exported.metadata_['n_components']} components"
    )
    assert "method not recorded" in rows["pixel threshold"][0]
    # and the whole report, from the exported model's own scores and maps
    root = write_category(tmp_path / "tiles", n_defective=2)
    result = evaluate_mvtec(exported, root)
    page = open(write_report(tmp_path / "out", exported, result, model_file=path,
                             category=root), encoding="utf-8").read()  # fmt: skip
    assert "onnx export" in page and page.count("<img") >= 3 + 2


def test_confusion_counts_and_rates():
    y = np.array([1, 1, 1, 1, -1, -1, -1])
    labels = np.array([1, -1, 1, 1, -1, 1, 1])
    counts = confusion_counts(y, labels)
    assert counts == {
        "good": 4, "good_passed": 3, "good_flagged": 1, "defective": 3,
        "defects_found": 1, "defects_missed": 2, "false_reject_rate": 0.25,
        "miss_rate": 2 / 3,
    }  # fmt: skip
    none = confusion_counts([1, 1], [1, 1])
    assert none["miss_rate"] is None and none["false_reject_rate"] == 0.0


def test_histogram_counts_images_in_whole_numbers():
    # three images: matplotlib's own ticks would be 0, 0.25, 0.5, ...
    figure = score_histogram(np.array([1, 1, -1]), np.array([-1.0, -1.1, -3.0]), -2.0)
    ticks = figure.axes[0].get_yticks()
    assert len(ticks) >= 2
    np.testing.assert_array_equal(ticks, np.round(ticks))
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_every_miss_and_false_reject_is_listed(fitted_pipeline, tmp_path):
    root = write_category(tmp_path / "tiles", n_good=3, n_defective=10)
    model = copy.deepcopy(fitted_pipeline)
    result = evaluate_mvtec(model, root)
    # a threshold above every defect but one, below one good image: 9 misses and
    # a false reject
    anomaly = -result.score_samples
    defective = np.sort(anomaly[result.y == -1])
    offset = -(defective[-1] + defective[-2]) / 2
    good = np.flatnonzero(result.y == 1)
    model[-1].set_threshold(result.score_samples, offset=offset, method="test")
    result = evaluate_mvtec(model, root)
    missed = np.flatnonzero((result.y == -1) & (result.labels == 1))
    rejects = np.flatnonzero((result.y == 1) & (result.labels == -1))
    assert len(missed) == 9 and len(rejects) == int(np.sum(anomaly[good] >= -offset))
    page = open(write_report(tmp_path / "out", model, result, category=root),
                encoding="utf-8").read()  # fmt: skip
    listed = page.split("Every missed defect")[1].split("Every false reject")[0]
    for i in missed:
        name = "test/crack/" + result.data.paths[result.index[i]].split("/")[-1]
        assert f"<td>{name}</td><td>crack</td>" in listed
        margin = anomaly[i] + offset
        assert f"<td>{margin:+.4g}</td>" in listed and margin < 0
    assert listed.count("<tr>") == 1 + 9
    text = text_of(page)
    assert "9 missed" in text and "1 found" in text and "miss rate 90.0% (9/10)" in text
    good_flagged = len(rejects)
    assert f"{good_flagged} flagged (false rejects)" in text
    assert f"false-reject rate {100 * good_flagged / 3:.1f}% ({good_flagged}/3)" in text
    # the worst few drawn, never more than MAX_PICTURES (the second model pass)
    cases = page.split("Worst false positives")[1].split("Every missed defect")[0]
    assert cases.count("<img") == MAX_PICTURES
    assert "crack: anomaly score" not in cases  # the caption is in the picture
