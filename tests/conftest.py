import numpy as np
import pytest
import torch


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
