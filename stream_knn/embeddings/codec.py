"""Float32 little-endian byte encoding of vectors, the only form vectors take in state stores."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from stream_knn.errors import DimensionError

__all__ = ["decode_vector", "encode_vector"]

_DTYPE = np.dtype("<f4")


def encode_vector(vector: npt.ArrayLike) -> bytes:
    """Encode a one-dimensional vector as float32 little-endian bytes.

    Parameters
    ----------
    vector
        Anything numpy turns into a 1-D array of finite numbers.

    Returns
    -------
    bytes
        ``4 * len(vector)`` bytes.

    Raises
    ------
    DimensionError
        If the vector is not one-dimensional or holds NaN/inf.

    Examples
    --------
    >>> encode_vector([1.0, -2.0]).hex()
    '0000803f000000c0'
    """
    array = np.asarray(vector, dtype=_DTYPE)
    if array.ndim != 1:
        raise DimensionError(f"expected a 1-D vector, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DimensionError("vector holds NaN or inf; only finite values can be stored")
    return array.tobytes()


def decode_vector(data: bytes, dims: int) -> npt.NDArray[np.float32]:
    """Decode bytes written by :func:`encode_vector` into a writable float32 array.

    Parameters
    ----------
    data
        Exactly ``4 * dims`` bytes.
    dims
        Expected dimension.

    Returns
    -------
    numpy.ndarray
        Native-endian float32 array of shape ``(dims,)`` that owns its memory.

    Raises
    ------
    DimensionError
        If the length is not ``4 * dims`` or a value is NaN/inf (a corrupt or foreign record).

    Examples
    --------
    >>> decode_vector(bytes.fromhex('0000803f000000c0'), 2).tolist()
    [1.0, -2.0]
    """
    if len(data) != dims * 4:
        raise DimensionError(
            f"stored vector has {len(data)} bytes, expected {dims * 4} for dims={dims}; "
            "was the state written with another model.dims?"
        )
    array = np.frombuffer(data, dtype=_DTYPE).astype(np.float32)
    if not np.isfinite(array).all():
        raise DimensionError("stored vector holds NaN or inf; the record is corrupt")
    return array
