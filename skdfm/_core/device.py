"""Where torch work runs: resolving a user's ``device`` argument, in one place."""

from __future__ import annotations

import warnings

import torch
from sklearn.utils.validation import check_is_fitted

__all__ = [
    "DeviceMixin",
    "DeviceWarning",
    "as_tensor",
    "check_has_data",
    "loadable_device",
    "resolve_device",
]


class DeviceWarning(UserWarning):
    """A fitted model was loaded where its device does not exist and moved to CPU."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a ``device`` parameter into an available :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N"}, torch.device or None
        ``"auto"`` (or None) picks the current CUDA device when one is available and
        the CPU otherwise. ``"mps"`` is accepted where torch supports it.

    Returns
    -------
    torch.device
        An available device; CUDA devices always carry their index.

    Raises
    ------
    ValueError
        If ``device`` is not a device torch knows, or names a device this machine
        does not have.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a valid device; use 'auto', 'cpu', 'cuda' "
            "or 'cuda:N'."
        ) from exc
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this "
                "machine (torch.cuda.is_available() is False); use device='cpu' or "
                "device='auto'."
            )
        count = torch.cuda.device_count()
        index = (
            torch.cuda.current_device() if resolved.index is None else resolved.index
        )
        if index >= count:
            raise ValueError(
                f"device={device!r} was requested but this machine has {count} CUDA "
                f"device(s) (valid indices 0..{count - 1})."
            )
        return torch.device("cuda", index)
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device={device!r} was requested but MPS is not available."
            )
        return resolved
    raise ValueError(
        f"device={device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
    )


def loadable_device(device: str) -> str:
    """Return ``device`` if it exists on this machine, else ``"cpu"`` with a warning.

    Used when a fitted model is unpickled: a model fitted on a GPU must still load and
    score on a machine without one.
    """
    try:
        return str(resolve_device(device))
    except ValueError:
        warnings.warn(
            f"This model was fitted on device {device!r}, which this machine does not "
            "have; it will compute on 'cpu'. Call to_device(...) to pick another, or "
            "ignore this warning: results are the same.",
            DeviceWarning,
            stacklevel=3,
        )
        return "cpu"


def check_has_data(X, what: str = "X") -> None:
    """Refuse tensors that hold no values (the ``meta`` device) with a clear error."""
    if isinstance(X, torch.Tensor) and X.device.type == "meta":
        raise ValueError(
            f"{what} is a tensor on the 'meta' device, which has a shape but no "
            "values; pass the tensor with its data (e.g. on 'cpu' or 'cuda')."
        )


def as_tensor(X, device: torch.device, dtype: torch.dtype | None = None):
    """``torch.as_tensor``: zero-copy where it can be, also for read-only arrays
    (loaded or memory-mapped models), which skdfm never writes to."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable"
        )
        return torch.as_tensor(X, dtype=dtype, device=device)


class DeviceMixin:
    """The fitted device of an estimator, in one place, and moving it.

    An estimator keeps its resolved device as the string ``device_`` (portable in
    pickles); ``_fitted_device`` is that string parsed once per use site, and
    :meth:`to_device` is the one way to move a fitted estimator. Subclasses move their
    own fitted state in ``_move_fitted_state``.
    """

    @property
    def _fitted_device(self) -> torch.device:
        return torch.device(self.device_)

    def to_device(self, device):
        """Compute on ``device`` from now on, without refitting (in place).

        Sets the ``device`` parameter and ``device_``, and moves every fitted
        tensor there (backbone weights, the fitted subspace). Results are the same
        up to the rounding of the device's kernels.

        Parameters
        ----------
        device : str or torch.device
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

        Returns
        -------
        self : object
            The estimator, moved.
        """
        check_is_fitted(self)
        resolved = resolve_device(device)
        self._move_fitted_state(resolved)  # first: a failed move changes nothing
        self.set_params(device=device)
        self.device_ = str(resolved)
        return self

    def _move_fitted_state(self, device: torch.device) -> None:  # pragma: no cover
        raise NotImplementedError
