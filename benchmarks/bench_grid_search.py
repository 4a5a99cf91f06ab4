"""Backbone forwards and time of a 3 x 3 GridSearchCV, with and without FeatureCache.

    python benchmarks/bench_grid_search.py [--image-size 128] [--scorers 2]

Grid: layer in {layer1, layer2, layer3} x pca_level in {0.9, 0.97, 0.99},
InlierKFold(3), on make_defect_images(60, 30, random_state=0); resnet18 with random
weights (the count does not depend on the weights). Prints the images run through
the backbone (counted where features are computed) and the ratio of the two runs.
"""

import argparse
import time

import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

import skdfm._transformer as transformer_module
from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    FeatureCache,
    InlierKFold,
    image_auroc_scorer,
    make_defect_images,
    pixel_auroc_scorer,
)

COUNT = {"images": 0, "calls": 0}
_features = transformer_module.DeepFeatureTransformer._features


def _counting(self, x):
    COUNT["images"] += len(x)
    COUNT["calls"] += 1
    return _features(self, x)


transformer_module.DeepFeatureTransformer._features = _counting


def run(X, y_or_masks, cache, scoring, args):
    COUNT.update(images=0, calls=0)
    model = make_pipeline(
        DeepFeatureTransformer(
            backbone="resnet18",
            pretrained=False,
            random_state=0,
            input_size=args.image_size,
            device="cpu",
            cache=cache,
        ),
        DFMDetector(device="cpu"),
    )
    grid = {
        "deepfeaturetransformer__layer": ["layer1", "layer2", "layer3"],
        "dfmdetector__pca_level": [0.9, 0.97, 0.99],
    }
    start = time.perf_counter()
    search = GridSearchCV(
        model, grid, cv=InlierKFold(3), scoring=scoring, refit=False
    ).fit(X, y_or_masks)
    return time.perf_counter() - start, dict(COUNT), search.cv_results_


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--scorers", type=int, choices=[1, 2], default=2)
    args = parser.parse_args()
    X, y, masks = make_defect_images(60, 30, image_size=args.image_size, random_state=0)
    scoring = {"image_auroc": image_auroc_scorer}
    if args.scorers == 2:
        scoring["pixel_auroc"] = pixel_auroc_scorer
    target = masks if args.scorers == 2 else y
    cached_time, cached, cached_results = run(X, target, FeatureCache(), scoring, args)
    plain_time, plain, plain_results = run(X, target, None, scoring, args)
    same = all(
        np.array_equal(
            cached_results[f"mean_test_{k}"], plain_results[f"mean_test_{k}"]
        )
        for k in scoring
    )
    print(
        f"{len(X)} images of {args.image_size} px, 9 candidates x 3 folds, "
        f"{len(scoring)} scorer(s)"
    )
    print(
        f"with FeatureCache:    {cached['images']:5d} image forwards "
        f"({cached['calls']} batches), {cached_time:6.1f} s"
    )
    print(
        f"without:              {plain['images']:5d} image forwards "
        f"({plain['calls']} batches), {plain_time:6.1f} s"
    )
    print(
        f"ratio (without/with): {plain['images'] / cached['images']:.1f}x forwards, "
        f"{plain_time / cached_time:.1f}x time; identical cv_results: {same}"
    )
    for k in scoring:
        best = int(np.argmax(cached_results[f"mean_test_{k}"]))
        print(
            f"best {k}: {cached_results[f'mean_test_{k}'][best]:.3f} at "
            f"{cached_results['params'][best]}"
        )


if __name__ == "__main__":
    main()
