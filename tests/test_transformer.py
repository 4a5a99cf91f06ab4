"""DeepFeatureTransformer (skdfm/_transformer.py).

Also the image-based replacements of the scikit-learn checks that feed tabular data
(tests/test_common.py lists which test replaces which check).
"""

import pickle

import joblib
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.validation import check_is_fitted
from torchvision.transforms import v2

import skdfm
import skdfm._imaging.backbone as backbone_module
import skdfm._transformer as transformer_module
from skdfm import (
    DeepFeatureTransformer,
    DeviceWarning,
    DFMDetector,
    SkdfmVersionWarning,
)
from skdfm._cache import weights_digest

from .conftest import SMALL_BACKBONE

SMALL = SMALL_BACKBONE


def make_images(n, size=(48, 56), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images():
    return make_images(6)


@pytest.fixture(scope="module")
def fitted(images):
    return DeepFeatureTransformer(**SMALL).fit(images)


def anomalib_features(model_name, layer_index, state, image_files, size, pool):
    """An independent reference of anomalib's DFM feature extraction.

    anomalib: ``read_image`` (Pillow ``convert("RGB")``, float in [0, 1]), torchvision
    ``Resize(antialias=True)`` and ``Normalize`` with ImageNet statistics,
    ``timm.create_model(features_only=True, out_indices=[i])``, ``avg_pool2d`` and a
    flatten (``get_features``).
    """
    model = timm.create_model(
        model_name, pretrained=False, features_only=True, out_indices=[layer_index]
    ).eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("layer4") for k in result.missing_keys)
    transform = v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    batch = torch.stack(
        [
            transform(
                v2.functional.to_dtype(
                    v2.functional.to_image(Image.open(path).convert("RGB")),
                    torch.float32,
                    scale=True,
                )
            )
            for path in image_files
        ]
    )
    with torch.no_grad():
        features = model(batch)[0]
    features = F.avg_pool2d(features, kernel_size=pool)
    return features.reshape(len(features), -1).numpy()


