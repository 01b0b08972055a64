"""Transport bounds: arrays are checked against a bound and their own bytes before decoding.

A peer controls every field of a Flower ``Array``: its declared shape and dtype, the ``.npy``
header inside its data, and the data's length. None of them may crash an adapter or make it
allocate what the data does not hold.
"""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from numpy.lib import format as npy_format

from client.client_app import app as client_app
from server.server_app import GridTransport
from server.transport import Outgoing
from tests.conftest import tiny_plan
from unicon_model import protocol, wire
from unicon_model.model import UniconModel
from unicon_model.schema import validate_plan

TERA = 10**12


def npy(shape: tuple[int, ...], descr: str = "<f4", values: bytes = b"") -> bytes:
    """A ``.npy`` file whose header declares ``shape`` but which holds only ``values``."""
    stream = io.BytesIO()
    npy_format.write_array_header_1_0(
        stream, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return stream.getvalue() + values


def crafted(shape: tuple[int, ...], dtype: str = "float32", data: bytes | None = None) -> Array:
    """An Array declaring ``shape``: by default its header agrees, but 16 bytes of data."""
    return Array(
        dtype=dtype,
        shape=shape,
        stype="numpy.ndarray",
        data=npy(shape, values=b"\0" * 16) if data is None else data,
    )


def test_a_declared_trillion_elements_is_refused_without_allocating() -> None:
    record = ArrayRecord({"backbone.w": crafted((TERA,))})
    tracemalloc.start()
    try:
        with pytest.raises(wire.ArrayBoundError) as info:
            wire.decode_arrays(record, max_bytes=wire.DEFAULT_MAX_MESSAGE_BYTES, what="request")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "request" in message and "'backbone.w'" in message
    assert f"declares {4 * TERA} bytes" in message and "over the bound" in message
    assert peak < 1 << 20  # nothing near the declared size was allocated


def test_bytes_that_disagree_with_the_declaration_are_refused() -> None:
    small = np.arange(6, dtype=np.float32)
    stream = io.BytesIO()
    np.save(stream, small)
    arrays = {
        # declared within the bound, but the data holds 16 bytes, not 4000
        "short": crafted((1000,)),
        # the array says (2, 3); the header inside the data says 10^12 elements
        "lying-header": crafted((2, 3), data=npy((TERA,), values=b"\0" * 24)),
        # header and declaration agree, data is too long
        "long": crafted((2,), data=npy((2,), values=b"\0" * 64)),
        # dtype in the header differs from the declared one
        "dtype": crafted((6,), dtype="float64", data=stream.getvalue()),
        "garbage": crafted((2,), data=b"not an npy file at all"),
    }
    with pytest.raises(wire.ArrayBoundError) as info:
        wire.check_arrays(arrays, max_bytes=1 << 20, what="reply arrays")
    message = str(info.value)
    assert "5 array problem(s)" in message  # every problem at once
    assert "'short': data holds 16 bytes of values, but shape (1000,) of float32 needs 4000" in (
        message
    )
    assert "'lying-header': the data's header says shape (1000000000000,)" in message
    assert "'long': data holds 64 bytes" in message
    assert "'dtype': the data's header says shape (6,) dtype <f4" in message
    assert "'garbage': data is not a valid .npy array" in message


def test_bad_declarations_are_all_reported() -> None:
    arrays = {
        "pickled": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b""),
        "other-stype": Array(dtype="float32", shape=(1,), stype="torch.save", data=b""),
        "negative": Array(dtype="float32", shape=(-1, 4), stype="numpy.ndarray", data=b""),
        "deep": Array(dtype="float32", shape=(1,) * 9, stype="numpy.ndarray", data=b""),
        "big": crafted((1024, 1024)),
    }
    with pytest.raises(wire.ArrayBoundError) as info:
        wire.check_arrays(arrays, max_bytes=1 << 20, what="request")
    message = str(info.value)
    assert "'pickled': dtype 'object' is not one of" in message
    assert "'other-stype': serialisation 'torch.save'" in message
    assert (
        "'negative': declared shape (-1, 4) is not a list of at most 8 non-negative integers"
        in message
    )
    assert "'deep': declared shape" in message
    assert "'big': shape (1024, 1024) of float32 declares 4194304 bytes" in message
    assert "max-message-mb" in message


