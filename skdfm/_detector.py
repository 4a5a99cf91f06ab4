"""DFMDetector: Deep Feature Modeling's PCA head as a scikit-learn outlier detector."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._device import resolve_device
from ._gaussian import gaussian_variances, negative_log_likelihood
from ._pca import (
    _step,
    fit_pca,
    n_components_for_level,
    project,
    reconstruction_error,
    scatter_components,
)
from ._persistence import PersistenceMixin
from ._scatter import Scatter

__all__ = ["DFMDetector"]

_THRESHOLD_ATTRIBUTES = ("offset_", "threshold_method_", "score_range_")
#: Attributes that partial_fit invalidates and that are computed on first use.
_STREAM_DERIVED = (
    "mean_",
    "components_",
    "n_components_",
    "singular_values_",
    "explained_variance_",
    "explained_variance_ratio_",
    "n_samples_",
    "solver_",
    *_THRESHOLD_ATTRIBUTES,
)


def _as_host_array(X):
    """Torch tensors (any device, any float dtype) to numpy; other inputs unchanged."""
    if isinstance(X, torch.Tensor):
        X = X.detach()
        if X.is_floating_point() and X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        return X.cpu().numpy()
    return X


def _as_tensor(X: np.ndarray, device: torch.device) -> torch.Tensor:
    """Zero-copy on CPU (also for read-only arrays, which are never written)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable"
        )
        return torch.as_tensor(X, device=device)


