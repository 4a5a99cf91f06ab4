"""skdfm.distributed on a real Dask cluster: two worker processes on loopback."""

import functools
import os
import signal
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.pipeline import make_pipeline

from skdfm import DeepFeatureTransformer, DFMDetector, stream_fit

from .conftest import RESTART_TIME, SMALL_BACKBONE, make_features

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")

from skdfm import distributed as skd  # noqa: E402


def _pipeline(**detector):
    return make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2", batch_size=4),
        DFMDetector(pca_level=0.95, device="cpu", **detector),
    )


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, defect_images):
    """30 normal and 12 defective parts as PNG files, in two folders."""
    images, y, _ = defect_images
    root = tmp_path_factory.mktemp("parts")
    paths = []
    for i, (image, label) in enumerate(zip(images, y, strict=True)):
        folder = root / ("good" if label == 1 else "defect")
        folder.mkdir(exist_ok=True)
        paths.append(str(folder / f"{i:03d}.png"))
        Image.fromarray(image).save(paths[-1])
    return root, np.array(paths), y


def _assert_same_model(got, want, X):
    """Components up to sign, singular values and scores within 1e-6 relative."""
    got_det, want_det = got[-1], want[-1]
    assert got_det.n_components_ == want_det.n_components_
    np.testing.assert_allclose(
        got_det.singular_values_, want_det.singular_values_, rtol=1e-6
    )
    signs = np.sign(np.sum(got_det.components_ * want_det.components_, axis=1))
    np.testing.assert_allclose(
        got_det.components_ * signs[:, None], want_det.components_, atol=1e-6
    )
    np.testing.assert_allclose(got.score_samples(X), want.score_samples(X), rtol=1e-6)


# -- without a cluster: Dask's local scheduler (runs before the cluster starts) ----


def test_without_a_client_the_local_scheduler_runs_the_same_fit(image_files):
    _, paths, y = image_files
    good = paths[y == 1]
    with pytest.raises(ValueError):  # no cluster, no client yet
        distributed.default_client()
    model = skd.fit(_pipeline(), skd.image_bag(good[:20], npartitions=3))
    want = _pipeline().fit(list(good[:20]))
    assert model[-1].n_samples_seen_ == 20
    _assert_same_model(model, want, list(paths[20:]))


# -- on a LocalCluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with (
        dask.config.set(RESTART_TIME),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.mark.slow
def test_fit_on_the_cluster_equals_fit_on_one_machine(client, image_files):
    _, paths, y = image_files
    good = paths[y == 1]
    train = skd.image_bag(good[:20], partition_size=7)  # uneven: 7, 7 and 6
    model = skd.fit(_pipeline(), train, client=client)
    want = _pipeline().fit(list(good[:20]))
    assert model[-1].n_samples_seen_ == 20
    assert model[-1].solver_ == want[-1].solver_ == "gram"  # 20 rows < D
    _assert_same_model(model, want, list(paths[20:]))
    streamed = stream_fit(_pipeline(), list(good[:20]), batch_size=3)
    _assert_same_model(model, streamed, list(paths[20:]))


