"""Images in, anomaly scores out: DeepFeatureTransformer + DFMDetector in a Pipeline.

Writes synthetic inspection images (``make_defect_images``: a woven texture with
scratches, cracks, stains and holes) to PNG files, fits on normal parts only, scores
held-out normal and defective parts, and saves the fitted Pipeline with skdfm.save (the
truncated backbone's weights travel inside it). Uses timm's pretrained resnet18 when
it can be had, random weights otherwise::

    python examples/image_pipeline.py
"""

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline

import skdfm
from skdfm import DeepFeatureTransformer, DFMDetector, make_defect_images


def write_parts(folder, images, name):
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{name}_{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def main():
    images, y, _ = make_defect_images(60, 20, image_size=160, random_state=0)
    good, defective = images[y == 1], images[y == -1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train = write_parts(folder, good[:40], "good")
        test_good = write_parts(folder, good[40:], "good_test")
        test_defect = write_parts(folder, defective, "defect")

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

        path = folder / "model.skdfm"
        skdfm.save(model, path)  # data, never code: safe to load
        reloaded = skdfm.load(path)
        same = np.array_equal(reloaded.score_samples(test), scores)
        print(
            f"saved {path.stat().st_size / 1e6:.1f} MB; "
            f"reloaded scores identical: {same}"
        )


if __name__ == "__main__":
    main()