@pytest.mark.parametrize(
    "backbone, pool, size", [("resnet18", 4, 256), ("resnet50", 4, 256)]
)
def test_rows_equal_anomalib_get_features(backbone, pool, size, tmp_path):
    files = []
    for i, image in enumerate(make_images(3, size=(300, 270), seed=5)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    tr = DeepFeatureTransformer(
        backbone=backbone,
        pretrained=False,
        pooling_kernel_size=pool,
        input_size=size,
        device="cpu",
        random_state=0,
    )
    got = tr.fit_transform(files)
    reference = anomalib_features(
        backbone, 3, tr.backbone_.state_dict(), files, size, pool
    )
    assert got.shape == reference.shape == (3, np.prod(tr.feature_shape_))
    assert got.shape[1] == {"resnet18": 4096, "resnet50": 16384}[backbone]
    relative = np.abs(got - reference).max() / np.abs(reference).max()
    assert relative <= 1e-5


def test_output_is_float32_rows_with_feature_shape(fitted, images):
    out = fitted.transform(images)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert fitted.feature_shape_ == (192, 2, 2)
    assert out.shape == (6, 192 * 2 * 2)
    assert fitted.layer_ == "layer3"
    assert fitted.input_size_ == (64, 64)
    assert fitted.device_ == "cpu"


def test_rows_are_the_pooled_map_in_c_order(fitted, images):
    x = fitted.transform(images[:1]).reshape(fitted.feature_shape_)
    no_pool = clone(fitted).set_params(pooling_kernel_size=1).fit(images)
    full_map = torch.from_numpy(no_pool.transform(images[:1]))
    full_map = full_map.reshape(no_pool.feature_shape_)
    pooled = F.avg_pool2d(full_map[None], 2)[0]
    torch.testing.assert_close(torch.from_numpy(x), pooled)


def test_feature_names_say_channel_and_position(fitted):
    names = fitted.get_feature_names_out()
    assert len(names) == np.prod(fitted.feature_shape_)
    assert list(names[:3]) == ["layer3_c0_y0_x0", "layer3_c0_y0_x1", "layer3_c0_y1_x0"]
    assert names[-1] == "layer3_c191_y1_x1"
    with pytest.raises(ValueError, match="input_features must be None"):
        fitted.get_feature_names_out(["a"])


def test_pandas_output(images):
    pytest.importorskip("pandas")
    tr = DeepFeatureTransformer(**SMALL).set_output(transform="pandas")
    frame = tr.fit_transform(images)
    assert list(frame.columns) == list(tr.get_feature_names_out())
    np.testing.assert_array_equal(
        frame.to_numpy(), tr.set_output(transform="default").transform(images)
    )


def test_input_kinds_give_equal_features(fitted, images, tmp_path):
    """Replaces check_transformer_data_not_an_array and check_estimators_dtypes."""
    expected = fitted.transform(images)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    for X in (
        list(images),
        files,
        [Image.fromarray(image) for image in images],
        torch.from_numpy(images).permute(0, 3, 1, 2),
        images.astype(np.float32) / 255,
        images.astype(np.float64) / 255,
        images.astype(np.float16) / 255,
    ):
        tol = 2e-2 if getattr(X, "dtype", None) == np.float16 else 1e-5
        np.testing.assert_allclose(fitted.transform(X), expected, rtol=0, atol=tol)


def test_sample_order_and_batch_invariance(fitted, images):
    """Replaces check_methods_sample_order_invariance / subset_invariance."""
    expected = fitted.transform(images)
    order = np.array([4, 1, 5, 0, 3, 2])
    np.testing.assert_allclose(
        fitted.transform(images[order]), expected[order], atol=1e-5
    )
    np.testing.assert_allclose(fitted.transform(images[2:4]), expected[2:4], atol=1e-5)
    for batch_size in (1, 4, 100):
        other = clone(fitted).set_params(batch_size=batch_size).fit(images)
        np.testing.assert_allclose(other.transform(images), expected, atol=1e-5)


def test_single_image(fitted, images):
    """Replaces check_fit2d_1sample."""
    tr = DeepFeatureTransformer(**SMALL).fit(images[:1])
    assert tr.transform(images[:1]).shape == (1, fitted.transform(images).shape[1])


def test_images_of_any_size_are_resized(fitted, images):
    """Replaces check_fit2d_1feature: tiny and large images give full rows."""
    tiny = make_images(2, size=(5, 7))
    large = make_images(2, size=(300, 200))
    for X in (tiny, large, [tiny[0], large[0]]):
        out = fitted.transform(X)
        assert out.shape == (2, np.prod(fitted.feature_shape_))
        assert np.isfinite(out).all()


def test_fit_returns_self_and_accepts_y(images):
    """Replaces check_estimators_fit_returns_self and check_fit_score_takes_y."""
    tr = DeepFeatureTransformer(**SMALL)
    assert tr.fit(images) is tr
    assert tr.fit(images, y=np.ones(len(images))) is tr


def test_fit_leaves_parameters_alone(images):
    """Replaces check_estimators_overwrite_params, check_dont_overwrite_parameters."""
    tr = DeepFeatureTransformer(**dict(SMALL, device="auto", layer=2))
    params = tr.get_params()
    public_before = set(vars(tr))
    tr.fit(images)
    assert tr.get_params() == params
    added = set(vars(tr)) - public_before
    assert added and all(name.endswith("_") for name in added)


def test_transform_leaves_dict_unchanged(fitted, images):
    """Replaces check_dict_unchanged."""
    before = dict(vars(fitted))
    weights = {k: v.clone() for k, v in fitted.backbone_.state_dict().items()}
    fitted.transform(images)
    assert vars(fitted) == before
    for key, value in fitted.backbone_.state_dict().items():
        assert torch.equal(value, weights[key])


def test_fit_idempotent(images):
    """Replaces check_fit_idempotent."""
    tr = DeepFeatureTransformer(**SMALL)
    first = tr.fit(images).transform(images)
    np.testing.assert_array_equal(tr.fit(images).transform(images), first)


def test_random_state_seeds_random_weights(images):
    a = DeepFeatureTransformer(**SMALL).fit_transform(images)
    b = DeepFeatureTransformer(**dict(SMALL, random_state=1)).fit_transform(images)
    assert not np.allclose(a, b)


def test_not_fitted_error(images):
    """Replaces check_fit_check_is_fitted and check_n_features_in."""
    tr = DeepFeatureTransformer(**SMALL)
    for method in (tr.transform, lambda X: tr.get_feature_names_out()):
        with pytest.raises(NotFittedError):
            method(images)
    check_is_fitted(tr.fit(images))
    assert not hasattr(tr, "n_features_in_")  # images have no feature count


def test_wrong_ndim_and_channels_are_rejected(fitted):
    """Replaces check_fit2d_predict1d and check_n_features_in_after_fitting."""
    for bad, message in (
        (np.zeros((4, 5), np.uint8), "2-D array"),
        (np.zeros(5, np.uint8), "1 dimensions"),
        (np.zeros((2, 8, 8, 4), np.uint8), "2 or 4 channels"),
        (np.zeros((2, 2, 8, 8), np.float32), "2 or 4 channels"),
    ):
        for method in (fitted.transform, DeepFeatureTransformer(**SMALL).fit):
            with pytest.raises(ValueError, match=message):
                method(bad)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_are_rejected(fitted, bad):
    """Replaces check_estimators_nan_inf."""
    X = np.full((3, 16, 16, 3), 0.5, np.float32)
    X[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="Image 1 has NaN or infinite"):
        fitted.transform(X)


def test_negative_pixels_are_rejected(fitted):
    """Replaces check_positive_only_tag_during_fit."""
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        fitted.transform(np.full((1, 16, 16, 3), -0.5, np.float32))


def test_empty_and_object_inputs_are_rejected(fitted, images):
    """Replaces check_estimators_empty_data_messages and check_dtype_object."""
    with pytest.raises(ValueError, match="no images"):
        fitted.transform(images[:0])
    with pytest.raises(ValueError, match="no images"):
        DeepFeatureTransformer(**SMALL).fit([])
    with pytest.raises(ValueError, match="dtype object"):
        fitted.transform(images.astype(object))
    with pytest.raises(ValueError, match="mixes element types"):
        fitted.transform([images[0], "a.png"])


def test_read_only_memmap_input(fitted, images, tmp_path):
    """Replaces check_readonly_memmap_input and the memmap variants."""
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    tr = DeepFeatureTransformer(**SMALL).fit(mapped)
    np.testing.assert_array_equal(tr.transform(mapped), fitted.transform(images))


def test_fortran_ordered_input(fitted, images):
    """Replaces check_f_contiguous_array_estimator."""
    np.testing.assert_array_equal(
        fitted.transform(np.asfortranarray(images)), fitted.transform(images)
    )


def test_fit_transform_equals_fit_then_transform(images):
    """Replaces check_transformer_general."""
    tr = DeepFeatureTransformer(**SMALL)
    np.testing.assert_array_equal(
        tr.fit_transform(images), clone(tr).fit(images).transform(images)
    )


def test_pipeline_fits_and_scores_images(images):
    """Replaces check_pipeline_consistency."""
    tr = DeepFeatureTransformer(**SMALL)
    pipe = make_pipeline(tr, DFMDetector(pca_level=3, device="cpu"))
    pipe.fit(images)
    separate = DFMDetector(pca_level=3, device="cpu").fit(
        clone(tr).fit_transform(images)
    )
    new = make_images(3, seed=9)
    np.testing.assert_allclose(
        pipe.score_samples(new),
        separate.score_samples(clone(tr).fit(images).transform(new)),
        rtol=1e-6,
    )
    assert pipe.predict(new).shape == (3,)


def test_grid_search_over_layer_and_pca_level():
    rng = np.random.default_rng(0)
    good = make_images(12, size=(64, 64), seed=1) // 4 + 96
    bad = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    X = np.concatenate([good, bad])
    y = np.r_[np.ones(12), -np.ones(6)]

    def inliers_train(n_splits=2):
        folds = np.array_split(np.arange(12), n_splits)
        for test_good in folds:
            train = np.setdiff1d(np.arange(12), test_good)
            yield train, np.r_[test_good, np.arange(12, 18)]

    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, layer="layer2")),
        DFMDetector(device="cpu"),
    )
    search = GridSearchCV(
        pipe,
        {
            "deepfeaturetransformer__layer": ["layer2", "layer3"],
            "dfmdetector__pca_level": [2, 4],
        },
        scoring="roc_auc",
        cv=list(inliers_train()),
        error_score="raise",
    )
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.predict(X).shape == (18,)


