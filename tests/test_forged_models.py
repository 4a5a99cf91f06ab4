"""Forged ``.skdfm`` files: values no fit makes are refused when loading.

The digest of a model file is no signature: whoever forges a file recomputes it.
Each test edits one field of a really saved file, recomputes the digest as the
documented format says (as a forger would), and checks that ``skdfm.load``
refuses the file with a ModelFileError naming the file and the field, where the
loader used to load it and then fail at scoring, or score with it.
"""

import copy
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from sklearn.pipeline import Pipeline

import skdfm
from skdfm import ModelFileError
from skdfm._cache import weights_digest
from skdfm._tools.saving import MAX_FILE_IMAGE_PIXELS

TRANSFORMER, DETECTOR = "deepfeaturetransformer", "dfmdetector"


# -- a forger's tools ------------------------------------------------------------------


def read_model_file(path):
    """(document, arrays) of a model file."""
    with safe_open(path, "np") as handle:
        document = json.loads(handle.metadata()["skdfm"])
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return document, arrays


def write_model_file(path, document, arrays):
    """A model file around ``document`` and ``arrays``, its SHA-256 digest computed
    by hand from the format's description (skdfm's own code is not used)."""
    text = json.dumps(document)
    digest = hashlib.sha256(b"skdfm-model\0")
    digest.update(text.encode("utf-8"))
    for name in sorted(arrays):
        array = np.asarray(arrays[name], order="C")  # 0-d stays 0-d
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    metadata = {"format": "skdfm-model", "skdfm": text, "sha256": digest.hexdigest()}
    save_file(arrays, path, metadata=metadata)
    return path


def forge(saved, path, change):
    """``saved`` with ``change(document, arrays)`` applied, re-digested, at ``path``."""
    document, arrays = read_model_file(saved)
    change(document, arrays)
    return write_model_file(path, document, arrays)


def state(document, step):
    return dict(document["model"]["steps"])[step]["state"]


def set_values(step, **values):
    """A change setting attributes of one step's state to JSON values."""

    def change(document, arrays):
        state(document, step).update(values)

    return change


def edit_array(step, name, edit):
    """A change applying ``edit`` (in place) to a copy of one fitted array."""

    def change(document, arrays):
        key = state(document, step)[name]["__tensor__"]
        arrays[key] = arrays[key].copy()
        edit(arrays[key])

    return change


def as_tuple(*values):
    return {"__tuple__": list(values)}


NAN, INF = {"__float__": "nan"}, {"__float__": "inf"}


@pytest.fixture(scope="module")
def saved(fitted_pipeline, tmp_path_factory):
    """A Pipeline (test_resnet layer2, 64 px, kernel 2: a (48, 4, 4) grid) saved."""
    assert fitted_pipeline[0].feature_shape_ == (48, 4, 4)
    return skdfm.save(fitted_pipeline, tmp_path_factory.mktemp("m") / "m.skdfm")


def refused(path, message):
    with pytest.raises(ModelFileError, match=message) as error:
        skdfm.load(path)
    assert error.value.path == str(path)
    return error.value


def test_the_forger_s_tools_make_files_that_load(saved, tmp_path, defect_images):
    """An unchanged document re-written by hand loads and scores as the original."""
    images = defect_images[0][:4]
    path = forge(saved, tmp_path / "same.skdfm", lambda document, arrays: None)
    np.testing.assert_array_equal(
        skdfm.load(path).score_samples(images), skdfm.load(saved).score_samples(images)
    )


# -- weights ---------------------------------------------------------------------------