def legacy(data: bytes) -> Array:
    """How Flower's legacy ``Parameters`` conversion (SecAgg+) carries an array."""
    return Array(dtype="", shape=(), stype="numpy.ndarray", data=data)


def test_legacy_arrays_are_checked_by_their_header() -> None:
    stream = io.BytesIO()
    np.save(stream, np.arange(6, dtype=np.int64).reshape(2, 3))
    good = {"0": legacy(stream.getvalue())}
    assert wire.check_arrays(good, max_bytes=1 << 20, what="secure request") == 48
    decoded = wire.decode_arrays(good, max_bytes=1 << 20, what="secure request")
    assert decoded["0"].tolist() == [[0, 1, 2], [3, 4, 5]]
    bad = {
        "0": legacy(npy((TERA,), values=b"\0" * 16)),
        "1": legacy(npy((4,), descr="|O", values=b"\0" * 32)),
        "2": legacy(npy((2,), descr=">f4", values=b"\0" * 8)),
        "3": legacy(npy((4,), values=b"\0" * 8)),
    }
    with pytest.raises(wire.ArrayBoundError) as info:
        wire.check_arrays(bad, max_bytes=1 << 20, what="secure request")
    message = str(info.value)
    assert "5 array problem(s)" in message  # 4 arrays and their total
    assert f"'0': header shape (1000000000000,) of float32 declares {4 * TERA} bytes" in message
    assert "'1': header dtype '|O' is not one of" in message
    assert "'2': header dtype '>f4' is not one of" in message
    assert "'3': data holds 8 bytes of values, but shape (4,) of float32 needs 16" in message


def test_total_size_is_bounded_too() -> None:
    one = torch.zeros(200, dtype=torch.float32)  # 800 bytes each
    record = ArrayRecord({f"w{i}": one for i in range(3)})
    with pytest.raises(wire.ArrayBoundError, match="2400 bytes in all, over the bound of 2000"):
        wire.check_arrays(record, max_bytes=2000, what="reply")
    assert wire.check_arrays(record, max_bytes=2400, what="reply") == 2400


def test_valid_arrays_decode_like_flower(plan_model: UniconModel) -> None:
    state = plan_model.state_dict()
    state["fortran"] = torch.arange(6.0).reshape(2, 3).t()  # a transposed view
    record = ArrayRecord(dict(state))
    decoded = wire.decode_arrays(record, max_bytes=1 << 30, what="request")
    expected = record.to_torch_state_dict()
    assert list(decoded) == list(expected)
    for key, value in expected.items():
        assert torch.equal(decoded[key], value) and decoded[key].dtype == value.dtype


@pytest.fixture
def plan_model() -> UniconModel:
    return UniconModel.from_plan(validate_plan(tiny_plan()))


def test_plan_bound_follows_the_model_size(plan_model: UniconModel) -> None:
    plan = validate_plan(tiny_plan())
    model_bytes = sum(t.numel() * t.element_size() for t in plan_model.state_dict().values())
    bound = wire.plan_message_bytes(plan)
    assert bound == int(wire.HEADROOM * model_bytes) + wire.SLACK_BYTES
    assert wire.message_bound(plan, 1000) == 1000  # the fixed limit caps it
    assert wire.message_bound(plan, 1 << 40) == bound
    assert wire.message_bound(None, 1234) == 1234


@pytest.mark.parametrize("raw", ["abc", -1, 0, "inf", "nan"])
def test_bad_fixed_limit_is_named(raw: object) -> None:
    with pytest.raises(wire.ArrayBoundError, match=r"node config 'max-message-mb' = .*positive"):
        wire.limit_from_config({"max-message-mb": raw}, source="node config")


def test_fixed_limit_in_mib() -> None:
    assert wire.limit_from_config({}, source="x") == wire.DEFAULT_MAX_MESSAGE_BYTES
    assert wire.limit_from_config({"max-message-mb": 2}, source="x") == 2 << 20


