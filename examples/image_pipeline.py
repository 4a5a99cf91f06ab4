"""Images in, anomaly scores out: DeepFeatureTransformer + DFMDetector in a Pipeline.

Writes small synthetic inspection images (a woven texture; defects are scratches) to
PNG files, fits on normal parts only, scores held-out normal and defective parts,
and saves the fitted Pipeline with joblib (the truncated backbone's weights travel
inside it). Uses timm's pretrained resnet18 when it can be had, random weights
otherwise::

    python examples/image_pipeline.py
"""

import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline

from skdfm import DeepFeatureTransformer, DFMDetector


def make_part(rng, defect, size=160):
    """A woven texture with random phase and lighting; a defect adds a scratch."""
    y, x = np.mgrid[:size, :size] / size
    phase = rng.uniform(0, 2 * np.pi, 2)
    image = 0.5 + 0.2 * np.sin(40 * x + phase[0]) * np.sin(40 * y + phase[1])
    image = image * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, image.shape)
    if defect:
        row, col = rng.integers(30, size - 30, 2)
        angle = rng.uniform(0, np.pi)
        t = np.linspace(-20, 20, 200)
        rr = np.clip((row + t * np.sin(angle)).astype(int), 0, size - 1)
        cc = np.clip((col + t * np.cos(angle)).astype(int), 0, size - 1)
        for d in range(-1, 2):
            image[np.clip(rr + d, 0, size - 1), cc] = 0.05
    rgb = np.stack([image, image * 0.95, image * 0.85], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def write_parts(folder, rng, n, defect):
    paths = []
    for i in range(n):
        paths.append(folder / f"{'defect' if defect else 'good'}_{i:03d}.png")
        Image.fromarray(make_part(rng, defect)).save(paths[-1])
    return paths


def main():
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train = write_parts(folder, rng, 40, defect=False)
        test_good = write_parts(folder, rng, 20, defect=False)
        test_defect = write_parts(folder, rng, 20, defect=True)

        settings = dict(backbone="resnet18", layer="layer3", input_size=256)
        try:
            transformer = DeepFeatureTransformer(**settings).fit(train[:1])
            print("weights: pretrained resnet18 from timm")
        except OSError as error:  # offline: the message says how to load a file
            print(f"weights: random ({str(error).split(':')[0]})")
            transformer = DeepFeatureTransformer(
                **settings, pretrained=False, random_state=0
            )
        model = make_pipeline(transformer, DFMDetector(pca_level=0.97))

        start = time.perf_counter()
        model.fit(train)
        print(
            f"fitted on {len(train)} normal images in "
            f"{time.perf_counter() - start:.1f} s"
        )
        features, detector = model[0], model[1]
        print(
            f"feature rows: {np.prod(features.feature_shape_)} values "
            f"{features.feature_shape_}, {detector.n_components_} components kept"
        )

        test = test_good + test_defect
        labels = np.r_[np.ones(len(test_good)), -np.ones(len(test_defect))]
        scores = model.score_samples(test)
        print(f"image ROC AUC (normal vs defect): {roc_auc_score(labels, scores):.3f}")

        path = folder / "model.joblib"
        joblib.dump(model, path)
        reloaded = joblib.load(path)
        same = np.array_equal(reloaded.score_samples(test), scores)
        print(
            f"saved {path.stat().st_size / 1e6:.1f} MB; "
            f"reloaded scores identical: {same}"
        )


if __name__ == "__main__":
    main()