class DFMDetector(PersistenceMixin, OutlierMixin, BaseEstimator):
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
    contamination : float in (0, 0.5], default=0.1
        Expected proportion of outliers in the training set: ``offset_`` is that
        percentile of the training scores, so ``predict`` flags that share of the
        training rows. See Notes for why in-sample scores are optimistic.
    solver : {"auto", "gram", "covariance"}, default="auto"
        Eigenproblem that finds the components. ``"gram"`` (N x N, chosen when
        ``n_samples <= n_features``) or ``"covariance"`` (D x D, otherwise; always
        used by ``partial_fit``). Both are float64-accurate; they differ only in
        cost.
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
    solver_ : str
        The eigenproblem used, ``"gram"`` or ``"covariance"``.
    device_ : str
        The device the maths runs on. A model loaded on a machine without that
        device moves to ``"cpu"`` with a :class:`~skdfm.DeviceWarning`.
    offset_ : float
        ``decision_function(X) == score_samples(X) - offset_``: the
        ``100 * contamination`` percentile of the training scores, until
        :func:`~skdfm.calibrate_threshold` replaces it.
    threshold_method_ : str
        How ``offset_`` was set: ``"contamination"`` (by ``fit``, or by
        :func:`~skdfm.calibrate_threshold` on held-out normal samples) or ``"f1"``.
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
    images. To calibrate honestly, score normal images that were not used for
    fitting (a held-out split) and take the threshold from those scores, e.g.
    ``np.percentile(det.score_samples(X_holdout), 1)``, or use a labelled validation
    set: :func:`~skdfm.calibrate_threshold` does either. Ranking metrics such as
    ROC AUC on ``score_samples`` are unaffected.

    The Gaussian of ``"nll"`` is centred at the training mean with the biased
    (``1/N``) covariance of the projected training rows, ``diag(s^2 / N)``;
    variances below ``1e-12`` of the largest are raised to it, so scores stay
    finite. anomalib centres its data twice and so measures distances from the
    origin instead.

    Components are found without a full SVD of the data: by an eigendecomposition
    of the N x N Gram matrix or of the D x D scatter matrix, whichever is smaller,
    in float64, computing every eigenvalue but only the k eigenvectors kept (on
    CPU: LAPACK tridiagonalisation in place, MRRR, blocked back-transformation).
    ``partial_fit`` accumulates the scatter matrix batch by batch (memory D x D
    float64, independent of the number of rows) and gives the same model.
    Scores are computed in float64 from ``||x - mean||^2 - ||(x - mean) V||^2``
    without forming the D-dimensional reconstruction.

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

    _parameter_constraints: dict = {
        "pca_level": [
            Interval(RealNotInt, 0, 1, closed="right"),
            Interval(Integral, 1, None, closed="left"),
        ],
        "score_type": [StrOptions({"fre", "nll"})],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "solver": [StrOptions({"auto", "gram", "covariance"})],
        "device": [str, torch.device],
    }

    def __init__(
        self,
        *,
        pca_level=0.97,
        score_type="fre",
        contamination=0.1,
        solver="auto",
        device="auto",
    ):
        self.pca_level = pca_level
        self.score_type = score_type
        self.contamination = contamination
        self.solver = solver
        self.device = device

    def _validate_features(self, X, *, reset: bool, min_samples=None):
        """Validated rows: a numpy array, or a float tensor left on its GPU."""
        min_samples = min_samples or (2 if reset else 1)
        if isinstance(X, torch.Tensor) and X.device.type != "cpu":
            return self._validate_device_tensor(X, reset, min_samples)
        return validate_data(
            self,
            _as_host_array(X),
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=min_samples,
        )

    def _validate_device_tensor(self, X, reset: bool, min_samples: int):
        """``validate_data``'s checks, done on the device: no copy to the host."""
        X = X.detach()
        if X.ndim != 2:
            raise ValueError(
                f"Expected a 2D array of feature rows, got a {X.ndim}D tensor of "
                f"shape {tuple(X.shape)}."
            )
        if X.is_complex():
            raise ValueError("Complex data not supported.")
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32 if X.is_floating_point() else torch.float64)
        n_samples, n_features = X.shape
        if n_samples < min_samples:
            raise ValueError(
                f"Found array with {n_samples} sample(s) (shape={tuple(X.shape)}) "
                f"while a minimum of {min_samples} is required."
            )
        if n_features == 0:
            raise ValueError(
                "Found array with 0 feature(s) while a minimum of 1 is required."
            )
        if not bool(torch.isfinite(X).all()):
            raise ValueError("Input X contains NaN or infinity.")
        if reset:
            self.n_features_in_ = n_features
            vars(self).pop("feature_names_in_", None)
        elif n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is "
                f"expecting {self.n_features_in_} features as input."
            )
        return X

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the mean, the principal components and the threshold.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Feature rows of normal (defect-free) samples.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        self._forget_fit()
        device = resolve_device(self.device)
        X = self._validate_features(X, reset=True)
        n_components = self._components_rule(*X.shape)
        Xt = _as_tensor(X, device)
        pca = fit_pca(Xt, n_components, solver=self.solver)
        self.device_ = str(device)
        self.solver_ = pca.solver
        self._set_components(
            pca.mean,
            pca.components,
            pca.singular_values,
            pca.total_sum_squares,
            X.shape[0],
        )
        if pca.training_projection is None:
            train_scores = self._score_samples(Xt)
        else:
            train_scores = self._score_projection(*pca.training_projection)
        self._set_contamination_threshold(train_scores, self.contamination)
        return self

    def _components_rule(self, n_samples: int, n_features: int):
        """``n_components(eigenvalues, total, rank_tol) -> k`` for ``_pca``; raises
        when an integer ``pca_level`` cannot be met."""
        max_components = min(
            n_samples - 1, n_features - (1 if self.score_type == "fre" else 0)
        )
        level = self.pca_level
        if isinstance(level, Integral) and level > max_components:
            raise ValueError(
                f"pca_level={level} components requested, but at most "
                f"{max_components} can be kept with n_samples={n_samples} and "
                f"n_features={n_features} (min(n_samples - 1, n_features"
                f"{' - 1' if self.score_type == 'fre' else ''}) for "
                f"score_type={self.score_type!r})."
            )

        def n_components(eigenvalues, total, rank_tol):
            if isinstance(level, Integral):
                return int(level)
            k = n_components_for_level(eigenvalues, total, float(level), rank_tol)
            return min(k, max_components)

        return n_components

    def _set_components(self, pca_mean, components, singular_values, total, n):
        singular_values = singular_values.cpu().numpy()
        self.mean_ = pca_mean.cpu().numpy()
        self.components_ = np.ascontiguousarray(components.T.cpu().numpy())
        self.n_components_ = self.components_.shape[0]
        self.singular_values_ = singular_values
        self.n_samples_ = n
        self.explained_variance_ = singular_values**2 / (n - 1)
        self.explained_variance_ratio_ = singular_values**2 / total

    def _set_threshold(self, offset: float, method: str, scores: np.ndarray):
        """Set ``offset_``, how it was chosen, and the range of ``scores`` it came
        from (the scale of ``normalized_scores``)."""
        self.offset_ = float(offset)
        self.threshold_method_ = method
        self.score_range_ = (float(scores.min()), float(scores.max()))

    def _set_contamination_threshold(self, scores: np.ndarray, contamination: float):
        """``offset_`` at the ``contamination`` quantile of ``scores`` (normal rows)."""
        offset = np.percentile(scores, 100.0 * contamination)
        self._set_threshold(offset, "contamination", scores)

    def _forget_fit(self):
        """Drop every fitted attribute and the streaming statistics."""
        for name in [k for k in vars(self) if k.endswith("_") or k == "_scatter"]:
            if not name.startswith("__"):
                delattr(self, name)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Merge a batch of rows into the running statistics (a streaming fit).

        Keeps the count, mean and centred scatter of all rows seen so far in
        float64 on ``device_`` (D x D, whatever the number of rows), merging each
        batch with Chan et al.'s pairwise update. The components are computed from
        them, with ``pca_level`` applied to the whole spectrum, when the detector is
        next used (or an attribute such as ``components_`` is read): the result
        equals ``fit`` on all the rows at once up to float64 rounding. The first
        call on an unfitted detector starts the fit. A detector fitted with
        ``fit``, by :func:`~skdfm.stream_fit` or loaded from a file has no
        statistics to continue from: ``partial_fit`` then starts a new fit from
        its batch, with a ``UserWarning`` saying so.

        ``offset_`` needs scores of normal rows, which a single pass cannot give:
        set it afterwards with :func:`~skdfm.calibrate_threshold` on normal rows
        (held out, or the training rows again), or use :func:`~skdfm.stream_fit`
        with ``threshold_batches``. Until then ``predict`` and
        ``decision_function`` raise ``NotFittedError``; ``score_samples`` works.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            A batch of feature rows of normal samples.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            The detector, with ``n_samples_seen_`` updated.
        """
        state = vars(self)
        first = "_scatter" not in state
        if first and "n_features_in_" in state:
            how = (
                "loaded from a file or fitted by stream_fit, which release the "
                "streaming statistics"
                if "n_samples_seen_" in state
                else "fitted with fit(), which keeps no streaming statistics"
            )
            warnings.warn(
                f"partial_fit cannot continue this DFMDetector: it was {how}. It "
                "starts a new streaming fit from this batch; the rows of the earlier "
                "fit are not part of it.",
                UserWarning,
                stacklevel=2,
            )
        if first:
            self._forget_fit()
        X = self._validate_features(X, reset=first, min_samples=1)
        if first:
            device = resolve_device(self.device)
            self.device_ = str(device)
            self._scatter = Scatter(X.shape[1], device)
        scatter = self._scatter
        Xt = _as_tensor(X, scatter.mean.device)
        scatter.update(Xt, chunk_rows=_step(X.shape[0], X.shape[1] * 8))
        for name in _STREAM_DERIVED:
            vars(self).pop(name, None)
        self.n_samples_seen_ = scatter.count
        return self

    def _finish_stream(self, release: bool = False):
        """Components from the streaming statistics (the end of ``partial_fit``);
        ``release`` drops the statistics afterwards (no further ``partial_fit``)."""
        scatter = self._scatter
        if scatter.count < 2:
            raise ValueError(
                f"partial_fit has seen {scatter.count} sample; at least 2 are needed "
                "to fit the components."
            )
        rule = self._components_rule(scatter.count, scatter.mean.shape[0])
        components, singular_values, total = scatter_components(scatter, rule)
        self.solver_ = "covariance"
        self._set_components(
            scatter.mean, components, singular_values, total, scatter.count
        )
        if release:
            del self._scatter

    def __getattr__(self, name):
        # Fitted attributes after partial_fit are computed on first use.
        state = vars(self)
        if name in _THRESHOLD_ATTRIBUTES and "n_samples_seen_" in state:
            raise NotFittedError(
                "This DFMDetector was fitted with partial_fit, which cannot set "
                "the threshold offset_ in one pass: set it with "
                "skdfm.calibrate_threshold(model, X_normal, "
                "method='contamination') on normal samples, or fit with "
                "skdfm.stream_fit(..., threshold_batches=...)."
            )
        if name in _STREAM_DERIVED and "_scatter" in state:
            self._finish_stream()
            return state[name]
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}"
        )

    def __getstate__(self):
        # The D x D statistics are not saved (2 GiB at D = 16384): finish the fit.
        if "_scatter" in vars(self) and "components_" not in vars(self):
            self._finish_stream()
        state = super().__getstate__()
        state.pop("_scatter", None)
        return state

    def _score_samples(self, Xt: torch.Tensor) -> np.ndarray:
        """Scores of a validated tensor on ``device_``; no validation."""
        device = Xt.device
        z, sq_norm = project(
            Xt,
            _as_tensor(self.mean_, device),
            _as_tensor(self.components_, device).T,
        )
        return self._score_projection(z, sq_norm)

    def _score_projection(self, z: torch.Tensor, sq_norm: torch.Tensor) -> np.ndarray:
        """``score_samples`` from the output of ``_pca.project``."""
        device = z.device
        if self.score_type == "fre":
            score = reconstruction_error(z, sq_norm)
        else:
            variances = gaussian_variances(
                _as_tensor(self.singular_values_, device), self.n_samples_
            )
            score = negative_log_likelihood(z, variances)
        return -score.cpu().numpy()

    def score_samples(self, X):
        """Opposite of the anomaly score: higher means more normal.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,), float64
            ``-FRE`` or ``-NLL`` of each row.
        """
        check_is_fitted(self)
        X = self._validate_features(X, reset=False)
        return self._score_samples(_as_tensor(X, torch.device(self.device_)))

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
        return self._labels(self.score_samples(X))

    def _labels(self, score_samples: np.ndarray) -> np.ndarray:
        """``predict`` from already computed ``score_samples``."""
        return np.where(score_samples - self.offset_ >= 0, 1, -1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
