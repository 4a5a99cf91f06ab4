"""Quick start: fit DFMDetector on feature rows of normal parts, score new ones.

The rows stand in for pooled CNN features of images (``DeepFeatureTransformer``
makes them from real images): normal parts vary along a few hundred directions, and
a defect adds energy outside them. Runs on a CPU in a few seconds::

    python examples/quickstart.py
"""

import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.metrics import roc_auc_score

from skdfm import DFMDetector


def make_parts(n_normal, n_defect, n_features=4096, rank=300, seed=0):
    """Feature rows of normal parts (low-rank, ReLU) and of defective ones."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(rank, n_features)) / np.sqrt(rank)
    scale = np.arange(1, rank + 1) ** -0.5

    def parts(n):
        return np.maximum(rng.normal(size=(n, rank)) * scale @ mixing + 0.05, 0)

    normal = parts(n_normal)
    defect = parts(n_defect)
    # a defect: extra activation on a few hundred features, as a local flaw gives
    hit = rng.choice(n_features, size=(n_defect, 200))
    defect[np.arange(n_defect)[:, None], hit] += rng.uniform(0.2, 0.6, (n_defect, 200))
    return normal.astype(np.float32), defect.astype(np.float32)


def main():
    train, _ = make_parts(800, 0, seed=0)
    holdout, _ = make_parts(200, 0, seed=1)
    test_normal, test_defect = make_parts(100, 100, seed=2)

    start = time.perf_counter()
    detector = DFMDetector(pca_level=0.97).fit(train)
    seconds = time.perf_counter() - start
    print(
        f"fitted on {train.shape[0]} x {train.shape[1]} features in {seconds:.2f} s "
        f"on {detector.device_}: {detector.n_components_} components keep "
        f"{detector.explained_variance_ratio_.sum():.3f} of the variance"
    )

    X_test = np.vstack([test_normal, test_defect])
    is_normal = np.r_[np.ones(len(test_normal)), np.zeros(len(test_defect))]
    scores = detector.score_samples(X_test)  # higher = more normal
    print(f"image ROC AUC (normal vs defect): {roc_auc_score(is_normal, scores):.3f}")

    # The default threshold comes from in-sample scores, which are optimistic;
    # a threshold from held-out normal parts flags about the share asked for.
    in_sample_flags = np.mean(detector.predict(test_normal) == -1)
    threshold = np.percentile(detector.score_samples(holdout), 5)
    held_out_flags = np.mean(detector.score_samples(test_normal) < threshold)
    caught = np.mean(detector.score_samples(test_defect) < threshold)
    print(
        f"new normal parts flagged: {in_sample_flags:.0%} with the in-sample "
        f"threshold (contamination=0.1), {held_out_flags:.0%} with a held-out 5 % "
        f"threshold, which catches {caught:.0%} of the defects"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dfm.joblib"
        joblib.dump(detector, path)
        reloaded = joblib.load(path)
        same = np.array_equal(reloaded.score_samples(X_test), scores)
        print(
            f"saved {path.stat().st_size / 1e6:.1f} MB with joblib; reloaded "
            f"scores identical: {same}"
        )


if __name__ == "__main__":
    main()