def test_joblib_round_trip_of_a_pipeline(images, tmp_path, monkeypatch):
    """Replaces check_estimators_pickle: self-contained, no network, same scores."""
    pipe = make_pipeline(
        DeepFeatureTransformer(**SMALL), DFMDetector(pca_level=3, device="cpu")
    ).fit(images)
    new = make_images(3, seed=4)
    expected = pipe.score_samples(new)
    joblib.dump(pipe, tmp_path / "model.joblib")
    monkeypatch.setattr(backbone_module, "_cached_weights", pytest.fail)
    monkeypatch.setattr(backbone_module, "_download_blocker", pytest.fail)
    loaded = joblib.load(tmp_path / "model.joblib")
    np.testing.assert_array_equal(loaded.score_samples(new), expected)
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(pipe)).score_samples(new), expected
    )
    memmapped = joblib.load(tmp_path / "model.joblib", mmap_mode="r")
    np.testing.assert_array_equal(memmapped.score_samples(new), expected)


def test_pickle_carries_only_the_truncated_weights_on_cpu(fitted):
    state = fitted.__getstate__()
    weights = state["backbone_"]
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    assert not any(k.startswith(("layer4", "fc")) for k in weights)
    assert isinstance(fitted.backbone_, torch.nn.Module)  # the live model is intact