def backbone_tensor(saved, name, edit):
    """A change editing one backbone tensor and recomputing ``weights_digest_``
    (what the loader compares the weights with), as a forger would."""

    def change(document, arrays):
        key = state(document, TRANSFORMER)["backbone_"]["__dict__"][name]["__tensor__"]
        arrays[key] = arrays[key].copy()
        edit(arrays[key])
        backbone = skdfm.load(saved)[0].backbone_
        backbone.state_dict()[name].copy_(torch.from_numpy(arrays[key]))
        state(document, TRANSFORMER)["weights_digest_"] = weights_digest(backbone)

    return change


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("conv1.0.weight", lambda a: a.flat.__setitem__(0, np.nan), "'conv1.0.weight'"),
        ("bn1.weight", lambda a: a.__setitem__(1, np.inf), "'bn1.weight'"),
        ("bn1.running_var", lambda a: a.__setitem__(0, -1.0), "'bn1.running_var'"),
    ],
    ids=["nan conv weight", "inf norm weight", "negative running variance"],
)
def test_non_finite_backbone_weights_are_refused(saved, tmp_path, name, edit, message):
    # before: loaded; scoring raised "Input X contains NaN" far from the cause
    change = backbone_tensor(saved, name, edit)
    error = refused(forge(saved, tmp_path / "w.skdfm", change), message)
    assert "infinity" in str(error) or "below 0" in str(error)


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("mean_", lambda a: a.__setitem__(0, np.nan), "mean_ is not a finite"),
        ("components_", lambda a: a.__setitem__((0, 0), np.inf), "components_"),
        ("singular_values_", lambda a: a.__setitem__(0, -a[0]), "singular_values_"),
        ("explained_variance_", lambda a: a.__setitem__(-1, -1.0), "explained_var"),
        ("explained_variance_ratio_", lambda a: a.__setitem__(0, 5.0), "_ratio_"),
    ],
)
def test_detector_arrays_no_fit_makes_are_refused(saved, tmp_path, name, edit, message):
    # before (negative or > 1 values): loaded and reported them as fitted
    refused(
        forge(saved, tmp_path / "d.skdfm", edit_array(DETECTOR, name, edit)), message
    )


def test_arrays_of_another_dtype_are_refused(saved, tmp_path):
    # before: a float16 mean_ loaded, and scores moved (rounded mean)
    def to_float16(document, arrays):
        key = state(document, DETECTOR)["mean_"]["__tensor__"]
        arrays[key] = arrays[key].astype(np.float16)

    refused(forge(saved, tmp_path / "f16.skdfm", to_float16), "mean_ .*float32 or")


# -- the transformer's normalisation and grid ------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        # before: loaded; images / 0 gave NaN features ("Input X contains NaN")
        ({"image_std_": as_tuple(0.0, 0.5, 0.5)}, r"image_std_=\(0.0, 0.5, 0.5\)"),
        # before: loaded and scored with mirrored red values, silently
        ({"image_std_": as_tuple(-0.5, 0.5, 0.5)}, "image_std_.*positive"),
        ({"image_std_": as_tuple(INF, 0.5, 0.5)}, "image_std_"),
        ({"image_mean_": as_tuple(NAN, 0.5, 0.5)}, "image_mean_"),
        ({"image_mean_": as_tuple(0.5, 0.5)}, "image_mean_=.* 3 finite"),
        ({"image_mean_": "abc"}, "image_mean_"),
    ],
)
def test_normalisation_no_fit_makes_is_refused(saved, tmp_path, values, message):
    path = forge(saved, tmp_path / "n.skdfm", set_values(TRANSFORMER, **values))
    refused(path, message)


def test_an_input_size_the_grid_does_not_fit_is_refused(saved, tmp_path):
    # before: loaded; scoring raised "could not broadcast input array from shape
    # (4,3072) into shape (4,768)"
    def bigger_input(document, arrays):
        transformer = state(document, TRANSFORMER)
        transformer["input_size_"] = as_tuple(128, 128)
        transformer["input_size"] = 128
        transformer["feature_params_"]["__dict__"]["input_size"] = 128

    error = refused(forge(saved, tmp_path / "i.skdfm", bigger_input), "feature_shape_")
    assert "(48, 8, 8)" in str(error) and "input_size_=(128, 128)" in str(error)

    def tiny_input(document, arrays):
        bigger_input(document, arrays)
        transformer = state(document, TRANSFORMER)
        transformer["input_size_"] = as_tuple(2, 2)
        transformer["input_size"] = 2
        transformer["feature_params_"]["__dict__"]["input_size"] = 2

    refused(forge(saved, tmp_path / "t.skdfm", tiny_input), "feature_shape_.*no grid")


