import os
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone

import skdfm._transformer as transformer_module
from skdfm import DeepFeatureTransformer, FeatureCache

from .conftest import SMALL_BACKBONE


@pytest.fixture
def images(defect_images):
    return defect_images[0][:6]


def transformer(cache, **params):
    return DeepFeatureTransformer(
        **{**SMALL_BACKBONE, "layer": "layer2", **params}, cache=cache
    )


def test_cached_rows_equal_computed_rows(images):
    cache = FeatureCache()
    plain = transformer(None).fit(images).transform(images)
    cached = transformer(cache).fit(images)
    np.testing.assert_array_equal(cached.transform(images), plain)
    assert (cache.misses, cache.hits) == (6, 0)
    np.testing.assert_array_equal(cached.transform(images[::-1]), plain[::-1])
    assert (cache.misses, cache.hits) == (6, 6)
    # a partly new batch runs only the new images
    mixed = np.concatenate([images[:2], images[:1] // 2])
    out = cached.transform(mixed)
    assert (cache.misses, cache.hits) == (7, 8)
    expected = transformer(None).fit(images).transform(mixed[2:])
    np.testing.assert_array_equal(out[2], expected[0])


def test_identity_is_the_pixels_not_the_object(images):
    cache = FeatureCache()
    tr = transformer(cache).fit(images)
    tr.transform(images)
    tr.transform(images.copy())  # same pixels, another array
    tr.transform(list(images))  # same pixels, a list of arrays
    assert cache.misses == 6 and cache.hits == 12
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    tr.transform(changed)
    assert cache.misses == 7


def test_files_are_identified_by_path_size_and_mtime(images, tmp_path):
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    cache = FeatureCache()
    tr = transformer(cache).fit(paths)
    first = tr.transform(paths)
    tr.transform([str(p) for p in paths])
    assert cache.misses == 3 and cache.hits == 3
    Image.fromarray(images[5]).save(paths[0])  # rewritten file
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = tr.transform(paths)
    assert cache.misses == 4
    assert not np.array_equal(first[0], second[0])


@pytest.mark.parametrize(
    "change",
    [
        dict(layer="layer3"),
        dict(pooling_kernel_size=1),
        dict(input_size=48),
        dict(random_state=1),  # other weights
        dict(channels_last=False),
    ],
)
def test_anything_that_changes_features_is_part_of_the_key(images, change):
    cache = FeatureCache()
    transformer(cache).fit(images).transform(images)
    transformer(cache, **change).fit(images).transform(images)
    assert cache.misses == 12 and cache.hits == 0


def test_clones_share_the_cache_and_pickles_carry_no_rows(images):
    cache = FeatureCache()
    tr = transformer(cache)
    assert clone(tr).cache is cache
    tr.fit(images).transform(images)
    # unpickled where the cache lives: the same rows and counters (as a clone)
    loaded = pickle.loads(pickle.dumps(tr)).cache
    assert len(loaded) == len(cache) == 6 and loaded.misses == cache.misses
    assert len(pickle.dumps(tr)) < len(pickle.dumps(tr.set_params(cache=None))) + 2000
    tr.set_params(cache=cache)
    assert len(cache) == 6 and cache.n_bytes == 6 * tr.transform(images[:1]).nbytes


def _cache_in_a_worker(data):
    """In a worker process: unpickle a cache twice, as two tasks would."""
    from skdfm._cache import adopted_caches

    first = pickle.loads(data)
    empty = len(first)
    first.store(("config",), [("key",)], np.zeros((1, 4), np.float32))
    del first  # the task is over; the worker keeps the rows for the next one
    second = pickle.loads(data)
    return empty, len(second), second.max_bytes, adopted_caches()


@pytest.mark.slow
def test_a_worker_process_keeps_one_empty_cache_per_original(images):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache = FeatureCache(max_bytes=10_000)
    transformer(cache).fit(images).transform(images)
    data = pickle.dumps(cache)
    # spawned, as joblib's and Dask's workers are (a forked one has the rows)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        empty, rows, max_bytes, adopted = pool.submit(_cache_in_a_worker, data).result()
    assert (empty, rows, max_bytes, adopted) == (0, 1, 10_000, [(1, 0, 0)])
    # a main process (this one) adopts nothing: a cache unpickled here that is
    # not alive here starts empty, and goes with its last user
    from skdfm._cache import adopted_caches

    data = pickle.dumps(FeatureCache())
    first = pickle.loads(data)
    first.store(("config",), [("key",)], np.zeros((1, 4), np.float32))
    assert adopted_caches() == [] and len(pickle.loads(data)) == 1
    del first
    assert len(pickle.loads(data)) == 0


def test_max_bytes_evicts_least_recently_used(images):
    row_bytes = 48 * 4 * 4 * 4  # layer2 of test_resnet at 64 px, pooled by 2
    cache = FeatureCache(max_bytes=3 * row_bytes)
    tr = transformer(cache).fit(images)
    tr.transform(images)
    assert len(cache) == 3 and cache.n_bytes <= 3 * row_bytes
    tr.transform(images[3:])  # the last three are in
    assert cache.hits == 3
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=-1)


def test_cache_leaves_the_transformer_dict_alone(images):
    tr = transformer(FeatureCache()).fit(images)
    before = dict(tr.__dict__)
    tr.transform(images)
    assert tr.__dict__.keys() == before.keys()
    assert all(tr.__dict__[k] is before[k] for k in before)


def test_clear_resets(images):
    cache = FeatureCache()
    transformer(cache).fit(images).transform(images)
    cache.clear()
    assert len(cache) == 0 and cache.hits == cache.misses == 0 and cache.n_bytes == 0


def test_only_missing_images_reach_the_backbone(images, monkeypatch):
    cache = FeatureCache()
    tr = transformer(cache).fit(images)
    tr.transform(images[:4])
    seen = []
    original = transformer_module.DeepFeatureTransformer._features
    monkeypatch.setattr(
        transformer_module.DeepFeatureTransformer,
        "_features",
        lambda self, x: seen.append(len(x)) or original(self, x),
    )
    tr.transform(images)
    assert seen == [2]


@pytest.mark.cuda
def test_weights_digest_does_not_depend_on_the_device():
    import timm

    from skdfm._cache import weights_digest

    model = timm.create_model("test_resnet", pretrained=False)
    assert weights_digest(model) == weights_digest(model.cuda())
