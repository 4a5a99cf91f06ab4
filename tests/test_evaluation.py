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