@pytest.mark.parametrize(
    "steps, outcome_before",
    [
        # before: loaded; scoring raised "X flattens a (4, 48, 4) feature grid ..."
        ((TRANSFORMER,), "raised at scoring"),
        # before: loaded and scored, maps laid out on the wrong grid
        ((TRANSFORMER, DETECTOR), "silent"),
        # before: loaded; scoring raised about the grid
        ((DETECTOR,), "raised at scoring"),
    ],
    ids=["transformer", "both", "detector"],
)
def test_a_scrambled_feature_shape_is_refused(saved, tmp_path, steps, outcome_before):
    def scramble(document, arrays):
        for step in steps:
            state(document, step)["feature_shape_"] = as_tuple(4, 48, 4)

    refused(forge(saved, tmp_path / "s.skdfm", scramble), r"\(4, 48, 4\)")


def test_a_detector_of_another_size_than_the_grid_is_refused(saved, tmp_path):
    def bigger_kernel(document, arrays):  # the transformer now makes 48 x 2 x 2
        transformer = state(document, TRANSFORMER)
        transformer["pooling_kernel_size"] = 4
        transformer["feature_params_"]["__dict__"]["pooling_kernel_size"] = 4
        transformer["feature_shape_"] = as_tuple(48, 2, 2)

    refused(forge(saved, tmp_path / "k.skdfm", bigger_kernel), "768 features")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"precision": "int8"}, "feature_params_"),
        ({"pooling_kernel_size": 0}, "feature_params_"),
        ({"whatever": 1}, "feature_params_"),
        ({"layer": "layer3"}, "layer='layer3'.* layer_ is 'layer2'"),
        ({"input_size": 32}, "input_size=.*input_size_ is"),
    ],
)
def test_recorded_feature_parameters_must_agree(saved, tmp_path, record, message):
    # before: loaded; the first two raised NotFittedError when transforming, the
    # unknown key an AttributeError, the others were kept, contradicting layer_
    def change(document, arrays):
        state(document, TRANSFORMER)["feature_params_"]["__dict__"].update(record)

    refused(forge(saved, tmp_path / "p.skdfm", change), message)


# -- the detector's threshold and scalars ----------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        # before: loaded; normalized_scores raised TypeError (str - str)
        ("ab", "score_range_='ab' is not a \\(min, max\\) pair"),
        # before: loaded; normalized_scores raised "too many values to unpack"
        (as_tuple(0.0, 1.0, 2.0), "score_range_=.*pair"),
        # before: loaded; normalized_scores returned 0.5-ish values, silently
        (as_tuple(NAN, 1.0), "score_range_=.*finite"),
        (as_tuple(5.0, 1.0), r"score_range_=\(5.0, 1.0\) is reversed"),
        (as_tuple(True, 1.0), "score_range_"),
    ],
    ids=["string", "3-tuple", "nan", "reversed", "bool"],
)
def test_a_score_range_no_fit_makes_is_refused(saved, tmp_path, value, message):
    path = forge(saved, tmp_path / "r.skdfm", set_values(DETECTOR, score_range_=value))
    refused(path, message)


def test_a_score_range_saved_as_a_list_loads_as_the_tuple(saved, tmp_path):
    path = forge(saved, tmp_path / "l.skdfm", set_values(DETECTOR, score_range_=[0, 1]))
    assert skdfm.load(path)[-1].score_range_ == (0.0, 1.0)