def test_pretrained_model_loads_its_weights_from_the_pickle(
    images, tmp_path, monkeypatch
):
    torch.manual_seed(3)
    path = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    tr = DeepFeatureTransformer(
        **dict(SMALL, pretrained=True, checkpoint_path=str(path))  # offline
    ).fit(images)
    expected = tr.transform(images)
    blob = pickle.dumps(tr)
    path.unlink()  # the checkpoint is gone: the pickle must be enough
    monkeypatch.setattr(backbone_module, "_cached_weights", pytest.fail)
    np.testing.assert_array_equal(pickle.loads(blob).transform(images), expected)


def test_clone_carries_no_weights(fitted):
    copy = clone(fitted)
    assert not hasattr(copy, "backbone_")
    assert copy.get_params() == fitted.get_params()


def test_saved_model_records_the_version(fitted, monkeypatch):
    blob = pickle.dumps(fitted)
    monkeypatch.setattr(skdfm, "__version__", "99.0")
    with pytest.warns(SkdfmVersionWarning, match="DeepFeatureTransformer was saved"):
        pickle.loads(blob)


def test_model_saved_on_cuda_loads_on_cpu(fitted, images, monkeypatch):
    state = fitted.__getstate__()
    state["device_"] = "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = DeepFeatureTransformer.__new__(DeepFeatureTransformer)
    with pytest.warns(DeviceWarning, match="'cuda:0'"):
        loaded.__setstate__(state)
    assert loaded.device_ == "cpu"
    assert next(loaded.backbone_.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(loaded.transform(images), fitted.transform(images))


def test_device_parameter(images, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tr = DeepFeatureTransformer(**dict(SMALL, device="auto")).fit(images)
    assert tr.device_ == "cpu"
    assert tr.get_params()["device"] == "auto"
    with pytest.raises(ValueError, match="CUDA is not available"):
        DeepFeatureTransformer(**dict(SMALL, device="cuda")).fit(images)
    with pytest.raises(ValueError, match="not a valid device"):
        DeepFeatureTransformer(**dict(SMALL, device="gpu0")).fit(images)


def test_channels_last_matches_nchw(fitted, images):
    fast = clone(fitted).set_params(channels_last=True).fit(images)
    assert fast.backbone_.conv1[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    np.testing.assert_allclose(
        fast.transform(images), fitted.transform(images), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_is_close(fitted, images, precision):
    reduced = clone(fitted).set_params(precision=precision).fit(images)
    out = reduced.transform(images)
    assert out.dtype == np.float32
    reference = fitted.transform(images)
    relative = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < relative < 5e-2


def test_progress_bar(fitted, images, capsys):
    clone(fitted).set_params(progress=True).fit(images).transform(images)
    assert "features" in capsys.readouterr().err
    fitted.transform(images)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "params, error, message",
    [
        (dict(layer="layer7"), ValueError, "valid names are"),
        (dict(layer=-1), ValueError, "'layer' parameter"),
        (dict(backbone="no_such_net"), ValueError, "is not a timm model"),
        (dict(pooling_kernel_size=0), ValueError, "'pooling_kernel_size' parameter"),
        (dict(pooling_kernel_size=8), ValueError, "smaller than pooling_kernel_size"),
        (dict(input_size=(64,)), ValueError, "input_size"),
        (dict(input_size=(64, 0)), ValueError, "input_size"),
        (dict(precision="int8"), ValueError, "'precision' parameter"),
        (dict(batch_size=0), ValueError, "'batch_size' parameter"),
        (dict(checkpoint_path="w.pth"), ValueError, "pretrained=False"),
        (
            dict(pretrained=True, checkpoint_path="w.pth"),  # offline: missing file
            FileNotFoundError,
            "w.pth",
        ),
    ],
)
def test_invalid_parameters_are_rejected_at_fit(images, params, error, message):
    tr = DeepFeatureTransformer(**dict(SMALL, **params))  # __init__ never validates
    with pytest.raises(error, match=message):
        tr.fit(images)


def test_a_failed_fit_leaves_the_estimator_unfitted(images):
    tr = DeepFeatureTransformer(**dict(SMALL, pooling_kernel_size=8))
    with pytest.raises(ValueError, match="smaller than pooling_kernel_size"):
        tr.fit(images)
    with pytest.raises(NotFittedError):
        tr.transform(images)


def test_rectangular_input_size(images):
    tr = DeepFeatureTransformer(**dict(SMALL, input_size=(64, 128))).fit(images)
    assert tr.input_size_ == (64, 128)
    assert tr.feature_shape_ == (192, 2, 4)


@pytest.mark.cuda
def test_cuda_features_match_cpu(fitted, images):
    gpu = clone(fitted).set_params(device="cuda").fit(images)
    assert gpu.device_.startswith("cuda")
    np.testing.assert_allclose(
        gpu.transform(images), fitted.transform(images), rtol=1e-3, atol=1e-4
    )
    tensor = torch.from_numpy(images).cuda()
    np.testing.assert_allclose(gpu.transform(tensor), gpu.transform(images), atol=1e-6)


@pytest.mark.cuda
def test_cuda_pipeline_round_trips(images, tmp_path):
    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, device="cuda")),
        DFMDetector(pca_level=3, device="cuda"),
    ).fit(images)
    joblib.dump(pipe, tmp_path / "m.joblib")
    loaded = joblib.load(tmp_path / "m.joblib")
    np.testing.assert_array_equal(
        loaded.score_samples(images), pipe.score_samples(images)
    )


