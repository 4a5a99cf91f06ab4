import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import skdfm._transformer as transformer_module
from skdfm import DFMDetector, anomaly_maps, pixel_auroc


def reference_map(features, detector, feature_shape, size):
    """anomalib's DFM map, written out in float64 numpy: residual^2 channel sum."""
    xc = features.astype(np.float64) - detector.mean_
    v = detector.components_.T
    residual = xc - xc @ v @ v.T
    grid = (residual**2).reshape(len(xc), *feature_shape).sum(1)
    up = F.interpolate(
        torch.from_numpy(grid)[:, None], size=size, mode="bilinear", align_corners=False
    )
    return grid, up[:, 0].numpy()


def test_maps_equal_anomalib_formula(fitted_pipeline, defect_images):
    images, y, _ = defect_images
    X = images[-6:]
    transformer, detector = fitted_pipeline[0], fitted_pipeline[1]
    features = transformer.transform(X)
    grid, at_input = reference_map(
        features, detector, transformer.feature_shape_, transformer.input_size_
    )
    np.testing.assert_allclose(
        anomaly_maps(fitted_pipeline, X, size="grid").maps, grid, rtol=1e-9
    )
    np.testing.assert_allclose(
        anomaly_maps(fitted_pipeline, X, size="input").maps, at_input, rtol=1e-9
    )


def test_grid_map_sums_to_the_image_score(fitted_pipeline, defect_images):
    images = defect_images[0][-8:]
    result = anomaly_maps(fitted_pipeline, images, size="grid")
    np.testing.assert_allclose(
        result.maps.sum(axis=(1, 2)), -result.score_samples, rtol=1e-7
    )


def test_scores_and_labels_equal_the_pipeline(fitted_pipeline, defect_images):
    images = defect_images[0]
    result = anomaly_maps(fitted_pipeline, images)
    np.testing.assert_array_equal(
        result.score_samples, fitted_pipeline.score_samples(images)
    )
    np.testing.assert_array_equal(result.labels, fitted_pipeline.predict(images))
    assert result.score_samples.dtype == np.float64


def test_one_backbone_pass_for_maps_and_scores(
    fitted_pipeline, defect_images, monkeypatch
):
    seen = []
    original = transformer_module.DeepFeatureTransformer._features

    def counting(self, x):
        seen.append(len(x))
        return original(self, x)

    monkeypatch.setattr(
        transformer_module.DeepFeatureTransformer, "_features", counting
    )
    anomaly_maps(fitted_pipeline, defect_images[0][:10])
    assert sum(seen) == 10


def test_default_size_is_each_images_own(fitted_pipeline, defect_images):
    images = defect_images[0]
    result = anomaly_maps(fitted_pipeline, images[:3])
    assert result.maps.shape == (3, 64, 64)
    mixed = [images[0], images[1][:40, :50], images[2][:30]]
    result = anomaly_maps(fitted_pipeline, mixed)
    assert isinstance(result.maps, list)
    assert [m.shape for m in result.maps] == [(64, 64), (40, 50), (30, 64)]
    result = anomaly_maps(fitted_pipeline, mixed, size=(16, 20))
    assert result.maps.shape == (3, 16, 20)


def test_maps_from_files_use_the_file_size(fitted_pipeline, defect_images, tmp_path):
    from PIL import Image

    path = tmp_path / "part.png"
    Image.fromarray(defect_images[0][0][:48]).save(path)
    assert anomaly_maps(fitted_pipeline, [path]).maps.shape == (1, 48, 64)


def test_maps_point_at_the_defects(fitted_pipeline, defect_images):
    images, y, masks = defect_images
    result = anomaly_maps(fitted_pipeline, images[y == -1])
    assert pixel_auroc(masks[y == -1], result.maps) > 0.75


def test_nll_has_no_map(defect_images, fitted_pipeline):
    images, y, _ = defect_images
    features = fitted_pipeline[0].transform(images[y == 1][:20])
    detector = DFMDetector(score_type="nll", pca_level=0.9, device="cpu").fit(features)
    with pytest.raises(ValueError, match="score_type='fre'"):
        anomaly_maps(detector, features, size="grid", feature_shape=(48, 8, 8))


def test_bare_detector_uses_its_fitted_grid_or_needs_feature_shape(
    fitted_pipeline, defect_images
):
    transformer, detector = fitted_pipeline[0], fitted_pipeline[1]
    features = transformer.transform(defect_images[0][:4])
    shape = transformer.feature_shape_
    assert detector.feature_shape_ == shape  # learnt from the Pipeline's rows
    expected = anomaly_maps(fitted_pipeline, defect_images[0][:4], size="grid").maps
    np.testing.assert_allclose(
        anomaly_maps(detector, features, size="grid").maps, expected
    )
    # Rows that lost their grid (plain arrays): the detector fitted on them needs it.
    plain = np.asarray(transformer.transform(defect_images[0][:20]))
    bare = clone(detector).fit(np.array(plain))
    assert bare.feature_shape_ is None
    with pytest.raises(ValueError, match="feature_shape=\\(channels"):
        anomaly_maps(bare, np.array(features), size="grid")
    grid = anomaly_maps(bare, np.array(features), size="grid", feature_shape=shape)
    assert grid.maps.shape == (4, *shape[1:])
    with pytest.raises(ValueError, match="needs the images"):
        anomaly_maps(detector, features, feature_shape=shape)
    with pytest.raises(ValueError, match="entries"):
        anomaly_maps(bare, np.array(features), size="grid", feature_shape=(1, 2, 3))


def test_bad_models_and_sizes(fitted_pipeline, defect_images):
    images = defect_images[0][:2]
    with pytest.raises(ValueError, match="size="):
        anomaly_maps(fitted_pipeline, images, size="original")
    steps = [fitted_pipeline[0], StandardScaler(), fitted_pipeline[1]]
    with pytest.raises(ValueError, match="exactly a DeepFeatureTransformer"):
        anomaly_maps(make_pipeline(*steps), images)
    with pytest.raises(ValueError, match="model must be"):
        anomaly_maps(StandardScaler(), images)


@pytest.mark.cuda
def test_maps_on_cuda_equal_cpu_maps(fitted_pipeline, defect_images):
    import copy

    from skdfm._tools.model import move_model

    images = defect_images[0][:6]
    features = fitted_pipeline[0].transform(images)
    shape = fitted_pipeline[0].feature_shape_
    gpu = copy.deepcopy(fitted_pipeline)
    move_model(gpu, "cuda")
    on_gpu = anomaly_maps(
        gpu[1], torch.from_numpy(features).cuda(), size="grid", feature_shape=shape
    )
    on_cpu = anomaly_maps(
        fitted_pipeline[1], features, size="grid", feature_shape=shape
    )
    np.testing.assert_allclose(on_gpu.maps, on_cpu.maps, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(on_gpu.score_samples, on_cpu.score_samples, rtol=1e-9)
    whole = anomaly_maps(gpu, images)  # backbone, maps and upsampling on the GPU
    assert len(whole.maps) == len(images)
