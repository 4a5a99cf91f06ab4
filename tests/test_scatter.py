import numpy as np
import pytest
import torch

from skdfm._kernels.scatter import Scatter, lower_syrk_


def _two_pass(X):
    mean = X.mean(axis=0)
    return mean, (X - mean).T @ (X - mean)


def test_lower_syrk_fills_the_lower_triangle_only(monkeypatch):
    monkeypatch.setattr("skdfm._kernels.scatter._SYRK_BLOCK", 4)  # several blocks
    rows = torch.from_numpy(np.random.default_rng(0).normal(size=(7, 10)))
    out = torch.full((10, 10), 5.0, dtype=torch.float64)
    lower_syrk_(out, rows)
    full = (rows.T @ rows).numpy() + 5.0
    np.testing.assert_allclose(np.tril(out.numpy()), np.tril(full), rtol=1e-13)


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chan_merge_equals_two_pass_statistics(chunk_rows):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(57, 6)) * [1, 2, 3, 4, 5, 6] + 10
    scatter = Scatter(6, torch.device("cpu"))
    for batch in np.array_split(X, [5, 6, 30]):  # uneven batches, one of 1 row
        scatter.update(torch.from_numpy(batch), chunk_rows=chunk_rows)
    mean, M = _two_pass(X)
    assert scatter.count == 57
    np.testing.assert_allclose(scatter.mean.numpy(), mean, rtol=1e-14)
    np.testing.assert_allclose(
        np.tril(scatter.matrix.numpy()), np.tril(M), rtol=1e-12, atol=1e-12
    )


def test_large_offset_does_not_lose_the_variance():
    # Mean 1e6, spread 1e-2: sum(x x^T) - n m m^T would cancel every digit of the
    # variance in float64; the centred merge keeps it.
    rng = np.random.default_rng(1)
    X = 1e6 + 1e-2 * rng.normal(size=(400, 3))
    scatter = Scatter(3, torch.device("cpu"))
    for batch in np.array_split(X, 9):
        scatter.update(torch.from_numpy(batch), chunk_rows=50)
    _, M = _two_pass(X)
    # Centring 1e6 in float64 itself costs ~1e-8 of each centred value.
    np.testing.assert_allclose(
        np.tril(scatter.matrix.numpy()), np.tril(M), atol=1e-6 * np.trace(M)
    )
    naive = X.T @ X - len(X) * np.outer(X.mean(0), X.mean(0))
    assert np.abs(naive - M).max() > 1e-3 * np.trace(M)  # what the merge avoids


def test_float32_rows_are_accumulated_in_float64():
    X = np.random.default_rng(2).normal(size=(20, 4)).astype(np.float32)
    scatter = Scatter(4, torch.device("cpu")).update(torch.from_numpy(X), 7)
    assert scatter.matrix.dtype == torch.float64
    _, M = _two_pass(X.astype(np.float64))
    np.testing.assert_allclose(np.tril(scatter.matrix.numpy()), np.tril(M), rtol=1e-12)


@pytest.mark.cuda
def test_scatter_on_cuda_matches_cpu():
    X = torch.from_numpy(np.random.default_rng(3).normal(size=(90, 12)))
    gpu = Scatter(12, torch.device("cuda")).update(X.cuda(), 16)
    cpu = Scatter(12, torch.device("cpu")).update(X, 16)
    np.testing.assert_allclose(
        np.tril(gpu.matrix.cpu().numpy()), np.tril(cpu.matrix.numpy()), rtol=1e-10
    )


def _scatter_of(batches):
    scatter = Scatter(batches[0].shape[1], torch.device("cpu"))
    for batch in batches:
        scatter.update(torch.from_numpy(batch), chunk_rows=1000)
    return scatter


def test_merging_two_scatters_equals_the_statistics_of_all_rows():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 7)) * np.arange(1, 8) + 1e4  # far from the origin
    parts = np.array_split(X, [1, 20, 20, 50])  # a 1-row part, an empty one
    # a tree reduction: ((p0 + p1) + p2) + (p3 + p4), with p2 empty
    left = _scatter_of([parts[0]]).merge(_scatter_of([parts[1]]))
    left.merge(Scatter(7, torch.device("cpu")))
    right = _scatter_of([parts[3]]).merge(_scatter_of([parts[4]]))
    merged = Scatter(7, torch.device("cpu")).merge(left).merge(right)
    mean, M = _two_pass(X)
    assert merged.count == 80
    np.testing.assert_allclose(merged.mean.numpy(), mean, rtol=1e-14)
    np.testing.assert_allclose(
        np.tril(merged.matrix.numpy()), np.tril(M), rtol=1e-10, atol=1e-8
    )
    # the order of the merges only moves the last bits
    other = _scatter_of([parts[4]]).merge(_scatter_of([parts[0], parts[1]]))
    other.merge(_scatter_of([parts[3]]))
    assert other.count == 80
    np.testing.assert_allclose(
        np.tril(other.matrix.numpy()), np.tril(M), rtol=1e-10, atol=1e-8
    )
    with pytest.raises(ValueError, match="statistics of 3 features into .* 7"):
        merged.merge(Scatter(3, torch.device("cpu")))


def test_a_pickled_scatter_carries_the_lower_triangle_only(monkeypatch):
    import pickle

    monkeypatch.setattr("skdfm._kernels.scatter._PACK_ROWS", 3)  # several row blocks
    scatter = _scatter_of([np.random.default_rng(4).normal(size=(30, 120))])
    scatter.matrix += torch.full((120, 120), 123.0).triu(1)  # scratch above
    data = pickle.dumps(scatter)
    assert scatter.nbytes == 8 * (120 * 121 // 2 + 120)
    full = 8 * 120 * 120
    assert len(data) < scatter.nbytes + 2000 < full  # no D x D matrix travels
    back = pickle.loads(data)
    assert back.count == 30
    np.testing.assert_array_equal(back.mean.numpy(), scatter.mean.numpy())
    np.testing.assert_array_equal(
        np.tril(back.matrix.numpy()), np.tril(scatter.matrix.numpy())
    )
