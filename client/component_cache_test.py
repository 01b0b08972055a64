"""Tests of the content-addressed component cache: round trip, dedup, corruption, LRU."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client import component_cache
from client.component_cache import (
    ComponentCache,
    UnsafeFileError,
    check_safetensors_file,
    load_safetensors,
)
from unicon_model.checkpoint import tensor_digest


def component(value: float, n: int = 256) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((n,), value), "bias": torch.arange(4, dtype=torch.int64)}


def test_put_get_round_trip_returns_equal_tensors(tmp_path: Path) -> None:
    # Prepare
    cache = ComponentCache(tmp_path / "components")
    tensors = {
        "enc.weight": torch.linspace(-1.0, 1.0, 12).reshape(3, 4),
        "enc.bias": torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64),
        "steps": torch.tensor([7], dtype=torch.int32),
    }
    # Execute
    digest = cache.put(tensors)
    loaded = cache.get(digest)
    # Assert
    assert digest == tensor_digest(tensors)
    assert len(digest) == 64
    assert loaded is not None
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert loaded[key].shape == value.shape
        assert torch.equal(loaded[key], value)
    assert loaded["enc.weight"][2, 3].item() == pytest.approx(1.0)
    on_disk = load_file(str(tmp_path / "components" / f"{digest}.safetensors"))
    assert torch.equal(on_disk["enc.bias"], tensors["enc.bias"])
    assert digest in cache
    assert ("0" * 64) not in cache
    assert cache.get("f" * 64) is None


def test_same_tensors_give_same_digest_and_one_file(tmp_path: Path) -> None:
    # Prepare
    cache = ComponentCache(tmp_path)
    a = component(3.0)
    a_copy = {k: v.clone() for k, v in a.items()}
    b = component(4.0)
    # Execute
    d1 = cache.put(a)
    d2 = cache.put(a_copy)
    d3 = cache.put(b)
    # Assert
    assert d1 == d2 != d3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{d1}.safetensors", f"{d3}.safetensors"]
    )
    assert cache.digests() == sorted([d1, d3])


def test_shared_and_non_contiguous_tensors_are_stored(tmp_path: Path) -> None:
    # Prepare
    cache = ComponentCache(tmp_path)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": base, "w_tied": base, "w_t": base.t()}
    # Execute
    loaded = cache.get(cache.put(tensors))
    # Assert
    assert loaded is not None
    assert torch.equal(loaded["w_tied"], base)
    assert loaded["w_t"][3, 2].item() == 11.0


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_file_is_deleted_and_reported_as_miss(tmp_path: Path, where: str) -> None:
    # Prepare
    cache = ComponentCache(tmp_path)
    digest = cache.put(component(1.0))
    path = tmp_path / f"{digest}.safetensors"
    data = bytearray(path.read_bytes())
    index = len(data) - 3 if where == "data" else 10
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    # Execute
    result = cache.get(digest)
    # Assert
    assert result is None
    assert not path.exists()
    assert digest not in cache
    assert cache.digests() == []


def test_eviction_removes_least_recently_used_first(tmp_path: Path) -> None:
    # Prepare
    unlimited = ComponentCache(tmp_path)
    a, b, c, d = (unlimited.put(component(float(i))) for i in range(4))
    size = (tmp_path / f"{a}.safetensors").stat().st_size
    assert all((tmp_path / f"{x}.safetensors").stat().st_size == size for x in (b, c, d))
    assert unlimited.size_bytes() == 4 * size
    assert unlimited.evict() == []
    assert unlimited.get(a) is not None  # a becomes the most recently used
    limited = ComponentCache(tmp_path, max_bytes=2 * size)
    # Execute
    removed = limited.evict()
    # Assert
    assert removed == [b, c]
    assert limited.digests() == sorted([d, a])
    assert limited.size_bytes() == 2 * size


def test_put_over_the_limit_evicts_lru_but_keeps_the_new_entry(tmp_path: Path) -> None:
    # Prepare
    probe = ComponentCache(tmp_path / "probe")
    size = (tmp_path / "probe" / f"{probe.put(component(9.0))}.safetensors").stat().st_size
    cache = ComponentCache(tmp_path / "c", max_bytes=2 * size)
    a = cache.put(component(0.0))
    b = cache.put(component(1.0))
    assert cache.get(a) is not None  # order now: b (oldest), a
    # Execute
    c = cache.put(component(2.0))
    # Assert
    assert set(cache.digests()) == {a, c}
    assert cache.get(b) is None
    tiny = ComponentCache(tmp_path / "t", max_bytes=size // 2)
    e = tiny.put(component(5.0))
    assert tiny.digests() == [e]  # the entry just put is never evicted by its own put


@pytest.mark.parametrize("bad", ["../x", "A" * 64, "0" * 63, "0" * 65, "../" + "0" * 61, 5])
def test_invalid_digest_raises_value_error(tmp_path: Path, bad: object) -> None:
    # Prepare
    cache = ComponentCache(tmp_path)
    # Execute / Assert
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        cache.get(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        _ = bad in cache
    assert os.listdir(tmp_path) == []


def test_negative_max_bytes_rejected(tmp_path: Path) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="max_bytes"):
        ComponentCache(tmp_path, max_bytes=-1)


def test_an_oversized_entry_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an entry written by an unbounded cache, read back by a bounded one
    digest = ComponentCache(tmp_path).put(component(1.0))
    path = tmp_path / f"{digest}.safetensors"
    bounded = ComponentCache(tmp_path, max_entry_bytes=path.stat().st_size - 1)
    decoded: list[str] = []
    monkeypatch.setattr(component_cache, "load_file", lambda *a, **k: decoded.append("x"))
    # Execute
    result = bounded.get(digest)
    # Assert: a miss, the file deleted, nothing decoded
    assert result is None and decoded == [] and not path.exists()


def test_a_crafted_header_length_is_refused_before_decoding(tmp_path: Path) -> None:
    # Prepare: a 16-byte file claiming a 2**40-byte header
    cache = ComponentCache(tmp_path)
    digest = "0" * 64
    path = tmp_path / f"{digest}.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}      ")
    # Execute / Assert
    with pytest.raises(UnsafeFileError, match="header claims 1099511627776 bytes"):
        check_safetensors_file(path, max_bytes=1024)
    assert cache.get(digest) is None and not path.exists()
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01")
    with pytest.raises(UnsafeFileError, match="too short"):
        load_safetensors(short)


def test_a_component_over_the_entry_bound_is_not_stored(tmp_path: Path) -> None:
    cache = ComponentCache(tmp_path, max_entry_bytes=64)
    digest = cache.put(component(1.0))
    assert digest == tensor_digest(component(1.0))
    assert cache.digests() == []
    with pytest.raises(ValueError, match="max_entry_bytes"):
        ComponentCache(tmp_path, max_entry_bytes=0)


def test_cache_entries_are_private(tmp_path: Path) -> None:
    cache = ComponentCache(tmp_path / "c")
    path = cache.path_of(cache.put(component(2.0)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700


def test_put_does_not_fsync_because_get_verifies_the_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache entry is not fsynced (issue 16: it was a steady-state cost of every round);
    what makes that safe is that a torn entry is caught by the digest on the next get."""
    cache = ComponentCache(tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    digest = cache.put({"w": torch.arange(6.0)})
    assert calls == []
    path = cache.path_of(digest)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a power loss's torn file
    assert cache.get(digest) is None
    assert not path.exists()