@pytest.mark.parametrize(
    "values, message",
    [
        # before: loaded; scoring raised NotFittedError about score_type 'bogus'
        ({"score_type_": "bogus"}, "score_type_='bogus' is not one of 'fre', 'nll'"),
        # before: loaded and reported as fitted
        ({"solver_": 3}, "solver_=3"),
        ({"n_samples_seen_": "x"}, "n_samples_seen_='x'"),
        ({"feature_names_in_": {"__strings__": ["a", "b"]}}, "feature_names_in_"),
        ({"offset_": INF}, "offset_=inf"),
        ({"pixel_threshold_": NAN, "pixel_threshold_method_": "f1"}, "pixel_thr"),
    ],
)
def test_detector_scalars_no_fit_makes_are_refused(saved, tmp_path, values, message):
    refused(forge(saved, tmp_path / "v.skdfm", set_values(DETECTOR, **values)), message)


# -- the Pipeline ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, step, message",
    [
        # before: loaded and scored (None ignored)
        (1, None, "step 'extra' is None"),
        # before: loaded; score_samples raised AttributeError: This 'Pipeline' has
        # no attribute 'score_samples'
        (2, None, "step 'extra' is None"),
        (2, "passthrough", "last step, 'extra', is not its DFMDetector"),
        (1, "something", "does not store"),
        (1, 3, "does not store"),
    ],
    ids=["None inside", "None last", "passthrough last", "a string", "an int"],
)
def test_steps_that_are_not_estimators_are_refused(
    saved, tmp_path, where, step, message
):
    def insert(document, arrays):
        document["model"]["steps"].insert(where, ["extra", step])

    refused(forge(saved, tmp_path / "p.skdfm", insert), message)


def test_a_none_step_is_refused_before_writing(fitted_pipeline, tmp_path):
    model = Pipeline(
        [*fitted_pipeline.steps[:1], ("nothing", None), *fitted_pipeline.steps[1:]]
    )
    with pytest.raises(ValueError, match="step 'nothing' is None"):
        skdfm.save(model, tmp_path / "none.skdfm")
    assert not (tmp_path / "none.skdfm").exists()


# -- the decompression-bomb guard ------------------------------------------------------


@pytest.mark.parametrize("limit", [None, 0, -5, 2**62, True, 1e6, "100"])
def test_a_file_never_turns_the_pixel_guard_off(saved, tmp_path, limit):
    # before: None and 2**62 loaded, and the loaded model decoded any image size
    path = forge(
        saved, tmp_path / "g.skdfm", set_values(TRANSFORMER, max_image_pixels=limit)
    )
    refused(path, "max_image_pixels=.*never turns the decompression-bomb guard off")


def test_a_file_may_carry_a_limit_within_bounds(saved, tmp_path):
    for value in (1000, MAX_FILE_IMAGE_PIXELS):
        path = forge(
            saved,
            tmp_path / "ok.skdfm",
            set_values(TRANSFORMER, max_image_pixels=value),
        )
        assert skdfm.load(path)[0].max_image_pixels == value


def test_saving_without_a_pixel_guard_saves_the_largest_a_file_holds(
    fitted_pipeline, tmp_path
):
    from sklearn.base import clone

    model = copy.deepcopy(fitted_pipeline)
    model[0].set_params(max_image_pixels=None)
    with pytest.warns(
        UserWarning, match="max_image_pixels=None is saved as 1,073,741,824"
    ):
        path = skdfm.save(model, tmp_path / "m.skdfm")
    loaded = skdfm.load(path)
    assert loaded[0].max_image_pixels == MAX_FILE_IMAGE_PIXELS == 2**30
    loaded[0].set_params(max_image_pixels=None)  # code may still turn it off
    assert clone(loaded[0]).max_image_pixels is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skdfm.save(fitted_pipeline, tmp_path / "default.skdfm")  # no warning