def test_memory_layout_of_the_input_does_not_change_features(fitted, images):
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(fitted.transform(nchw), fitted.transform(images))


def test_torch_output_is_the_same_rows_as_a_tensor(fitted, images):
    tr = clone(fitted).set_params(output="torch").fit(images)
    rows = tr.transform(images)
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.float32
    assert rows.device == torch.device(tr.device_)
    np.testing.assert_array_equal(rows.numpy(), fitted.transform(images))
    cached = clone(tr).set_params(cache=skdfm.FeatureCache()).fit(images)
    for _ in range(2):  # a miss, then a hit
        np.testing.assert_array_equal(cached.transform(images).numpy(), rows.numpy())


def test_pipeline_with_torch_output_scores_like_numpy_output(images):
    numpy_pipe = make_pipeline(
        DeepFeatureTransformer(**SMALL), DFMDetector(pca_level=3, device="cpu")
    ).fit(images)
    torch_pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, output="torch")),
        DFMDetector(pca_level=3, device="cpu"),
    ).fit(images)
    np.testing.assert_allclose(
        torch_pipe.score_samples(images), numpy_pipe.score_samples(images), rtol=1e-12
    )


@pytest.mark.cuda
def test_cuda_pipeline_keeps_features_on_the_gpu(images, monkeypatch):
    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, device="cuda", output="torch")),
        DFMDetector(pca_level=3, device="cuda"),
    )
    to_host = []
    original = torch.Tensor.cpu

    def spy(self, *args, **kwargs):
        to_host.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    pipe.fit(images)
    scores = pipe.score_samples(images)
    n_features = int(np.prod(pipe[0].feature_shape_))
    # Only small results (scores, components) come back, never the feature rows.
    assert all(n_features not in shape for shape in to_host)
    monkeypatch.undo()
    reference = make_pipeline(
        DeepFeatureTransformer(**SMALL), DFMDetector(pca_level=3, device="cpu")
    ).fit(images)
    np.testing.assert_allclose(scores, reference.score_samples(images), rtol=1e-3)


