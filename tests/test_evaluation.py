import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from skdfm._evaluation.evaluation import evaluation_metrics


def test_metrics_overall_and_per_defect_by_hand():
    y = np.array([1, 1, 1, -1, -1, -1])
    anomaly = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 1.5])
    labels = np.where(anomaly > 0.5, -1, 1)
    kinds = ["good", "good", "good", "crack", "hole", "hole"]
    masks = [np.zeros((2, 2), bool)] * 3 + [None]
    masks += [np.array([[1, 0], [0, 0]], bool), np.array([[0, 0], [0, 1]], bool)]
    maps = [np.full((2, 2), a) for a in anomaly]
    maps[4] = np.array([[0.9, 0.1], [0.1, 0.1]])
    maps[3] = None
    metrics = evaluation_metrics(y, -anomaly, labels, kinds, masks, maps)
    overall = metrics["overall"]
    assert overall["images"] == 6 and overall["defective"] == 3
    assert overall["image_auroc"] == pytest.approx(roc_auc_score(y == -1, anomaly))
    assert overall["image_aupr"] == pytest.approx(
        average_precision_score(y == -1, anomaly)
    )
    # at the threshold: flagged 0.9 (good), 0.8 and 1.5 -> precision 2/3, recall 2/3
    assert overall["precision"] == pytest.approx(2 / 3)
    assert overall["recall"] == pytest.approx(2 / 3)
    assert overall["flagged"] == 3
    # pixel metrics over the 5 images with masks (the crack's is unknown)
    assert overall["pixel_images"] == 5
    truth = np.concatenate([m.ravel() for m in masks if m is not None])
    pairs = zip(maps, masks, strict=True)
    values = np.concatenate([m.ravel() for m, k in pairs if k is not None])
    assert overall["pixel_auroc"] == pytest.approx(roc_auc_score(truth, values))
    # per defect: each type against the good images
    assert set(metrics["per_defect"]) == {"crack", "hole"}
    crack = metrics["per_defect"]["crack"]
    assert crack["images"] == 4 and crack["recall"] == 1.0
    assert crack["image_auroc"] == pytest.approx(2 / 3)  # 0.8 beats 0.1 and 0.2 only
    assert "pixel_auroc" not in crack  # its only defective image has no mask
    assert metrics["per_defect"]["hole"]["pixel_images"] == 5


def test_without_masks_only_image_metrics():
    metrics = evaluation_metrics([1, -1], [0.0, -1.0], [1, -1], ["good", "dent"])
    assert metrics["overall"]["image_auroc"] == 1.0
    assert "pixel_auroc" not in metrics["overall"]


def test_evaluate_mvtec_scores_every_readable_image_once(fitted_pipeline, tmp_path):
    import copy

    from skdfm import anomaly_maps, load_mvtec
    from skdfm._evaluation.evaluation import evaluate_mvtec

    from .conftest import write_mvtec_tree

    root = write_mvtec_tree(tmp_path / "bottle", size=(40, 48))
    (root / "test" / "good" / "001.png").write_bytes(b"broken")
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    data = load_mvtec(root, load_masks=False, missing_masks="none")
    result = evaluate_mvtec(fitted_pipeline, root)
    assert [p.split("/")[-2:] for p, _ in result.skipped] == [["good", "001.png"]]
    assert [p.split("/")[-2:] for p, _ in result.no_pixel_metrics] == [
        ["hole", "000.png"]
    ]
    assert result.has_maps and result.has_masks
    paths = [data.paths[i] for i in result.index]
    assert len(paths) == 4 and result.y.tolist() == [1, -1, -1, -1]
    expected = anomaly_maps(fitted_pipeline, paths)
    np.testing.assert_allclose(result.score_samples, expected.score_samples)
    np.testing.assert_array_equal(result.labels, expected.labels)
    assert result.masks[1] is None and result.maps[1] is None  # hole: no mask
    np.testing.assert_allclose(result.maps[2], expected.maps[2])
    assert result.masks[0].shape == (40, 48) and not result.masks[0].any()
    assert result.metrics == evaluation_metrics(
        result.y, result.score_samples, result.labels, result.defect_types,
        result.masks, result.maps,
    )  # fmt: skip
    assert result.metrics["overall"]["pixel_images"] == 3
    # an nll model: image metrics only; no readable image: an error
    nll = copy.deepcopy(fitted_pipeline)
    nll[-1].set_params(score_type="nll").fit(nll[0].transform(paths))
    result = evaluate_mvtec(nll, root)
    assert not result.has_maps and "pixel_auroc" not in result.metrics["overall"]
    assert all(m is None for m in result.masks) and result.no_pixel_metrics == []
    for path in (root / "test").rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(ValueError, match="no readable images in"):
        evaluate_mvtec(fitted_pipeline, root)
