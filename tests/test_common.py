"""scikit-learn's estimator checks, with no expected failures."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skdfm import DFMDetector


@parametrize_with_checks(
    [
        DFMDetector(),
        DFMDetector(device="cpu", score_type="nll"),
        DFMDetector(device="cpu", solver="gram"),
    ],
    xfail_strict=True,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
