"""scikit-learn's estimator checks on every public estimator.

DFMDetector passes them all, except with ``threshold_cv`` set the two that assert
the in-sample threshold (listed below). DeepFeatureTransformer takes images, and a
2-D array is not a batch of images (it is rejected as ambiguous), so the checks that
feed it tabular data cannot apply; each is listed with its reason and the image-based
test in tests/test_transformer.py (or tests/test_images.py) that checks the same
contract.
The 2-D input tag stays on: turning it off would skip every check and pass vacuously.
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skdfm import DeepFeatureTransformer, DFMDetector

_TABULAR = "fits on a 2-D array, which is not a batch of images"

IMAGE_REPLACEMENTS = {
    "check_fit_score_takes_y": "test_fit_returns_self_and_accepts_y",
    "check_estimators_overwrite_params": "test_fit_leaves_parameters_alone",
    "check_dont_overwrite_parameters": "test_fit_leaves_parameters_alone",
    "check_estimators_fit_returns_self": "test_fit_returns_self_and_accepts_y",
    "check_readonly_memmap_input": "test_read_only_memmap_input",
    "check_n_features_in_after_fitting": "test_wrong_ndim_and_channels_are_rejected",
    "check_positive_only_tag_during_fit": "test_negative_pixels_are_rejected",
    "check_estimators_dtypes": "test_input_kinds_give_equal_features",
    "check_dtype_object": "test_empty_and_object_inputs_are_rejected",
    "check_estimators_empty_data_messages": "test_empty_and_object_inputs_are_rejected",
    "check_pipeline_consistency": "test_pipeline_fits_and_scores_images",
    "check_estimators_nan_inf": "test_nan_inf_are_rejected",
    "check_estimators_pickle": "test_joblib_round_trip_of_a_pipeline",
    "check_estimators_pickle(readonly_memmap=True)": (
        "test_joblib_round_trip_of_a_pipeline"
    ),
    "check_f_contiguous_array_estimator": "test_fortran_ordered_input",
    "check_transformer_data_not_an_array": "test_input_kinds_give_equal_features",
    "check_transformer_general": "test_fit_transform_equals_fit_then_transform",
    "check_transformer_general(readonly_memmap=True)": "test_read_only_memmap_input",
    "check_methods_sample_order_invariance": "test_sample_order_and_batch_invariance",
    "check_methods_subset_invariance": "test_sample_order_and_batch_invariance",
    "check_fit2d_1sample": "test_single_image",
    "check_fit2d_1feature": "test_images_of_any_size_are_resized",
    "check_dict_unchanged": "test_transform_leaves_dict_unchanged",
    "check_fit_idempotent": "test_fit_idempotent",
    "check_fit_check_is_fitted": "test_not_fitted_error",
    "check_n_features_in": "test_not_fitted_error",
    "check_fit2d_predict1d": "test_wrong_ndim_and_channels_are_rejected",
}


_OUT_OF_SAMPLE = (
    "threshold_cv sets offset_ from cross-fitted scores on purpose, so the share "
    "of training rows flagged is not contamination (it is, about, for new rows); "
    "replaced by test_cross_fitted_threshold_holds_on_new_rows"
)


def expected_failed_checks(estimator):
    """The tabular checks that cannot apply to an image transformer, and the
    in-sample contract that an out-of-sample threshold breaks, with reasons."""
    if isinstance(estimator, DFMDetector):
        if estimator.threshold_cv is None:
            return {}
        return {
            "check_outliers_train": _OUT_OF_SAMPLE,
            "check_outliers_fit_predict": _OUT_OF_SAMPLE,
        }
    return {
        check: f"{_TABULAR}; replaced by {test}"
        for check, test in IMAGE_REPLACEMENTS.items()
    }


def test_every_replacement_test_exists():
    import tests.test_images
    import tests.test_transformer

    defined = set(dir(tests.test_transformer)) | set(dir(tests.test_images))
    assert set(IMAGE_REPLACEMENTS.values()) <= defined


@parametrize_with_checks(
    [
        DFMDetector(),
        DFMDetector(device="cpu", score_type="nll"),
        DFMDetector(device="cpu", solver="gram"),
        DFMDetector(device="cpu", threshold_cv=2),
        DeepFeatureTransformer(
            backbone="test_resnet",
            pretrained=False,
            input_size=64,
            pooling_kernel_size=2,
            device="cpu",
        ),
    ],
    expected_failed_checks=expected_failed_checks,
    xfail_strict=True,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