def test_weights_digest_is_computed_once_at_fit(images, monkeypatch):
    tr = DeepFeatureTransformer(**SMALL, cache=skdfm.FeatureCache()).fit(images)
    assert tr.weights_digest_ == weights_digest(tr.backbone_)
    other = clone(tr).set_params(random_state=1).fit(images)
    assert other.weights_digest_ != tr.weights_digest_

    def refuse(model):
        raise AssertionError("the backbone weights were hashed again")

    monkeypatch.setattr(transformer_module, "weights_digest", refuse)
    for _ in range(2):  # a miss, then a hit: the cache key uses the fitted digest
        tr.transform(images)
    assert tr.cache.hits == len(images)


def test_transform_with_sizes_gives_each_images_own_size(fitted, tmp_path):
    mixed = [make_images(1, size)[0] for size in [(48, 56), (30, 20)]]
    features, sizes = fitted.transform_with_sizes(mixed)
    np.testing.assert_array_equal(features, fitted.transform(mixed))
    assert sizes == [(48, 56), (30, 20)]
    path = tmp_path / "wide.png"
    Image.fromarray(make_images(1, (17, 90))[0]).save(path)
    assert fitted.transform_with_sizes([path])[1] == [(17, 90)]


def test_to_device_moves_the_backbone(images):
    tr = DeepFeatureTransformer(**dict(SMALL, device="auto")).fit(images)
    before = tr.transform(images)
    assert tr.to_device("cpu") is tr
    assert tr.device == "cpu" and tr.device_ == "cpu"
    assert next(tr.backbone_.parameters()).device == torch.device("cpu")
    np.testing.assert_array_equal(tr.transform(images), before)


@pytest.mark.cuda
def test_to_device_moves_the_backbone_to_cuda(images):
    tr = DeepFeatureTransformer(**SMALL).fit(images)
    before = tr.transform(images)
    tr.to_device("cuda")
    assert next(tr.backbone_.parameters()).is_cuda and tr.device_.startswith("cuda")
    np.testing.assert_allclose(tr.transform(images), before, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "params",
    [
        {"layer": True},
        {"pooling_kernel_size": True},
        {"input_size": True},
        {"input_size": (True, 64)},
        {"batch_size": False},
    ],
)
def test_bools_are_not_numbers_here(images, params):
    with pytest.raises(ValueError, match="bool|input_size"):
        DeepFeatureTransformer(**{**SMALL, **params}).fit(images)


def test_numpy_integers_name_layers_like_ints(images):
    tr = DeepFeatureTransformer(**{**SMALL, "layer": np.int64(2)}).fit(images)
    assert tr.layer_ == "layer2"


