import numpy as np
import torch
from scipy.stats import multivariate_normal

from skdfm._gaussian import (
    VARIANCE_FLOOR,
    gaussian_variances,
    negative_log_likelihood,
)


def test_nll_is_minus_twice_the_log_density_without_its_constant():
    rng = np.random.default_rng(0)
    variances = rng.uniform(0.1, 3.0, size=4)
    z = rng.normal(size=(10, 4))
    expected = -2 * multivariate_normal(np.zeros(4), np.diag(variances)).logpdf(z)
    expected -= 4 * np.log(2 * np.pi)
    got = negative_log_likelihood(torch.from_numpy(z), torch.from_numpy(variances))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_variances_are_biased_and_floored():
    s = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    v = gaussian_variances(s, n_samples=8)
    np.testing.assert_allclose(v[:2].numpy(), [2.0, 0.5])
    assert float(v[2]) == 2.0 * VARIANCE_FLOOR
    z = torch.ones(1, 3, dtype=torch.float64)
    assert torch.isfinite(negative_log_likelihood(z, v)).all()


def test_no_components_gives_zero():
    v = gaussian_variances(torch.empty(0, dtype=torch.float64), n_samples=3)
    assert negative_log_likelihood(
        torch.empty(2, 0, dtype=torch.float64), v
    ).tolist() == [
        0.0,
        0.0,
    ]
