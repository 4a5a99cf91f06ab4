import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _own_weights_cache(tmp_path_factory):
    """The offline weights are converted into a folder of the test run (as on a
    clean machine), never into the user's ~/.cache/skdfm."""
    import os

    previous = os.environ.get("SKDFM_CACHE")
    os.environ["SKDFM_CACHE"] = str(tmp_path_factory.mktemp("skdfm-cache"))
    yield
    if previous is None:
        del os.environ["SKDFM_CACHE"]
    else:
        os.environ["SKDFM_CACHE"] = previous


#: The command's model flags for the tiny random-weight backbone of the command tests.
CLI_TINY = [
    "--backbone", "test_resnet", "--layer", "layer2", "--input-size", "64",
    "--pooling-kernel-size", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture
def no_download(monkeypatch):
    """Tests never download: no cached weights, and the network said unreachable,
    so the command takes its offline paths."""
    import skdfm._imaging.backbone

    monkeypatch.setattr(skdfm._imaging.backbone, "_cached_weights", lambda cfg: None)
    monkeypatch.setattr(
        skdfm._imaging.backbone, "_download_blocker", lambda cfg: "tests never download"
    )


#: A LocalCluster closes the nanny of a worker that has not come back within
#: ``distributed.deploy.lost-worker-timeout`` (15 s): on 2 busy cores a killed
#: worker's restart (a new process importing torch) can take longer, and the cluster
#: would be left without workers. Real clusters (``dask worker --nanny``) restart
#: without such a limit; the tests give the restart as long.
RESTART_TIME = {"distributed.deploy.lost-worker-timeout": "600s"}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_features(n_samples, n_features, *, alpha=1.0, latent=200, seed=0):
    """ReLU features with a power-law spectrum, like pooled CNN activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(latent, n_features)) / np.sqrt(latent)
    scale = np.arange(1, latent + 1) ** (-alpha / 2)
    z = rng.normal(size=(n_samples, latent)) * scale
    return np.maximum(z @ mixing + 0.05, 0.0).astype(np.float32)


@pytest.fixture
def features():
    """Training and held-out feature rows from one distribution (N=120, D=300)."""
    X = make_features(160, 300)
    return X[:120], X[120:]


# Tiny random-weight backbone for image tests: 64 px in, layer2 -> 8x8 grid.
SMALL_BACKBONE = dict(
    backbone="test_resnet",
    pretrained=False,
    input_size=64,
    pooling_kernel_size=2,
    device="cpu",
    random_state=0,
)


@pytest.fixture(scope="session")
def defect_images():
    """(images, y, masks) of 30 normal and 12 defective 64 px parts."""
    from skdfm import make_defect_images

    return make_defect_images(30, 12, image_size=64, random_state=0)


@pytest.fixture(scope="session")
def fitted_pipeline(defect_images):
    """A fre Pipeline fitted on the first 20 normal images (layer2, 8x8 grid)."""
    from sklearn.pipeline import make_pipeline

    from skdfm import DeepFeatureTransformer, DFMDetector

    images, y, _ = defect_images
    model = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2"),
        DFMDetector(pca_level=0.95, device="cpu"),
    )
    return model.fit(images[y == 1][:20])


def write_mvtec_tree(root, size=(20, 24)):
    """A tiny category: 3 train/good, 2 test/good, 2 test/scratch, 1 test/hole."""
    rng = np.random.default_rng(0)

    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(3):
        save(
            root / "train" / "good" / f"{i:03d}.png",
            rng.integers(0, 255, (*size, 3), "uint8"),
        )
    for i in range(2):
        save(
            root / "test" / "good" / f"{i:03d}.png",
            rng.integers(0, 255, (*size, 3), "uint8"),
        )
    for defect, n in (("scratch", 2), ("hole", 1)):
        for i in range(n):
            save(
                root / "test" / defect / f"{i:03d}.png",
                rng.integers(0, 255, (*size, 3), "uint8"),
            )
            mask = np.zeros(size, np.uint8)
            mask[2 + i : 6 + i, 3:9] = 255
            save(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    (root / "test" / "good" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def host_copies(monkeypatch):
    """Shapes of the CUDA tensors copied to the host while the test runs
    (``.cpu()``, ``.to(<a host device>)``, ``.tolist()``, ``.item()``)."""
    copied = []
    cpu, to = torch.Tensor.cpu, torch.Tensor.to
    for name in ("tolist", "item"):
        method = getattr(torch.Tensor, name)

        def spy(self, *args, _method=method, **kwargs):
            if self.is_cuda:
                copied.append(tuple(self.shape))
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def spy_cpu(self, *args, **kwargs):
        if self.is_cuda:
            copied.append(tuple(self.shape))
        return cpu(self, *args, **kwargs)

    def spy_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.is_cuda and not out.is_cuda:
            copied.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    return copied
