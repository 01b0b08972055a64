"""Bounded decoding of the arrays that travel in messages.

Flower carries each array as ``dtype``, ``shape``, ``stype`` and ``data`` (the bytes of a
``.npy`` file). Its own decoder (``Array.numpy()``) trusts the ``.npy`` header: a few bytes
declaring a shape of 10^12 elements make NumPy allocate the whole array before it notices
that the data is missing. Both adapters (the site's ClientApp, the coordinator's
ServerApp) decode through :func:`decode_arrays` instead, which first checks every array:

- ``stype`` is ``numpy.ndarray`` and ``dtype`` one of :data:`ALLOWED_DTYPES`;
- the shape has at most :data:`MAX_NDIM` non-negative integer entries;
- the ``.npy`` header agrees with the declared shape and dtype, and the data holds exactly
  the bytes that shape and dtype need;
- the declared size of each array, and of all arrays together, is within a bound.

The bound is the smaller of a fixed limit (:data:`DEFAULT_MAX_MESSAGE_BYTES`, configurable
as ``max-message-mb``) and what the plan's model can need (:func:`plan_message_bytes`: every
parameter and buffer of the model grown through all stages, plus the statistics of analytic
tasks, times :data:`HEADROOM`, plus :data:`SLACK_BYTES`). Every problem of a message is
reported at once in one :class:`ArrayBoundError`.

This module never imports Flower: it works on any object with those four attributes.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import Tensor

from unicon_model.layers import pooled_size
from unicon_model.protocol import ProtocolError
from unicon_model.schema import Plan

logger = logging.getLogger(__name__)

NUMPY_STYPE = "numpy.ndarray"
"""The only serialisation accepted (Flower's ``SType.NUMPY``)."""

ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
)
"""Element types a model, its statistics or SecAgg+ vectors use (all torch-compatible)."""

MAX_NDIM = 8
"""Most dimensions an array may declare (3D convolution weights have 5)."""

MAX_ARRAYS = 65_536
"""Most arrays one message may hold."""

MAX_NPY_HEADER = 10_000
"""Largest ``.npy`` header parsed (NumPy's own default limit)."""

DEFAULT_MAX_MESSAGE_BYTES = 2**31 - 1
"""Fixed bound on a message's array bytes when none is configured: Flower's own gRPC
message limit (``flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH``, 2 GiB - 1)."""

HEADROOM = 2.0
"""Factor on the plan's model size (float64 instead of float32, bookkeeping arrays)."""

SLACK_BYTES = 1 << 20
"""Bytes added to the plan-derived bound (small models, ``.npy`` headers)."""

LIMIT_KEY = "max-message-mb"
"""Node config (site) or run config (coordinator) key of the fixed limit, in MiB."""

_MIB = 1 << 20
_MAX_LISTED = 20


class ArrayBoundError(ProtocolError):
    """A message holds arrays that are malformed or larger than the bound."""


class WireArray(Protocol):
    """What Flower's ``Array`` holds (duck-typed, so this module needs no Flower import)."""

    dtype: str
    shape: Any
    stype: str
    data: bytes


