"""DFMDetector: Deep Feature Modeling's PCA head as a scikit-learn outlier detector."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils import metadata_routing
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._core.device import DeviceMixin, as_tensor, check_has_data, resolve_device
from ._core.persistence import (
    OPTIONAL,
    FittedAttribute,
    PersistenceMixin,
    add_defaults,
    check_fitted,
    keep_state_on_error,
    names_set_by,
)
from ._core.validation import (
    a_string,
    as_host_array,
    check_contamination,
    check_device_rows,
    check_magnitude,
    check_pixel_threshold,
    check_real,
    check_threshold,
    check_threshold_cv,
    check_unchanged_since_fit,
    count_at_least,
    finite_float_array,
    finite_number,
    largest_magnitude,
    normal_rows,
    number_range,
    one_of,
    reject_bools,
    strings,
)
from ._imaging.features import (
    agreed_feature_shape,
    check_feature_shape,
    check_same_feature_shape,
    feature_shape_of,
    feature_shape_to_map,
)
from ._kernels.crossfit import cross_fitted_scores
from ._kernels.pca import ComponentRule, PCAFit, fit_pca, n_components_for_level
from ._kernels.scores import (
    IMAGE_SCORES,
    SCORE_TYPES,
    ScoringState,
    check_has_grid,
    check_image_score,
    gaussian_variances,
    max_components,
    score_projection,
    score_rows,
)
from ._kernels.statistics import FeatureStatistics, StreamingFit, StreamPhase

__all__ = ["DETECTOR_ATTRIBUTES", "DFMDetector", "check_contamination"]


def _feature_shape(name, value, sizes):
    return None if value is None else check_feature_shape(value, sizes["d"])


def _image_score(name, value, sizes):
    if (isinstance(value, str) and value in IMAGE_SCORES) or (
        isinstance(value, Integral) and not isinstance(value, bool) and value >= 1
    ):
        return value
    raise ValueError(f"{name}={value!r} is not an image score.")


def _component_rule(pca_level, score_type, n_samples, n_features) -> ComponentRule:
    """The :data:`~skdfm._kernels.pca.ComponentRule` of ``pca_level``; raises when
    an integer ``pca_level`` cannot be met."""
    most = max_components(n_samples, n_features, score_type)
    if isinstance(pca_level, Integral) and pca_level > most:
        raise ValueError(
            f"pca_level={pca_level} components requested, but at most {most} can "
            f"be kept with n_samples={n_samples} and n_features={n_features} "
            f"(min(n_samples - 1, n_features{' - 1' if score_type == 'fre' else ''}"
            f") for score_type={score_type!r})."
        )

    def n_components(eigenvalues, total, rank_tol):
        if isinstance(pca_level, Integral):
            return int(pca_level)
        k = n_components_for_level(eigenvalues, total, float(pca_level), rank_tol)
        return min(k, most)

    return n_components


def _rows_of(rows: torch.Tensor, mask) -> torch.Tensor:
    """The rows ``mask`` keeps (all when None)."""
    return rows if mask is None else rows[torch.as_tensor(mask, device=rows.device)]


def _to_host(scores: torch.Tensor) -> np.ndarray:
    return scores.cpu().numpy()


#: Every fitted attribute of a DFMDetector, one row each: what sets it
#: (``"input"``: the rows a fit starts from; ``"stream"``: partial_fit;
#: ``"components"``: the PCA, by fit or from the streaming statistics;
#: ``"threshold"``: set_threshold; ``"pixel threshold"``: set_pixel_threshold), how
#: loading checks it (``"d"`` and ``"k"`` are ``n_features_in_`` and
#: ``n_components_``, checked together first) and what pickles that predate it get.
#: Pickling, the streaming fit and the ``.skdfm`` allow-list read it; the class
#: docstring documents each row (a test holds the two equal).
DETECTOR_ATTRIBUTES = (
    FittedAttribute("n_features_in_", "input"),
    FittedAttribute("feature_names_in_", "input", strings("d"), default=OPTIONAL),
    FittedAttribute("feature_shape_", "input", _feature_shape, default=None),
    FittedAttribute("device_", "input"),
    FittedAttribute("n_samples_seen_", "stream", count_at_least(1)),
    FittedAttribute("mean_", "components", finite_float_array("d")),
    FittedAttribute("components_", "components", finite_float_array("k", "d")),
    FittedAttribute("n_components_", "components"),
    FittedAttribute(
        "singular_values_", "components", finite_float_array("k", minimum=0)
    ),
    FittedAttribute(
        "explained_variance_", "components", finite_float_array("k", minimum=0)
    ),
    FittedAttribute(  # shares of the total variance, up to rounding
        "explained_variance_ratio_",
        "components",
        finite_float_array("k", minimum=0, maximum=1 + 1e-6),
    ),
    FittedAttribute("n_samples_", "components", count_at_least(2)),
    FittedAttribute("solver_", "components", one_of("gram", "covariance")),
    # skdfm 0.1.0 scored with its score_type parameter
    FittedAttribute(
        "score_type_",
        "components",
        one_of(*SCORE_TYPES),
        default=lambda state: state["score_type"],
    ),
    FittedAttribute("image_score_", "components", _image_score, default="sum"),
    FittedAttribute("offset_", "threshold", finite_number()),
    FittedAttribute("threshold_method_", "threshold", a_string),
    FittedAttribute("score_range_", "threshold", number_range),
    FittedAttribute("pixel_threshold_", "pixel threshold", finite_number(0)),
    FittedAttribute("pixel_threshold_method_", "pixel threshold", a_string),
)
#: Computed from the statistics of partial_fit (by finish_partial_fit, but the
#: threshold, which needs a second pass).
_FROM_STATISTICS = names_set_by(DETECTOR_ATTRIBUTES, "components", "threshold")
_THRESHOLD = names_set_by(DETECTOR_ATTRIBUTES, "threshold")
#: What a new batch of partial_fit makes stale.
_STALE_AFTER_BATCH = (
    *_FROM_STATISTICS,
    *names_set_by(DETECTOR_ATTRIBUTES, "pixel threshold"),
)
_NO_STREAMED_THRESHOLD = (
    "This DFMDetector was fitted with partial_fit, which cannot set the threshold "
    "offset_ in one pass: set it with skdfm.calibrate_threshold(model, X_normal, "
    "method='contamination') on normal samples, or fit with "
    "skdfm.stream_fit(..., threshold_batches=...)."
)
_NOT_FINISHED = (
    "is computed from the statistics of partial_fit by finish_partial_fit(), which "
    "score_samples, decision_function, predict and anomaly_maps call; call "
    "det.finish_partial_fit() to read it now."
)


def _warn_new_stream(*, released: bool) -> None:
    """partial_fit cannot continue a fit that holds no statistics: say so."""
    how = (
        "loaded from a file or fitted by stream_fit, which release the streaming "
        "statistics"
        if released
        else "fitted with fit(), which keeps no streaming statistics"
    )
    warnings.warn(
        f"partial_fit cannot continue this DFMDetector: it was {how}. It starts a "
        "new streaming fit from this batch; the rows of the earlier fit are not "
        "part of it.",
        UserWarning,
        stacklevel=5,  # the caller of partial_fit
    )


#: Private, never pickled: the streaming fit (its statistics) and the fitted
#: subspace as tensors on ``device_`` (rebuilt on load and device moves).
_PRIVATE = ("_stream", "_scoring")


class DFMDetector(DeviceMixin, PersistenceMixin, OutlierMixin, BaseEstimator):
    """Deep Feature Modeling (DFM) outlier detector on a 2-D feature matrix.

    Fits the mean and a PCA of the training rows, keeping ``pca_level`` of the
    variance, and scores a row by its feature reconstruction error (``"fre"``) or its
    Gaussian negative log-likelihood in the principal subspace (``"nll"``). It is the
    head of anomalib's DFM model; rows usually come from
    ``DeepFeatureTransformer``, but any feature matrix works. All the maths runs in
    torch on ``device``.

    Parameters
    ----------
    pca_level : float in (0, 1] or int >= 1, default=0.97
        A float keeps the smallest number of components whose cumulative
        explained-variance ratio exceeds it, as scikit-learn's
        ``PCA(n_components=pca_level)`` does (anomalib keeps one component fewer:
        pass the integer it ends with to reproduce its numbers). ``1.0`` keeps the
        numerical rank. An integer keeps exactly that many components; it may not
        exceed ``min(n_samples - 1, n_features)`` (``n_features - 1`` for ``"fre"``).
    score_type : {"fre", "nll"}, default="fre"
        ``"fre"``: squared distance to the principal subspace,
        ``||x - mean_||^2 - ||(x - mean_) V||^2``. ``"nll"``: ``-2 log`` likelihood
        of the projection under the Gaussian of the projected training rows, without
        its constant ``k log(2 pi)``.
    image_score : {"sum", "max"} or int >= 1, default="sum"
        How an ``"fre"`` image score is read from the residual grid (the anomaly
        map on the feature grid, see :func:`~skdfm.anomaly_maps`). ``"sum"``: the
        whole FRE, anomalib's score. ``"max"``: the grid's largest cell, so a
        small defect is not diluted by every normal cell. An int k: the mean of
        the k largest cells. Anything but ``"sum"`` needs the grid
        (``feature_shape``, known by itself in a Pipeline) and ``"fre"``. See
        :doc:`/image_scores` for when it pays.
    feature_shape : tuple of (int, int, int), default=None
        ``(channels, rows, columns)`` of the feature map each row flattens (C
        order). None: taken at fit from ``X`` when it says (the output of
        :class:`~skdfm.DeepFeatureTransformer`, as a Pipeline passes it, or
        DataFrame columns named by its ``get_feature_names_out``); otherwise
        unknown. Set it only for feature rows from elsewhere.
    contamination : float in (0, 0.5], default=0.1
        Expected proportion of outliers in the training set: ``offset_`` is that
        percentile of the training scores, so ``predict`` flags that share of the
        training rows. See Notes for why in-sample scores are optimistic.
    threshold_cv : int >= 2 or None, default=None
        How ``fit`` scores the training rows for ``offset_``. None: with the
        model fitted on them (scikit-learn's in-sample rule; it flags far more
        than ``contamination`` of new normal rows, see Notes). An int k: by
        cross-fitting, each row scored by a model fitted on the other k - 1 folds
        (rows ``i, i + k, i + 2k, ...`` form fold ``i``) with as many components
        as the fitted model, so the threshold flags close to ``contamination`` of
        new normal rows (on the demo set, 6.8-10.9 % at 0.1 and 1.8-2.7 % at 0.01
        for 5-20 folds, against 100 % in-sample; see the thresholds guide). Used
        by ``fit`` only: ``partial_fit`` and the streaming and distributed fits
        take their threshold from a second pass. The components are still
        fitted on every row; no extra images and no second backbone pass are
        needed, only k more eigenproblems of (k - 1) / k of the rows.
        ``threshold_method_`` records which was used.
    solver : {"auto", "gram", "covariance"}, default="auto"
        Eigenproblem that finds the components. ``"gram"`` (N x N, chosen when
        ``n_samples <= n_features``) or ``"covariance"`` (D x D, otherwise).
        Both are float64-accurate; they differ only in cost. ``partial_fit``
        picks by the rows it has seen, whatever ``solver`` says.
    device : str or torch.device, default="auto"
        Where the maths runs: ``"auto"`` (the current CUDA device when available,
        else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Resolved at fit into
        ``device_``.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,)
        Per-feature mean of the training rows (float64).
    components_ : ndarray of shape (n_components, n_features)
        Orthonormal principal axes, by decreasing explained variance (float64).
    n_components_ : int
        Number of components kept.
    explained_variance_ : ndarray of shape (n_components,)
        Variance of the training rows along each component (``ddof=1``, as PCA).
    explained_variance_ratio_ : ndarray of shape (n_components,)
        Share of the total variance along each component; its sum is the variance
        kept.
    singular_values_ : ndarray of shape (n_components,)
        Singular values of the centred training matrix.
    n_samples_ : int
        Number of training rows.
    n_samples_seen_ : int
        Number of rows a streaming fit (``partial_fit``, :func:`~skdfm.stream_fit`,
        ``fit_from_statistics``) has seen; absent after ``fit``.
    solver_ : str
        The eigenproblem used, ``"gram"`` or ``"covariance"``.
    score_type_ : str
        The ``score_type`` the detector was fitted with, and scores with; setting
        another ``score_type`` afterwards makes scoring raise ``NotFittedError``
        until the next fit (``offset_`` was taken from the fitted score).
    image_score_ : str or int
        The ``image_score`` it was fitted with (the same rule as ``score_type_``).
    feature_shape_ : tuple of (int, int, int) or None
        The grid the rows flatten, from ``feature_shape`` or from ``X``; None when
        not known (then only ``image_score="sum"`` works).
    device_ : str
        The device the maths runs on. A model loaded on a machine without that
        device moves to ``"cpu"`` with a :class:`~skdfm.DeviceWarning`.
    offset_ : float
        ``decision_function(X) == score_samples(X) - offset_``: the
        ``100 * contamination`` percentile of the training scores, until
        :func:`~skdfm.calibrate_threshold` replaces it.
    threshold_method_ : str
        How ``offset_`` was set: ``"contamination"`` (by ``fit`` on in-sample
        scores, or by :func:`~skdfm.calibrate_threshold` on held-out normal
        samples), ``"contamination, k-fold cross-fit"`` (``fit`` with
        ``threshold_cv=k``) or ``"f1"``.
    pixel_threshold_ : float
        Anomaly-map value at or above which a pixel is predicted defective; set
        by :func:`~skdfm.calibrate_pixel_threshold` (and by ``skdfm fit``), absent
        until then.
    pixel_threshold_method_ : str
        How ``pixel_threshold_`` was chosen: ``"contamination"`` (a quantile of
        normal images' map values) or ``"f1"`` (F1-adaptive on masks).
    score_range_ : tuple of (float, float)
        ``(min, max)`` of the scores ``offset_`` was taken from; the scale of
        :func:`~skdfm.normalized_scores`.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in,)
        Names of features seen during fit, when X has string column names.

    See Also
    --------
    sklearn.decomposition.PCA : Same components, without a score.
    sklearn.covariance.EllipticEnvelope : Gaussian outlier detector on raw features.
    sklearn.ensemble.IsolationForest : Tree-based outlier detector.

    Notes
    -----
    DFM [1]_ models deep features of normal images with a PCA; the
    feature-reconstruction-error score is that of [2]_. For ``"fre"`` at most
    ``n_features - 1`` components are kept, even when the level asks for all of
    them: with every axis kept the reconstruction is the identity and every score
    would be zero.

    **In-sample scores are optimistic.** The components are fitted to the training
    rows, so a training row's FRE is smaller than that of a new normal row from the
    same distribution; the gap is large when ``n_samples`` is not much larger than
    ``n_components_`` (with ``n_samples <= n_components_ + 1`` the training FRE is
    zero). The default ``offset_`` is taken from in-sample scores, as scikit-learn's
    detectors do, and then flags far more than ``contamination`` of new normal
    images. ``threshold_cv=5`` takes it from cross-fitted scores instead (each
    training row scored by a model that did not see it), with no extra images.
    Or score normal images that were not used for fitting (a held-out split) and
    take the threshold from those scores, or use a labelled validation set:
    :func:`~skdfm.calibrate_threshold` does either. Ranking metrics such as ROC AUC
    on ``score_samples`` are unaffected.

    The Gaussian of ``"nll"`` is centred at the training mean with the biased
    (``1/N``) covariance of the projected training rows, ``diag(s^2 / N)``;
    variances below ``1e-12`` of the largest are raised to it, so scores stay
    finite. anomalib centres its data twice and so measures distances from the
    origin instead.

    Components are found without a full SVD: an eigendecomposition of the N x N
    Gram or the D x D scatter matrix, whichever is smaller, in float64, with only
    the k kept eigenvectors computed; ``partial_fit`` chooses the same route by the
    rows it has seen. Scores come from ``||x - mean||^2 - ||(x - mean) V||^2``
    without forming the reconstruction. The routes and their costs are measured in
    the user guide's performance page.

    **Image scores from where the defect is.** With ``image_score="max"`` the
    score of an image is its anomaly map's largest cell on the feature grid, not
    the map's sum (the FRE). Every threshold, :func:`~skdfm.anomaly_maps` and the
    metrics then use that score. The default stays ``"sum"``, so scores equal
    anomalib's.

    References
    ----------
    .. [1] Ahuja, N. A. et al., "Probabilistic Modeling of Deep Features for
       Out-of-Distribution and Adversarial Detection", arXiv:1909.11786, 2019.
    .. [2] Ndiour, I. et al., "FRE: A Fast Method For Anomaly Detection And
       Segmentation", arXiv:2203.10422, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DFMDetector
    >>> rng = np.random.default_rng(0)
    >>> basis = rng.normal(size=(5, 40))
    >>> X = rng.normal(size=(200, 5)) @ basis + 0.01 * rng.normal(size=(200, 40))
    >>> det = DFMDetector(pca_level=0.99, device="cpu").fit(X)
    >>> det.n_components_
    5
    >>> normal = rng.normal(size=(1, 5)) @ basis
    >>> defect = normal + rng.normal(size=(1, 40))
    >>> det.predict(np.vstack([normal, defect]))
    array([ 1, -1])
    """

    # ``restart`` is an option of partial_fit, not metadata to route.
    __metadata_request__partial_fit = {"restart": metadata_routing.UNUSED}

    _parameter_constraints: dict = {
        "pca_level": [
            # Real, not RealNotInt: numpy floats (np.float32(0.9)) are levels too;
            # an int is a component count whichever interval it satisfies.
            Interval(Real, 0, 1, closed="right"),
            Interval(Integral, 1, None, closed="left"),
        ],
        "score_type": [StrOptions(set(SCORE_TYPES))],
        "image_score": [
            StrOptions(set(IMAGE_SCORES)),
            Interval(Integral, 1, None, closed="left"),
        ],
        "feature_shape": [tuple, list, None],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "threshold_cv": [Interval(Integral, 2, None, closed="left"), None],
        "solver": [StrOptions({"auto", "gram", "covariance"})],
        "device": [str, torch.device],
    }

    #: The streaming fit: its phase and statistics (never pickled).
    _stream = StreamingFit()

    def __init__(
        self,
        *,
        pca_level=0.97,
        score_type="fre",
        image_score="sum",
        feature_shape=None,
        contamination=0.1,
        threshold_cv=None,
        solver="auto",
        device="auto",
    ):
        self.pca_level = pca_level
        self.score_type = score_type
        self.image_score = image_score
        self.feature_shape = feature_shape
        self.contamination = contamination
        self.threshold_cv = threshold_cv
        self.solver = solver
        self.device = device

    # -- validation ------------------------------------------------------------------

    def _validate_params(self):
        reject_bools(
            self, ("pca_level", "contamination", "image_score", "threshold_cv")
        )
        super()._validate_params()

    def _set_feature_shape(self, carried, n_features: int) -> None:
        """``feature_shape_`` from the grid the rows say (``carried``, or None) and
        the ``feature_shape`` parameter, checked against ``image_score``."""
        shape = agreed_feature_shape(carried, self.feature_shape, n_features)
        check_image_score(self.image_score, self.score_type, shape)
        self.feature_shape_ = shape

    def _validate_features(self, X, *, reset: bool, min_samples=None):
        """Validated rows: a numpy array, or a float tensor left on its GPU."""
        min_samples = min_samples or (2 if reset else 1)
        check_has_data(X)
        if isinstance(X, torch.Tensor) and X.device.type != "cpu":
            X = check_device_rows(
                X, min_samples, None if reset else self.n_features_in_
            )
            if reset:  # what validate_data records
                self.n_features_in_ = X.shape[1]
                vars(self).pop("feature_names_in_", None)
        else:
            X = as_host_array(X)
            check_real(X)
            X = validate_data(
                self,
                X,
                reset=reset,
                dtype=[np.float64, np.float32],
                ensure_min_samples=min_samples,
            )
        check_magnitude(largest_magnitude(X), fitting=reset)
        return X

    def _carried_shape(self, X, valid):
        """The grid ``X`` says its rows flatten (an attribute, or column names)."""
        names = vars(self).get("feature_names_in_")
        return feature_shape_of(X, valid.shape[1], names)

    # -- fitting ---------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the mean, the principal components and the threshold.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Feature rows of normal (defect-free) samples.
        y : array-like of shape (n_samples,) or (n_samples, H, W), default=None
            Rows labelled -1 (scikit-learn's outliers; 1 is normal), or whose
            pixel mask has a defect, are left out of the fit with an
            ``OutlierLabelWarning`` counting them, so that
            ``GridSearchCV(refit=True)`` with :class:`~skdfm.InlierKFold` refits
            on the normal images only. Labels holding -1 must hold only 1 and
            -1, and leave 2 normal rows. A ``y`` without -1 is ignored (as
            scikit-learn's detectors ignore ``y``); 0/1 labels with a warning.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        from ._tools.fitting import ThresholdRequest, fit_then_threshold

        rows = pca = None

        def fit_components():
            nonlocal rows, pca
            self._forget_fit()
            device = resolve_device(self.device)
            valid = self._validate_features(X, reset=True)
            self._set_feature_shape(self._carried_shape(X, valid), valid.shape[1])
            mask = normal_rows(y, len(valid))
            rows = _rows_of(as_tensor(valid, device), mask)
            pca = fit_pca(
                rows,
                _component_rule(self.pca_level, self.score_type, *rows.shape),
                solver=self.solver,
            )
            self.device_ = str(device)
            self._set_components(pca, rows.shape[0])

        def threshold_scores():
            if self.threshold_cv is None:
                return self._training_scores(rows, pca)
            check_threshold_cv(self.threshold_cv, rows.shape[0])
            scores = cross_fitted_scores(
                rows,
                self.threshold_cv,
                self.n_components_,
                self.score_type,
                solver=self.solver,
                feature_shape=self.feature_shape_,
                image_score=self.image_score,
            )
            return -_to_host(scores)

        cv = self.threshold_cv
        return fit_then_threshold(
            self,
            fit_components,
            threshold_scores,
            ThresholdRequest(self.contamination),
            method=None if cv is None else f"contamination, {cv}-fold cross-fit",
            warn_few=False,
        )

    def _training_scores(self, rows: torch.Tensor, pca: PCAFit) -> np.ndarray:
        """``score_samples`` of the training rows by this fit's model (free from
        the Gram route's projection when the image score is the sum)."""
        if pca.training_projection is None or self.image_score_ != "sum":
            return self._scores(rows)[0]
        z, sq_norm = pca.training_projection
        return -_to_host(score_projection(z, sq_norm, self._scoring, self.score_type))

    def _set_components(self, pca: PCAFit, n: int) -> None:
        """Fitted attributes (numpy, pickled) and the scoring tensors (on device_,
        not pickled) from one PCA fit; they share memory on CPU."""
        singular_values = pca.singular_values.cpu().numpy()
        self.solver_ = pca.solver
        self.score_type_ = self.score_type
        self.image_score_ = self.image_score
        self.mean_ = pca.mean.cpu().numpy()
        self.components_ = np.ascontiguousarray(pca.components.T.cpu().numpy())
        self.n_components_ = self.components_.shape[0]
        self.singular_values_ = singular_values
        self.n_samples_ = n
        self.explained_variance_ = singular_values**2 / (n - 1)
        self.explained_variance_ratio_ = singular_values**2 / pca.total_sum_squares
        self._scoring = ScoringState(
            pca.mean,
            pca.components,
            gaussian_variances(pca.singular_values, n),
            source=(self.mean_, self.components_, self.singular_values_),
        )

    def _build_scoring(self, device: torch.device) -> None:
        """The scoring tensors from the fitted arrays (after loading or moving)."""
        self._scoring = ScoringState.from_arrays(
            self.mean_,
            self.components_,
            self.singular_values_,
            self.n_samples_,
            device,
        )

    def _forget_fit(self):
        """Drop every fitted attribute, the scoring tensors and the streaming fit."""
        for name in [k for k in vars(self) if k.endswith("_") or k in _PRIVATE]:
            if not name.startswith("__"):
                delattr(self, name)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, *, restart=False):
        """Merge a batch of rows into the running statistics (a streaming fit).

        Keeps what the cheaper exact route needs, chosen by the rows seen so far,
        on ``device_``: while they are no more than the features (few images with
        long rows, the usual DFM case), a copy of the rows, fitted at the end by
        the Gram route as ``fit`` fits them; once they outnumber the features,
        their count, mean and centred scatter in float64 (D x D, whatever the
        number of rows), merging each batch with Chan et al.'s pairwise update.
        The components are computed from
        them, with ``pca_level`` applied to the whole spectrum, by
        :meth:`finish_partial_fit`, which ``score_samples``, ``decision_function``,
        ``predict``, :func:`~skdfm.anomaly_maps` and pickling call when the
        statistics have changed since: the result equals ``fit`` on all the rows
        at once up to float64 rounding. Until then the fitted attributes derived
        from the statistics (``components_``, ``mean_``, ...) are absent.

        The first call on an unfitted detector (or with ``restart=True``) starts
        the fit. A detector fitted with ``fit``, by :func:`~skdfm.stream_fit` or
        loaded from a file has no statistics to continue from: ``partial_fit``
        then starts a new fit from its batch, with a ``UserWarning`` saying so.

        ``offset_`` needs scores of normal rows, which a single pass cannot give:
        set it afterwards with :func:`~skdfm.calibrate_threshold` on normal rows
        (held out, or the training rows again), or use :func:`~skdfm.stream_fit`
        with ``threshold_batches``. Until then ``predict`` and
        ``decision_function`` raise ``NotFittedError``; ``score_samples`` works.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            A batch of feature rows of normal samples.
        y : array-like of shape (n_samples,) or (n_samples, H, W), default=None
            As in :meth:`fit`: rows labelled -1 are left out (one must remain).
        restart : bool, default=False
            Drop whatever was fitted before and start a new streaming fit from
            this batch, without a warning.

        Returns
        -------
        self : object
            The detector, with ``n_samples_seen_`` updated.
        """
        with keep_state_on_error(self):  # a refused batch keeps what was fitted
            return self._partial_fit(X, y, restart)

    def _partial_fit(self, X, y, restart: bool):
        statistics = self._stream.statistics
        first = restart or statistics is None
        if first and not restart and "n_features_in_" in vars(self):
            _warn_new_stream(released=self._stream.phase is StreamPhase.RELEASED)
        if first:
            self._forget_fit()
        rows = self._validate_features(X, reset=first, min_samples=1)
        if first:
            self._set_feature_shape(self._carried_shape(X, rows), rows.shape[1])
            device = resolve_device(self.device)
            self.device_ = str(device)
            statistics = FeatureStatistics(rows.shape[1], device)
        else:
            check_same_feature_shape(X, self.feature_shape_)
        mask = normal_rows(y, len(rows), min_normal=1)
        statistics.update(_rows_of(as_tensor(rows, statistics.device), mask))
        for name in (*_STALE_AFTER_BATCH, "_scoring"):
            vars(self).pop(name, None)
        self._stream = StreamingFit(StreamPhase.GATHERING, statistics)
        self.n_samples_seen_ = statistics.count
        return self

    def finish_partial_fit(self, *, release=False):
        """Compute the components from the statistics of :meth:`partial_fit`.

        The explicit end of a streaming fit: sets ``components_``, ``mean_``,
        ``n_components_``, the variances and ``solver_`` (``"gram"`` while the
        rows seen are no more than the features, else ``"covariance"``). The
        methods that need them call it for you; call it yourself to read those
        attributes, or with ``release=True`` to free the statistics once the
        last batch is in (no further ``partial_fit`` can then continue the fit).
        Calling it again without new batches recomputes nothing.

        Parameters
        ----------
        release : bool, default=False
            Drop the statistics afterwards.

        Returns
        -------
        self : object
            The detector, its components set.
        """
        stream = self._stream
        if stream.phase is StreamPhase.RELEASED:
            return self
        statistics = stream.statistics
        if statistics is None:
            raise NotFittedError(
                "finish_partial_fit needs the statistics of partial_fit; this "
                "DFMDetector has none (it is unfitted, or was fitted with fit)."
            )
        if stream.phase is StreamPhase.GATHERING:
            check_image_score(self.image_score, self.score_type, self.feature_shape_)
            rule = _component_rule(
                self.pca_level, self.score_type, statistics.count, statistics.n_features
            )
            self._set_components(statistics.fit(rule), statistics.count)
        self._stream = (
            StreamingFit(StreamPhase.RELEASED)
            if release
            else StreamingFit(StreamPhase.FINISHED, statistics)
        )
        return self

    def streaming_statistics(self) -> FeatureStatistics:
        """Hand over the statistics :meth:`partial_fit` has gathered.

        What a worker of a distributed fit (:mod:`skdfm.distributed`) sends back
        after its ``partial_fit`` calls: exact, mergeable statistics of its rows
        (:class:`~skdfm._kernels.statistics.FeatureStatistics`), their grid set from
        ``feature_shape_``. The detector gives them up and is left unfitted, so
        that no two owners change one set of statistics. Merge several and fit one
        detector from them with :meth:`fit_from_statistics`.

        Returns
        -------
        statistics : FeatureStatistics
        """
        statistics = self._stream.statistics
        if statistics is None:
            raise NotFittedError(
                "This DFMDetector holds no streaming statistics: call partial_fit "
                "first (fit, and a finished stream_fit, keep none)."
            )
        statistics.feature_shape = self.feature_shape_
        self._forget_fit()
        return statistics

    def fit_from_statistics(self, statistics: FeatureStatistics):
        """Fit from statistics gathered elsewhere, as one streaming fit.

        Equal to :meth:`partial_fit` on every row ``statistics`` hold, then
        ``finish_partial_fit(release=True)``: the components, variances and
        ``n_samples_seen_`` are set, ``offset_`` is not (see :meth:`partial_fit`).
        The statistics are moved to this detector's device and consumed (use them
        no more). A failure keeps the detector as it was.

        Parameters
        ----------
        statistics : FeatureStatistics
            From :meth:`streaming_statistics` of other detectors, merged.

        Returns
        -------
        self : object
            The fitted detector.
        """
        self._validate_params()
        with keep_state_on_error(self):
            self._forget_fit()
            n_features = statistics.n_features
            self.n_features_in_ = n_features
            self._set_feature_shape(statistics.feature_shape, n_features)
            device = resolve_device(self.device)
            self.device_ = str(device)
            statistics = statistics.to(device)
            self._stream = StreamingFit(StreamPhase.GATHERING, statistics)
            self.n_samples_seen_ = statistics.count
            self.finish_partial_fit(release=True)
        return self

    def _finish_pending_stream(self) -> None:
        """Compute the components when ``partial_fit`` has changed the statistics."""
        if self._stream.phase is StreamPhase.GATHERING:
            self.finish_partial_fit()

    def __getattr__(self, name):
        # Only reached for missing attributes: explain the ones a streaming fit
        # has not set yet. Nothing is computed here.
        stream = self._stream
        if name in _THRESHOLD and stream.phase is not StreamPhase.NONE:
            raise NotFittedError(_NO_STREAMED_THRESHOLD)
        if name in _FROM_STATISTICS and stream.statistics is not None:
            raise AttributeError(f"{name} {_NOT_FINISHED}")
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}"
        )

    # -- persistence and devices -----------------------------------------------------

    def __getstate__(self):
        # The D x D statistics are not saved (2 GiB at D = 16384): finish the fit.
        # The scoring tensors are rebuilt on load, on the device the model loads on.
        self._finish_pending_stream()
        state = super().__getstate__()
        for name in _PRIVATE:
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        state.setdefault("image_score", "sum")  # saved before image_score
        state.setdefault("feature_shape", None)
        state.setdefault("threshold_cv", None)  # saved before threshold_cv
        add_defaults(DETECTOR_ATTRIBUTES, state)
        super().__setstate__(state)
        if "n_samples_seen_" in state:  # streamed: the statistics were released
            self._stream = StreamingFit(StreamPhase.RELEASED)
        if "components_" in state:
            self._build_scoring(self._fitted_device)

    def _check_state(self) -> None:
        super()._check_state()
        fitted = vars(self)
        if "components_" not in fitted:
            return
        d, k = self.n_features_in_, self.n_components_
        if not (
            isinstance(d, Integral) and isinstance(k, Integral) and 0 <= k <= d >= 1
        ):
            raise ValueError(f"n_features_in_={d!r} and n_components_={k!r} clash.")
        check_fitted(DETECTOR_ATTRIBUTES, fitted, {"d": d, "k": k})
        check_image_score(self.image_score_, self.score_type_, self.feature_shape_)

    def _move_fitted_state(self, device: torch.device) -> None:
        if "components_" in vars(self):
            self._build_scoring(device)
        if self._stream.statistics is not None:
            self._stream.statistics.to(device)

    # -- scoring ---------------------------------------------------------------------

    def _current_scoring(self) -> ScoringState:
        """The fitted subspace on ``device_``; rebuilt only if the fitted arrays were
        replaced since it was built (``det.mean_ = ...``)."""
        scoring = self._scoring
        fitted = (self.mean_, self.components_, self.singular_values_)
        if any(a is not b for a, b in zip(scoring.source, fitted, strict=True)):
            self._build_scoring(scoring.device)
            scoring = self._scoring
        return scoring

    def _scores(self, X, feature_shape=None):
        """``(score_samples, grid)`` of validated rows; no validation. The residual
        grid is returned when ``feature_shape`` is given."""
        scoring = self._current_scoring()
        scores, grid = score_rows(
            as_tensor(X, scoring.device),
            scoring,
            self.score_type_,
            feature_shape=feature_shape or self.feature_shape_,
            image_score=self.image_score_,
            return_grid=feature_shape is not None,
        )
        return -_to_host(scores), grid

    def score_samples(self, X):
        """Opposite of the anomaly score: higher means more normal.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,), float64
            ``-FRE`` or ``-NLL`` of each row; with ``image_score="max"`` (or k),
            minus the largest cell (or the mean of the k largest) of its residual
            grid.
        """
        check_is_fitted(self)
        self._finish_pending_stream()
        check_unchanged_since_fit(self)
        check_same_feature_shape(X, self.feature_shape_)
        X = self._validate_features(X, reset=False)
        return self._scores(X)[0]

    def score_samples_with_grid(self, X, feature_shape=None):
        """``score_samples`` and the FRE's residual grid of each row, in one pass.

        The interface :func:`~skdfm.anomaly_maps` builds its maps from: each
        chunk of rows is centred and projected once, and both the score and the
        grid come from it.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        feature_shape : tuple of (int, int, int), default=None
            ``(channels, rows, columns)`` of the feature map each row flattens (C
            order), e.g. ``DeepFeatureTransformer.feature_shape_``; None: the
            fitted ``feature_shape_``.

        Returns
        -------
        score_samples : ndarray of shape (n_samples,), float64
            Equal to ``score_samples(X)``.
        grid : torch.Tensor of shape (n_samples, rows, columns), float64
            On ``device_``: the squared residual summed over channels; each grid
            sums to the row's FRE (which is ``-score_samples`` for
            ``image_score="sum"``).
        """
        check_is_fitted(self)
        self._finish_pending_stream()
        check_unchanged_since_fit(self)
        check_has_grid(self.score_type_)
        check_same_feature_shape(X, self.feature_shape_)
        X = self._validate_features(X, reset=False)
        shape = feature_shape_to_map(feature_shape, self.feature_shape_, X.shape[1])
        return self._scores(X, shape)

    def set_threshold(self, scores, *, contamination=None, offset=None, method=None):
        """Set the decision threshold ``offset_`` from scores of samples (in place).

        The one place ``offset_``, ``threshold_method_`` and ``score_range_`` are
        set: by ``fit`` (training scores), :func:`~skdfm.stream_fit` and
        :func:`~skdfm.calibrate_threshold` (held-out scores).

        Parameters
        ----------
        scores : array-like of shape (n_samples,)
            ``score_samples`` of the samples the threshold is taken from; their
            ``(min, max)`` becomes ``score_range_``, the scale of
            :func:`~skdfm.normalized_scores`.
        contamination : float in (0, 0.5], default=None
            ``offset_`` is this quantile of ``scores`` (normal samples), so that
            share of them is flagged; ``threshold_method_`` becomes
            ``"contamination"``.
        offset : float, default=None
            Use this ``offset_`` instead (chosen by ``method``, e.g. ``"f1"``).
            Exactly one of ``contamination`` and ``offset`` is given.
        method : str, default=None
            How ``offset`` was chosen, recorded as ``threshold_method_``; required
            with ``offset``.

        Returns
        -------
        self : object
            The detector, its threshold replaced.
        """
        check_is_fitted(self)
        scores, offset, method = check_threshold(scores, contamination, offset, method)
        self.offset_ = offset
        self.threshold_method_ = method
        self.score_range_ = (float(scores.min()), float(scores.max()))
        return self

    def set_pixel_threshold(self, threshold, *, method):
        """Set the anomaly-map threshold ``pixel_threshold_`` (in place).

        Map pixels at or above it are predicted defective: the ``masks`` of
        :func:`~skdfm.anomaly_maps`, and the middle of the colour scale of the
        command's overlays. :func:`~skdfm.calibrate_pixel_threshold` chooses it.

        Parameters
        ----------
        threshold : float >= 0
            In anomaly-map units (higher = more anomalous).
        method : str
            How it was chosen, recorded as ``pixel_threshold_method_``.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        if self.score_type_ != "fre":
            raise ValueError(
                "A pixel threshold needs score_type 'fre' (nll has no maps)."
            )
        self.pixel_threshold_ = check_pixel_threshold(threshold, method)
        self.pixel_threshold_method_ = method
        return self

    def decision_function(self, X):
        """Shifted scores: negative for outliers, ``score_samples(X) - offset_``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        decision : ndarray of shape (n_samples,), float64
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label each row: +1 for an inlier, -1 for an outlier.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,), int
            ``1`` where ``decision_function(X) >= 0``, else ``-1``.
        """
        return self.labels_from_scores(self.score_samples(X))

    def labels_from_scores(self, score_samples):
        """``predict`` from already computed ``score_samples`` (no second pass).

        Parameters
        ----------
        score_samples : array-like of shape (n_samples,)

        Returns
        -------
        labels : ndarray of shape (n_samples,), int
            ``1`` where ``score_samples - offset_ >= 0``, else ``-1``.
        """
        offset = self.offset_
        return np.where(np.asarray(score_samples) - offset >= 0, 1, -1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