@pytest.mark.parametrize(
    "change",
    [
        {"pooling_kernel_size": 1},
        {"precision": "bfloat16"},
        {"backbone": "resnet18"},
        {"layer": "layer1"},
        {"input_size": 48},
    ],
)
def test_feature_params_changed_after_fit_say_so(images, change):
    tr = DeepFeatureTransformer(**SMALL).fit(images)
    before = tr.transform(images)
    tr.set_params(**change)
    ((name, value),) = change.items()
    with pytest.raises(NotFittedError, match=f"{name}={value!r} was set after"):
        tr.transform(images)
    # a pickle holds the fitted model and loads (it used to fail on `backbone`)
    loaded = pickle.loads(pickle.dumps(tr))
    loaded.set_params(**{name: tr.feature_params_[name]})
    np.testing.assert_array_equal(loaded.transform(images), before)
    tr.fit(images)  # a new fit takes the new value
    assert tr.feature_params_[name] == value
    assert tr.transform(images).shape[0] == len(images)


def test_huge_input_sizes_and_meta_tensors_are_clear_errors(images):
    tr = DeepFeatureTransformer(**{**SMALL, "input_size": 100_000})
    with pytest.raises(MemoryError, match=r"forward pass of one 100000x100000 image"):
        tr.fit(images)
    fitted = DeepFeatureTransformer(**SMALL).fit(images)
    meta = torch.empty((2, 3, 64, 64), device="meta")
    with pytest.raises(ValueError, match="'meta' device"):
        fitted.transform(meta)
    with pytest.raises(ValueError, match=r"X\[0\] is a tensor on the 'meta'"):
        fitted.transform([meta[0]])


def test_equivalent_parameter_spellings_are_not_changes(images):
    tr = DeepFeatureTransformer(**{**SMALL, "input_size": np.int64(64), "layer": 2})
    tr.fit(images)
    before = tr.transform(images)
    for same in (
        {"input_size": (64, 64)},
        {"input_size": 64},
        {"layer": "layer2"},
        {"layer": np.int64(2)},
        {"pooling_kernel_size": np.int64(2)},
    ):
        tr.set_params(**same)
        np.testing.assert_array_equal(tr.transform(images), before)
    with pytest.raises(NotFittedError, match="layer='layer1' was set after"):
        tr.set_params(layer="layer1").transform(images)


# -- several layers and the grid the rows carry ------------------------------------


# 64 px: layer3 is 4x4, pooled by 2 to 2x2; 80 px: 5x5, whose last row and column
# the pooling drops, so layer2 (10x10) is cropped to 8x8 before pooling by 4
@pytest.mark.parametrize("size", [64, 80])
def test_several_layers_equal_a_union_of_single_layers_in_one_pass(
    images, monkeypatch, size
):
    small = dict(SMALL, input_size=size)
    two = DeepFeatureTransformer(**dict(small, layer=["layer3", "layer2"])).fit(images)
    assert two.layer_ == ("layer2", "layer3")  # network order
    layer2 = DeepFeatureTransformer(
        **dict(small, layer="layer2", pooling_kernel_size=4)
    )
    layer3 = DeepFeatureTransformer(**dict(small, layer="layer3"))
    layer2.fit(images), layer3.fit(images)
    c2, c3 = layer2.feature_shape_[0], layer3.feature_shape_[0]
    assert two.feature_shape_ == (c2 + c3, *layer3.feature_shape_[1:])
    assert layer2.feature_shape_[1:] == layer3.feature_shape_[1:]  # one grid
    calls = []
    forward = type(two.backbone_).forward
    monkeypatch.setattr(
        type(two.backbone_),
        "forward",
        lambda self, x: calls.append(len(x)) or forward(self, x),
    )
    rows = two.transform(images)
    assert calls == [len(images)]  # one forward pass for both layers
    union = np.hstack([layer2.transform(images), layer3.transform(images)])
    np.testing.assert_allclose(rows, union, rtol=1e-6, atol=1e-7)
    names = two.get_feature_names_out()
    assert names[0] == "layer2_c0_y0_x0" and names[-1] == f"layer3_c{c3 - 1}_y1_x1"
    assert two.feature_shape_[1:] == (2, 2)
    # other spellings of the same layers are the same fit
    for same in (("layer2", "layer3"), [2, 3], ["layer3", 2]):
        np.testing.assert_array_equal(
            two.set_params(layer=same).transform(images), rows
        )
    with pytest.raises(NotFittedError, match="layer=\\['layer2'\\] was set after"):
        two.set_params(layer=["layer2"]).transform(images)