def test_feature_rows_past_the_features_take_the_covariance_route(client):
    X = make_features(500, 60)
    rows = da.from_array(X, chunks=(70, 60))  # 8 blocks, the last short
    det = skd.fit(DFMDetector(pca_level=0.95, device="cpu"), rows, client=client)
    want = DFMDetector(pca_level=0.95, device="cpu").fit(X)
    assert det.n_samples_seen_ == 500 and det.solver_ == "covariance"
    np.testing.assert_allclose(det.singular_values_, want.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(det.score_samples(X), want.score_samples(X), rtol=1e-6)


def _kill_worker_once(path, marker):
    """The first call anywhere kills the worker process running it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_fit_loses_no_image(client, image_files, tmp_path):
    _, paths, y = image_files
    good = paths[y == 1]
    workers_before = set(client.scheduler_info()["workers"])
    marker = str(tmp_path / "killed")
    train = skd.image_bag(good[:20], npartitions=5).map(
        functools.partial(_kill_worker_once, marker=marker)
    )
    model = skd.fit(_pipeline(), train, client=client)
    assert os.path.exists(marker)  # a worker did die
    client.wait_for_workers(2, timeout=60)
    assert set(client.scheduler_info()["workers"]) != workers_before  # restarted
    assert model[-1].n_samples_seen_ == 20  # no image lost or counted twice
    _assert_same_model(model, _pipeline().fit(list(good[:20])), list(paths[20:]))


@pytest.fixture(scope="module")
def with_bad_files(image_files, tmp_path_factory):
    """The good files with three bad ones spread over the partitions."""
    _, paths, y = image_files
    folder = tmp_path_factory.mktemp("bad")
    broken, empty = folder / "broken.png", folder / "empty.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    empty.write_bytes(b"")
    good = list(paths[y == 1][:20])
    mixed = good[:3] + [str(broken)] + good[3:11] + [str(empty)] + good[11:]
    mixed += [str(folder / "missing.png")]
    return good, mixed


@pytest.mark.slow
def test_unreadable_training_images_are_reported_not_lost(client, with_bad_files):
    good, mixed = with_bad_files
    with pytest.warns(skd.SkippedImagesWarning, match="3 training images") as caught:
        model = skd.fit(_pipeline(), skd.image_bag(mixed, npartitions=4), client=client)
    skipped = caught[0].message.skipped
    assert sorted(os.path.basename(p) for p, _ in skipped) == [
        "broken.png", "empty.png", "missing.png",
    ]  # fmt: skip
    assert all(reason for _, reason in skipped)
    assert model[-1].n_samples_seen_ == 20
    _assert_same_model(model, _pipeline().fit(good), good[:5])


def test_threshold_pass_runs_on_the_workers(client, image_files):
    _, paths, y = image_files
    good = paths[y == 1]
    model = skd.fit(
        _pipeline(),
        skd.image_bag(good[:20], npartitions=2),
        threshold_images=skd.image_bag(good[20:], npartitions=3),
        contamination=0.2,
        client=client,
    )
    want = _pipeline().fit(list(good[:20]))
    want[-1].set_threshold(want.score_samples(list(good[20:])), contamination=0.2)
    np.testing.assert_allclose(model[-1].offset_, want[-1].offset_, rtol=1e-6)
    assert model[-1].threshold_method_ == want[-1].threshold_method_


@pytest.fixture(scope="module")
def fitted(image_files):
    _, paths, y = image_files
    model = _pipeline().fit(list(paths[y == 1][:20]))
    model[-1].set_threshold(
        model.score_samples(list(paths[y == 1][20:])), contamination=0.1
    )
    return model


def test_score_is_lazy_and_equals_scoring_on_one_machine(
    client, fitted, with_bad_files, image_files, tmp_path
):
    root, paths, _ = image_files
    _, mixed = with_bad_files
    calls = tmp_path / "calls"
    calls.mkdir()

    def touch(path):
        (calls / f"{os.getpid()}-{os.path.basename(path)}").touch()
        return path

    images = skd.image_bag(mixed + list(paths[30:]), npartitions=5).map(touch)
    table = skd.score(fitted, images, client=client)
    assert not any(calls.iterdir())  # nothing ran yet
    frame = table.compute()
    assert any(calls.iterdir())
    assert list(frame.columns) == list(skd.SCORE_COLUMNS)
    assert len(frame) == len(mixed) + 12 and frame["path"].tolist() == mixed + list(
        paths[30:]
    )
    bad = frame["error"].notna()
    assert sorted(os.path.basename(p) for p in frame.loc[bad, "path"]) == [
        "broken.png", "empty.png", "missing.png",
    ]  # fmt: skip
    assert frame.loc[bad, ["anomaly_score", "normalized"]].isna().all().all()
    assert frame.loc[bad, "label"].isna().all()
    ok = frame.loc[~bad]
    want = fitted.score_samples(ok["path"].tolist())
    np.testing.assert_allclose(ok["anomaly_score"], -want, rtol=1e-6)
    assert ok["label"].tolist() == fitted.predict(ok["path"].tolist()).tolist()
    assert ((ok["normalized"] >= 0) & (ok["normalized"] <= 1)).all()
    # where each row came from
    assert (
        frame.groupby("partition")["position"]
        .apply(list)
        .map(lambda p: p == list(range(len(p))))
        .all()
    )


def test_score_writes_maps_mirroring_the_tree(client, fitted, image_files, tmp_path):
    root, paths, y = image_files
    picked = [*paths[y == 1][:2], *paths[y == -1][:2]]
    maps = tmp_path / "maps"
    frame = skd.score(
        fitted, skd.image_bag(picked, npartitions=2), maps_dir=maps, root=root
    ).compute()
    expected = [str(maps / os.path.relpath(p, root)) + "_map.png" for p in picked]
    assert frame["map"].tolist() == expected
    assert all(os.path.exists(p) for p in expected)
    assert {os.path.basename(os.path.dirname(p)) for p in expected} == {
        "good", "defect",
    }  # fmt: skip
    width, height = Image.open(expected[0]).size
    assert width == 64 and height > 64  # the image, the legend under it


def test_arrays_are_scored_and_named_by_position(client, fitted, defect_images):
    images, _, _ = defect_images
    bag = db.from_sequence(list(images[:6]), npartitions=2)
    frame = skd.score(fitted, bag, client=client).compute()
    assert frame["path"].isna().all() and frame["error"].isna().all()
    assert frame["partition"].tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(
        frame["anomaly_score"], -fitted.score_samples(images[:6]), rtol=1e-6
    )
    block = da.from_array(images[:6], chunks=(4, 64, 64, 3))
    frame = skd.score(fitted, block, client=client).compute()
    np.testing.assert_allclose(
        frame["anomaly_score"], -fitted.score_samples(images[:6]), rtol=1e-6
    )


def test_bad_arguments_are_clear_errors(client, fitted, image_files):
    _, paths, _ = image_files
    with pytest.raises(TypeError, match="must be a dask.bag .* got list"):
        skd.fit(_pipeline(), list(paths))
    with pytest.raises(ValueError, match="1-D dask array"):
        skd.fit(DFMDetector(), da.zeros(10, chunks=5))
    with pytest.raises(ValueError, match="model must be a DFMDetector"):
        skd.fit(object(), skd.image_bag(paths))
    with pytest.raises(ValueError, match="contamination"):
        skd.fit(
            _pipeline(), skd.image_bag(paths), threshold_images=skd.image_bag(paths),
            contamination=0.9,
        )  # fmt: skip
    with pytest.raises(ValueError, match="pass threshold_images too"):
        skd.fit(_pipeline(), skd.image_bag(paths), contamination=0.1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        skd.fit(_pipeline(), skd.image_bag(paths), batch_size=0)
    unthresholded = stream_fit(_pipeline(), list(paths[:5]))
    with pytest.raises(Exception, match="offset_|threshold"):
        skd.score(unthresholded, skd.image_bag(paths))
    with pytest.raises(ValueError, match="none of the images could be read"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skd.fit(_pipeline(), skd.image_bag(["missing1.png", "missing2.png"]))


# -- the command on a cluster ------------------------------------------------------

CLI_MODEL = [
    "--backbone", "test_resnet", "--random-init", "--layer", "layer2",
    "--input-size", "64", "--pooling-kernel-size", "2", "--device", "cpu",
    "--no-progress",
]  # fmt: skip


def test_the_command_fits_and_scores_on_a_cluster(
    client, image_files, tmp_path, capsys
):
    import skdfm
    from skdfm.cli import main

    root, paths, _ = image_files
    address = client.scheduler.address
    local, remote = tmp_path / "local.skdfm", tmp_path / "remote.skdfm"
    good = str(root / "good")
    assert main(["fit", good, "-o", str(local), *CLI_MODEL]) == 0
    assert (
        main(["fit", good, "-o", str(remote), *CLI_MODEL, "--scheduler", address]) == 0
    )
    out = capsys.readouterr().out
    assert f"cluster: {address}" in out
    a, b = skdfm.load(local), skdfm.load(remote)
    assert b[-1].n_samples_seen_ == a[-1].n_samples_ == 24  # 30 minus 20 % held out
    np.testing.assert_allclose(b[-1].offset_, a[-1].offset_, rtol=1e-6)
    np.testing.assert_allclose(
        b.score_samples(list(paths[:8])), a.score_samples(list(paths[:8])), rtol=1e-6
    )
    # the pixel threshold too: from the same held-out images, on the client
    np.testing.assert_allclose(
        b[-1].pixel_threshold_, a[-1].pixel_threshold_, rtol=1e-5
    )
    # score: the same table as on one machine, maps mirrored
    assert (
        main(["score", str(local), str(root), "--device", "cpu", "--no-progress"]) == 0
    )
    here = capsys.readouterr().out
    maps = tmp_path / "maps"
    code = main(
        ["score", str(local), str(root), "--device", "cpu", "--no-progress",
         "--scheduler", address, "--maps", str(maps)]
    )  # fmt: skip
    there = capsys.readouterr().out
    assert code == 0
    parse = [line.split("\t") for line in here.strip().splitlines()]
    got = [line.split("\t") for line in there.strip().splitlines()]
    assert [r[0] for r in got] == [r[0] for r in parse]
    assert [r[3] for r in got] == [r[3] for r in parse]
    np.testing.assert_allclose(
        [float(r[1]) for r in got[1:]], [float(r[1]) for r in parse[1:]], rtol=1e-5
    )
    assert len(list(maps.rglob("*_map.png"))) == 42
    assert {p.parent.name for p in maps.rglob("*_map.png")} == {"good", "defect"}


def test_the_command_on_a_cluster_takes_relative_paths_and_holdout_0(
    client, image_files, tmp_path, monkeypatch, capsys
):
    import skdfm
    from skdfm.cli import main

    root, _, _ = image_files
    monkeypatch.chdir(root)  # the workers run elsewhere: "good" is not theirs
    address = client.scheduler.address
    local, remote = tmp_path / "local.skdfm", tmp_path / "remote.skdfm"
    base = ["fit", "good", "--holdout", "0", *CLI_MODEL]
    assert main([*base, "-o", str(local)]) == 0
    assert main([*base, "-o", str(remote), "--scheduler", address]) == 0
    capsys.readouterr()
    a, b = skdfm.load(local), skdfm.load(remote)
    assert b[-1].n_samples_seen_ == a[-1].n_samples_ == 30
    # the in-sample threshold at the detector's contamination, as on one machine
    np.testing.assert_allclose(b[-1].offset_, a[-1].offset_, rtol=1e-6)
    two = [f"good/{name}" for name in sorted(os.listdir("good"))[:2]]
    code = main(
        ["score", str(remote), *two, "missing.png", "--scheduler", address,
         "--device", "cpu"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 3 and "skipped missing.png" in err
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == ["path", *two]


@pytest.mark.slow
def test_the_command_reports_an_unreachable_scheduler(image_files, tmp_path, capsys):
    from skdfm.cli import main

    root, _, _ = image_files
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(
            ["fit", str(root / "good"), "-o", str(tmp_path / "m.skdfm"), *CLI_MODEL,
             "--scheduler", "tcp://127.0.0.1:9"]
        )  # fmt: skip
    assert code == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "m.skdfm").exists()


def test_the_command_bounds_the_cluster_work_with_timeout(
    client, image_files, tmp_path, capsys
):
    from skdfm.cli import main

    root, _, _ = image_files
    address = client.scheduler.address
    target = tmp_path / "m.skdfm"
    args = ["fit", str(root / "good"), "-o", str(target), *CLI_MODEL]
    assert main([*args, "--scheduler", address, "--timeout", "0.01"]) == 1
    assert "did not finish within timeout=0.01 s" in capsys.readouterr().err
    assert not target.exists()
    with pytest.raises(SystemExit) as exit_info:  # said before any image is read
        main([*args, "--timeout", "10"])
    assert exit_info.value.code == 2
    assert "argument --timeout: bounds a cluster's work" in capsys.readouterr().err


# -- a grid search under joblib's Dask backend ---------------------------------------


def _worker_cache_counts():
    from skdfm._cache import adopted_caches

    return [(misses, hits) for _, hits, misses in adopted_caches()]


def test_grid_search_runs_under_joblib_dask_with_one_cache_per_worker(
    client, defect_images
):
    import joblib
    from sklearn.model_selection import GridSearchCV

    from skdfm import FeatureCache, InlierKFold, image_auroc_scorer

    images, y, _ = defect_images

    def search(n_jobs):
        model = make_pipeline(
            DeepFeatureTransformer(**SMALL_BACKBONE, cache=FeatureCache()),
            DFMDetector(device="cpu"),
        )
        grid = {
            "deepfeaturetransformer__layer": ["layer1", "layer2"],
            "dfmdetector__pca_level": [0.9, 0.97],
        }
        return GridSearchCV(
            model, grid, cv=InlierKFold(3), scoring=image_auroc_scorer,
            refit=False, n_jobs=n_jobs,
        )  # fmt: skip

    here = search(1).fit(images, y)
    with joblib.parallel_backend("dask"):
        there = search(2).fit(images, y)
    np.testing.assert_allclose(
        there.cv_results_["mean_test_score"], here.cv_results_["mean_test_score"]
    )
    assert there.cv_results_["params"] == here.cv_results_["params"]
    # 2 layers x 2 levels x 3 folds, each scoring 42 images: 504 backbone passes
    # without a cache; with one per worker, each image runs at most once per layer
    # on each of the 2 workers.
    counts = [
        c
        for per_worker in client.run(_worker_cache_counts).values()
        for c in per_worker
    ]
    misses = sum(m for m, _ in counts)
    assert 0 < misses <= 2 * 2 * len(images)
    assert sum(h for _, h in counts) >= 504 - misses