# --------------------------------------------------------------------------- ClientApp


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_client_app_answers_invalid_to_a_crafted_array(tmp_path: Path) -> None:
    node: dict[str, bool | float | int | str] = {
        "manifest": str(tmp_path / "no-manifest.yaml"),
        "state-dir": str(tmp_path / "s"),
    }
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    content = RecordDict({protocol.ARRAYS: ArrayRecord({"backbone.w": crafted((TERA,))})})
    reply = client_app(Message(content, dst_node_id=1, message_type="train"), context)
    assert reply.has_error() and reply.error.code == protocol.ERROR_INVALID
    assert "request record 'arrays'" in str(reply.error.reason)
    assert "'backbone.w'" in str(reply.error.reason) and "over the bound" in str(reply.error.reason)
    assert not (tmp_path / "s").exists()  # refused before the site was even opened


def test_client_app_bounds_a_request_by_its_plan(sites_dir: Path, tmp_path: Path) -> None:
    node: dict[str, bool | float | int | str] = {
        "manifest": str(sites_dir / "hospital-a" / "manifest.yaml"),
        "state-dir": str(tmp_path),
    }
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    assert not client_app(
        Message(RecordDict(), dst_node_id=1, message_type="query"), context
    ).has_error()
    stored = _files(tmp_path)
    plan = validate_plan(tiny_plan())
    bound = wire.plan_message_bytes(plan)
    request = protocol.StageRequest(
        plan=plan, stage="foundation", server_round=1, run="run-1", digests={}
    )
    oversized = torch.zeros(bound // 4 + 1, dtype=torch.float32)  # well-formed, too large
    content = RecordDict(
        {
            protocol.CONFIG: ConfigRecord(request.to_config()),
            protocol.ARRAYS: ArrayRecord({"backbone.extra": oversized}),
        }
    )
    reply = client_app(Message(content, dst_node_id=1, message_type="train"), context)
    assert reply.has_error() and reply.error.code == protocol.ERROR_INVALID
    assert f"over the bound of {bound} bytes" in str(reply.error.reason)
    assert _files(tmp_path) == stored  # nothing stored was added or changed


# --------------------------------------------------------------------------- ServerApp


class FakeGrid:
    """Answers each message with the content ``replies`` gives for its node."""

    def __init__(self, replies: dict[int, RecordDict]) -> None:
        self.replies = replies

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [Message(self.replies[m.metadata.dst_node_id], reply_to=m) for m in messages]


def test_server_drops_only_the_site_whose_reply_is_malformed() -> None:
    good = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({"w": torch.ones(3)}),
            protocol.METRICS: MetricRecord({"num-examples": 4}),
            protocol.CONFIG: ConfigRecord({"site": "a"}),
        }
    )
    huge = RecordDict({protocol.ARRAYS: ArrayRecord({"w": crafted((TERA,))})})
    too_big = RecordDict({protocol.ARRAYS: ArrayRecord({"w": torch.zeros(1000)})})
    listed = RecordDict({protocol.METRICS: MetricRecord({"num-examples": [1, 2]})})
    side = RecordDict(
        {protocol.ARRAYS: ArrayRecord(), "extra": ArrayRecord({"x": crafted((5, 5))})}
    )
    grid = FakeGrid({1: good, 2: huge, 3: too_big, 4: listed, 5: side})
    transport = GridTransport(grid, max_message_bytes=2000)  # type: ignore[arg-type]
    messages = [Outgoing(n, "train", {"k": "v"}, {}) for n in grid.replies]
    replies = transport.exchange(messages, timeout=1)
    assert [r.node_id for r in replies] == [1, 2, 3, 4, 5]
    assert replies[0].ok and torch.equal(replies[0].arrays["w"], torch.ones(3))
    assert replies[0].metrics == {"num-examples": 4.0} and replies[0].config == {"site": "a"}
    for reply in replies[1:]:
        assert reply.error_code == protocol.ERROR_INVALID
        assert reply.error_reason.startswith("reply refused:")
    assert "'w': shape (1000000000000,)" in replies[1].error_reason
    assert "4000 bytes, over the bound of 2000" in replies[2].error_reason
    assert "metric 'num-examples' is a list" in replies[3].error_reason
    assert "reply record 'extra'" in replies[4].error_reason
