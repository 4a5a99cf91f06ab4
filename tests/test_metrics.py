import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from skdfm import aupro, check_outlier_labels, image_auroc, pixel_auroc


def test_labels_accept_plus_minus_one():
    np.testing.assert_array_equal(check_outlier_labels([1, -1, 1.0]), [1, -1, 1])


@pytest.mark.parametrize("y", [[0, 1, 1], [1, 1, 1, 0], [True, False]])
def test_zero_one_labels_are_refused_not_guessed(y):
    with pytest.raises(ValueError, match="0/1|dtype bool"):
        check_outlier_labels(y)


def test_zero_one_message_says_how_to_convert():
    with pytest.raises(ValueError, match=r"np.where\(y == 1, -1, 1\)"):
        check_outlier_labels([0, 1])


@pytest.mark.parametrize("y", [[1, 2], ["a", "b"], [[1, -1]]])
def test_other_labels_are_refused(y):
    with pytest.raises(ValueError):
        check_outlier_labels(y)


def test_image_auroc_hand_computed():
    # anomalies at scores -3 and -1.5; normals at -1, -2: pairs (normal > anomaly):
    # (-1 > -3), (-1 > -1.5), (-2 > -3), (-2 < -1.5) -> 3 of 4.
    assert image_auroc([1, 1, -1, -1], [-1.0, -2.0, -3.0, -1.5]) == 0.75


def test_image_auroc_is_roc_auc_of_scikit_learn_with_inliers_positive():
    rng = np.random.default_rng(0)
    y = np.where(rng.random(50) < 0.3, -1, 1)
    s = rng.normal(size=50) + (y == 1)
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_image_auroc_needs_both_classes_and_matching_shapes():
    with pytest.raises(ValueError, match="both"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="one score"):
        image_auroc([1, -1], [0.1, 0.2, 0.3])


def test_pixel_auroc_hand_computed():
    masks = [np.array([[1, 0], [0, 0]]), np.array([[0, 0], [0, 1]])]
    maps = [np.array([[0.9, 0.1], [0.5, 0.2]]), np.array([[0.3, 0.0], [0.4, 0.6]])]
    # defect pixels 0.9, 0.6; normal 0.1 0.5 0.2 0.3 0.0 0.4: 0.9 beats all 6,
    # 0.6 beats all 6 -> 1.0. Lower one defect to 0.35: it beats 0.1 0.2 0.3 0.0 (4).
    assert pixel_auroc(masks, maps) == 1.0
    maps[1][1, 1] = 0.35
    assert pixel_auroc(masks, maps) == pytest.approx((6 + 4) / 12)


def test_pixel_metrics_check_shapes_and_values():
    with pytest.raises(ValueError, match="same size"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([np.eye(2)], [np.full((2, 2), np.nan)])
    with pytest.raises(ValueError, match="2 masks but 1"):
        pixel_auroc([np.eye(2), np.eye(2)], [np.eye(2)])
    with pytest.raises(ValueError, match="both defective and normal"):
        pixel_auroc([np.zeros((2, 2))], [np.eye(2)])


def test_aupro_perfect_and_worst():
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    assert aupro(masks, [[[9, 8, 1, 2, 3, 4]]]) == pytest.approx(1.0)
    assert aupro(masks, [[[0, 0, 1, 2, 3, 4]]]) == pytest.approx(0.0)


def test_aupro_hand_computed_two_regions_of_different_size():
    # Region A (1 pixel, score 5) and region B (3 pixels, scores 4, 1, 0 ... ) in
    # one image; 10 normal pixels scoring 3.5, 3, 2.5, then 0.5 (x7).
    mask = np.zeros((1, 14), bool)
    mask[0, 0] = True  # A
    mask[0, 2:5] = True  # B (3 pixels, adjacent)
    amap = np.zeros((1, 14))
    amap[0, 0] = 5
    amap[0, 2:5] = [4, 1, 0.2]
    amap[0, 1] = 3.5
    amap[0, 5:14] = [3, 2.5] + [0.5] * 7
    # Thresholds (descending): 5 -> PRO 1/2 (A), FPR 0
    # 4 -> PRO 1/2 + 1/6, FPR 0; 3.5 -> FPR 0.1; 3 -> 0.2; 2.5 -> 0.3
    # 1 -> PRO 1/2 + 2/6 at FPR 0.3; then FPR jumps to 1.0 at 0.5.
    # Curve: (0, 0) -> (0, 1/2) -> (0, 2/3) -> (0.1, 2/3) -> (0.2, 2/3)
    # -> (0.3, 2/3) -> (0.3, 5/6).  Area to 0.3 = 0.3 * 2/3; normalised: 2/3.
    assert aupro([mask[0].reshape(1, 14)], [amap]) == pytest.approx(2 / 3)
    # With the limit at 0.2 the area is 0.2 * 2/3 -> normalised 2/3 again;
    # with limit 0.65 the segment from (0.3, 5/6) to (1.0, 5/6 + 1/6 * ...)
    # B's last pixel (0.2) comes after all 0.5s: at FPR 1.0 PRO is 5/6, then 1.
    expected = (0.3 * 2 / 3 + 0.35 * 5 / 6) / 0.65
    assert aupro([mask[0].reshape(1, 14)], [amap], fpr_limit=0.65) == pytest.approx(
        expected
    )


def test_aupro_interpolates_at_the_limit():
    # One defect pixel scoring lowest: PRO stays 0 until FPR 1; with 4 normal
    # pixels the curve is 0 up to the limit.  Put the defect in the middle instead:
    mask = np.array([[[0, 1, 0, 0, 0]]])
    amap = np.array([[[4, 3, 2, 1, 0]]])
    # (0,0) -> FPR 0.25 at 4 -> PRO 1 at 3 (FPR 0.25). Area to 0.3: 0.05 * 1.
    assert aupro(mask, amap) == pytest.approx(0.05 / 0.3)


def test_aupro_counts_eight_connected_regions_once():
    # Diagonal neighbours form one region: 2 pixels, one found -> PRO 1/2 at FPR 0.
    mask = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 0]]])
    amap = np.array([[[9, 0, 0], [0, 0, 0], [0, 0, 0]]], float)
    amap[0, 1, 1] = -1  # the second pixel of the region is found last
    assert aupro(mask, amap) == pytest.approx(0.5)


def test_aupro_needs_a_defect_and_normal_pixels():
    with pytest.raises(ValueError, match="defect region"):
        aupro([np.zeros((2, 2))], [np.eye(2)])
    with pytest.raises(ValueError, match="normal pixels"):
        aupro([np.ones((2, 2))], [np.eye(2)])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.eye(2)], [np.eye(2)], fpr_limit=0)