@pytest.mark.parametrize(
    "layer, message",
    [
        ([], "names no layer"),
        (["layer2", 2], "names a layer twice"),
        (["layer2", True], "must be a layer name"),
        (["layer2", "layer9"], "is not a feature layer"),
    ],
)
def test_bad_layer_lists_are_refused(images, layer, message):
    with pytest.raises(ValueError, match=message):
        DeepFeatureTransformer(**dict(SMALL, layer=layer)).fit(images)


@pytest.mark.parametrize("layer", ["layer2", ["layer2", "layer3"]])
def test_detector_learns_the_grid_in_a_pipeline(images, layer):
    from skdfm import anomaly_maps

    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, layer=layer)),
        DFMDetector(image_score="max", pca_level=3, device="cpu"),
    ).fit(images)
    transformer, detector = pipe[0], pipe[1]
    assert detector.feature_shape_ == transformer.feature_shape_
    result = anomaly_maps(pipe, images, size="grid")
    assert result.maps.shape == (len(images), *transformer.feature_shape_[1:])
    np.testing.assert_array_equal(result.score_samples, pipe.score_samples(images))
    np.testing.assert_allclose(
        -result.score_samples, result.maps.reshape(len(images), -1).max(1), rtol=1e-12
    )


def test_detector_learns_the_grid_from_pandas_columns(images):
    pytest.importorskip("pandas")
    layer = ["layer2", "layer3"]
    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, layer=layer)).set_output(
            transform="pandas"
        ),
        DFMDetector(image_score=2, pca_level=3, device="cpu"),
    ).fit(images)
    assert pipe[1].feature_shape_ == pipe[0].feature_shape_
    assert list(pipe[1].feature_names_in_[:1]) == ["layer2_c0_y0_x0"]
    numpy_pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, layer=layer)),
        DFMDetector(image_score=2, pca_level=3, device="cpu"),
    ).fit(images)
    np.testing.assert_allclose(
        pipe.score_samples(images), numpy_pipe.score_samples(images), rtol=1e-10
    )


def test_grid_search_over_layers_and_image_score(defect_images):
    from skdfm import FeatureCache, InlierKFold, image_auroc_scorer

    images, y, _ = defect_images
    cache = FeatureCache()
    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, layer="layer2"), cache=cache),
        DFMDetector(device="cpu"),
    )
    search = GridSearchCV(
        pipe,
        {
            "deepfeaturetransformer__layer": ["layer2", ["layer2", "layer3"]],
            "dfmdetector__image_score": ["sum", "max", 2],
        },
        scoring=image_auroc_scorer,
        cv=InlierKFold(2),
        error_score="raise",
    ).fit(images, y)
    assert len(search.cv_results_["params"]) == 6
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    assert best[1].feature_shape_ == best[0].feature_shape_
    assert best[1].image_score_ == search.best_params_["dfmdetector__image_score"]


def test_several_layers_round_trip(images, tmp_path):
    pipe = make_pipeline(
        DeepFeatureTransformer(**dict(SMALL, layer=["layer2", "layer3"])),
        DFMDetector(image_score="max", pca_level=3, device="cpu"),
    ).fit(images)
    expected = pipe.score_samples(images)
    skdfm.save(pipe, tmp_path / "m.skdfm")
    joblib.dump(pipe, tmp_path / "m.joblib")
    for loaded in (
        skdfm.load(tmp_path / "m.skdfm"),
        joblib.load(tmp_path / "m.joblib"),
    ):
        assert loaded[0].layer_ == ("layer2", "layer3")
        assert loaded[1].feature_shape_ == pipe[0].feature_shape_
        np.testing.assert_array_equal(loaded.score_samples(images), expected)


def test_every_fitted_attribute_is_in_the_table_and_documented():
    from skdfm._transformer import TRANSFORMER_ATTRIBUTES

    from .test_detector import documented_attributes

    names = {row.name for row in TRANSFORMER_ATTRIBUTES}
    assert names == documented_attributes(DeepFeatureTransformer)