def _shape_problem(name: str, shape: Any, source: str) -> str:
    """'' when ``shape`` is at most :data:`MAX_NDIM` non-negative integers."""
    if (
        isinstance(shape, tuple | list)
        and len(shape) <= MAX_NDIM
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        return ""
    return (
        f"{name!r}: {source} shape {shape!r} is not a list of at most {MAX_NDIM} "
        "non-negative integers"
    )


def _dtype_problem(name: str, dtype: np.dtype[Any], source: str) -> str:
    """'' when ``dtype`` is one of :data:`ALLOWED_DTYPES` in native byte order."""
    if dtype.name not in ALLOWED_DTYPES or dtype != np.dtype(dtype.name):
        return f"{name!r}: {source} dtype {dtype.str!r} is not one of {sorted(ALLOWED_DTYPES)}"
    return ""


def _header(name: str, data: Any) -> tuple[tuple[Any, ...], np.dtype[Any], int] | str:
    """Shape, dtype and value offset from a ``.npy`` header, or the problem with it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        return f"{name!r}: data is {type(data).__name__}, not bytes"
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            header = npy_format.read_array_header_1_0(stream, max_header_size=MAX_NPY_HEADER)
        elif version in ((2, 0), (3, 0)):
            header = npy_format.read_array_header_2_0(stream, max_header_size=MAX_NPY_HEADER)
        else:
            return f"{name!r}: unsupported .npy version {version}"
    except (ValueError, TypeError, SyntaxError, EOFError) as e:
        return f"{name!r}: data is not a valid .npy array ({e})"
    shape, _, dtype = header
    return tuple(shape), dtype, stream.tell()


def _check_one(name: str, array: Any, max_bytes: int) -> tuple[int, str]:
    """Declared value bytes of one array and its problem ('' when none)."""
    stype = getattr(array, "stype", None)
    if stype != NUMPY_STYPE:
        return 0, f"{name!r}: serialisation {stype!r} is not {NUMPY_STYPE!r}"
    dtype_name = getattr(array, "dtype", None)
    shape: Any = getattr(array, "shape", None)
    # Flower's legacy ``Parameters`` conversion (used by SecAgg+) declares neither dtype nor
    # shape: then the .npy header is the declaration, checked by the same rules
    legacy = dtype_name == "" and isinstance(shape, tuple | list) and len(shape) == 0
    size = 0
    if not legacy:
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            return 0, f"{name!r}: dtype {dtype_name!r} is not one of {sorted(ALLOWED_DTYPES)}"
        if problem := _shape_problem(name, shape, "declared"):
            return 0, problem
        dtype = np.dtype(dtype_name)
        size = math.prod(shape) * dtype.itemsize
        if size > max_bytes:
            return size, (
                f"{name!r}: shape {tuple(shape)} of {dtype.name} declares {size} bytes, "
                f"over the bound of {max_bytes} bytes"
            )
    header = _header(name, getattr(array, "data", None))
    if isinstance(header, str):
        return size, header
    header_shape, header_dtype, offset = header
    if legacy:
        if problem := _shape_problem(name, header_shape, "header") or _dtype_problem(
            name, header_dtype, "header"
        ):
            return 0, problem
        shape, dtype = header_shape, header_dtype
        size = math.prod(shape) * dtype.itemsize
        if size > max_bytes:
            return size, (
                f"{name!r}: header shape {shape} of {dtype.name} declares {size} bytes, "
                f"over the bound of {max_bytes} bytes"
            )
    elif header_shape != tuple(shape) or header_dtype != dtype:
        return size, (
            f"{name!r}: the data's header says shape {header_shape} dtype "
            f"{header_dtype.str}, but the array declares shape {tuple(shape)} dtype {dtype.name}"
        )
    held = len(array.data) - offset
    if held != size:
        return size, (
            f"{name!r}: data holds {held} bytes of values, but shape {tuple(shape)} of "
            f"{dtype.name} needs {size}"
        )
    return size, ""


def check_arrays(arrays: Mapping[str, Any], *, max_bytes: int, what: str) -> int:
    """Check every array of a message before anything is decoded.

    Parameters
    ----------
    arrays : Mapping[str, Any]
        Name -> array with ``dtype``, ``shape``, ``stype`` and ``data`` (Flower's ``Array``).
    max_bytes : int
        Bound on each array's and on all arrays' declared value bytes.
    what : str
        What the arrays are (``"request from the coordinator"``), for the error.

    Returns
    -------
    int
        The declared value bytes of all arrays.

    Raises
    ------
    ArrayBoundError
        Listing every problem at once: bad serialisation, dtype or shape, a header or data
        length that disagrees with the declaration, or a size over ``max_bytes``.
    """
    problems: list[str] = []
    if len(arrays) > MAX_ARRAYS:
        problems.append(f"{len(arrays)} arrays, more than {MAX_ARRAYS}")
    total = 0
    for name, array in list(arrays.items())[: MAX_ARRAYS + 1]:
        size, problem = _check_one(name, array, max_bytes)
        total += size
        if problem:
            problems.append(problem)
    if total > max_bytes:
        problems.append(f"the arrays declare {total} bytes in all, over the bound of {max_bytes}")
    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        listed = "; ".join(shown) + (f"; and {more} more" if more else "")
        raise ArrayBoundError(
            f"{what}: {len(problems)} array problem(s): {listed} "
            f"(the bound is set by the plan's model size and '{LIMIT_KEY}')"
        )
    return total


def decode_arrays(arrays: Mapping[str, Any], *, max_bytes: int, what: str) -> dict[str, Tensor]:
    """Check (see :func:`check_arrays`), then decode the arrays into tensors.

    Parameters
    ----------
    arrays : Mapping[str, Any]
        Name -> Flower ``Array`` (or any object with the same four attributes).
    max_bytes : int
        Bound on each array's and on all arrays' declared value bytes.
    what : str
        What the arrays are, for the error.

    Returns
    -------
    dict[str, Tensor]
        The tensors, in the order of ``arrays``.

    Raises
    ------
    ArrayBoundError
        Any array is malformed or over the bound; nothing is decoded then.
    """
    check_arrays(arrays, max_bytes=max_bytes, what=what)
    return {
        name: torch.from_numpy(np.load(io.BytesIO(array.data), allow_pickle=False))
        for name, array in arrays.items()
    }


@lru_cache(maxsize=16)
def _plan_bytes(plan_json: str) -> int:
    from unicon_model.model import UniconModel  # the model pulls in MONAI: import late

    plan = Plan.model_validate_json(plan_json)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = UniconModel.from_plan(plan)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dim = pooled_size(plan.model.widths)
    for stage in plan.stages:
        if stage.is_analytic:
            for task in stage.add_tasks:
                k = task.num_outputs
                total += 8 * (1 + dim + k + dim * dim + dim * k)  # float64 ridge statistics
    return int(total)  # state_dict() values are typed Any


def plan_message_bytes(plan: Plan) -> int:
    """Bound on the array bytes of any message of ``plan``, in either direction.

    The model grown through every stage (built on the ``meta`` device: no allocation) plus
    the float64 statistics of every analytic task, times :data:`HEADROOM`, plus
    :data:`SLACK_BYTES`. A request holds at most the model; a reply at most the trained
    components or the statistics.

    Parameters
    ----------
    plan : Plan
        The validated plan.

    Returns
    -------
    int
        The bound in bytes.
    """
    return int(HEADROOM * _plan_bytes(plan.model_dump_json())) + SLACK_BYTES


def limit_from_config(config: Mapping[str, Any], *, source: str) -> int:
    """The fixed limit ``max-message-mb`` of a node or run config, in bytes.

    Parameters
    ----------
    config : Mapping[str, Any]
        Node config (site) or run config (coordinator).
    source : str
        Where the value comes from, for the error (``"node config"``).

    Returns
    -------
    int
        :data:`DEFAULT_MAX_MESSAGE_BYTES` when the key is absent.

    Raises
    ------
    ArrayBoundError
        The value is not a positive finite number of MiB.
    """
    raw = config.get(LIMIT_KEY)
    if raw is None:
        return DEFAULT_MAX_MESSAGE_BYTES
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ArrayBoundError(
            f"{source} '{LIMIT_KEY}' = {raw!r}: give a positive number of MiB (e.g. 2048)"
        )
    return max(1, int(value * _MIB))


def message_bound(plan: Plan | None, limit: int) -> int:
    """The bound in force: the plan-derived one, capped by the fixed ``limit``.

    Parameters
    ----------
    plan : Plan or None
        The plan of the run (``None``: only the fixed limit applies).
    limit : int
        The fixed limit in bytes (:func:`limit_from_config`).

    Returns
    -------
    int
        Bytes.
    """
    if plan is None:
        return limit
    return min(limit, plan_message_bytes(plan))
