"""A fake `pycuda.driver` for tests: the part of pycuda's API the TensorRT backend uses, on the CPU.

Device memory is host bytes behind integer addresses; a Stream queues its copies and kernels (the fake
TensorRT's execute_async_v3 included) and runs them only at synchronize(), so code that reads a result
before synchronizing reads stale memory, as on a GPU. Allocations, copies and streams need a pushed
context, as pycuda's do. The GPU it reports is chosen by reset(gpu).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


class Error(Exception):
    """pycuda.driver.Error."""


class LogicError(Error):
    """pycuda.driver.LogicError: an API misuse, e.g. no current context."""


class device_attribute(enum.IntEnum):  # noqa: N801 - pycuda's spelling
    MULTIPROCESSOR_COUNT = 16


@dataclass(frozen=True)
class GpuSpec:
    name: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    total_memory: int  # bytes


# What pycuda reports on these modules (Jetson: the memory the GPU shares with the CPU, less carve-outs).
ORIN_NANO_8GB = GpuSpec("Orin", (8, 7), 8, 7_990_000_000)
AGX_ORIN_32GB = GpuSpec("Orin", (8, 7), 14, 31_350_000_000)
XAVIER_NX = GpuSpec("Xavier", (7, 2), 6, 7_750_000_000)

_state: dict[str, Any] = {}


def reset(gpu: GpuSpec | None = ORIN_NANO_8GB) -> None:
    """Forget every allocation, stream and context; gpu None: a machine where CUDA finds no device."""
    _state.clear()
    _state.update(gpu=gpu, initialised=False, contexts=[], memory={}, streams={}, next_address=0x7F00_0000_0000, handles=itertools.count(1))


reset()


def init() -> None:
    _state["initialised"] = True


def _require_context(what: str) -> None:
    if not _state["contexts"]:
        raise LogicError(f"{what} failed: invalid device context - no currently active context?")


class Context:
    def push(self) -> None:
        _state["contexts"].append(self)

    @staticmethod
    def pop() -> None:
        if not _state["contexts"]:
            raise LogicError("context::pop failed: no context to pop")
        _state["contexts"].pop()


class Device:
    def __init__(self, ordinal: int):
        if ordinal >= Device.count():
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")
        self._gpu: GpuSpec = _state["gpu"]

    @staticmethod
    def count() -> int:
        if not _state["initialised"]:
            raise LogicError("cuDeviceGetCount failed: initialization error (call init() first)")
        return 0 if _state["gpu"] is None else 1

    def name(self) -> str:
        return self._gpu.name

    def compute_capability(self) -> tuple[int, int]:
        return self._gpu.compute_capability

    def total_memory(self) -> int:
        return self._gpu.total_memory

    def get_attribute(self, attribute: device_attribute) -> int:
        if attribute != device_attribute.MULTIPROCESSOR_COUNT:
            raise NotImplementedError(f"the fake reports only MULTIPROCESSOR_COUNT, not {attribute!r}")
        return self._gpu.multiprocessors

    def retain_primary_context(self) -> Context:
        return Context()


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self.address = _state["next_address"]
        _state["next_address"] += (nbytes + 0xFFFF) // 0x10000 * 0x10000 + 0x10000  # aligned, with a gap, like cudaMalloc's
        _state["memory"][self.address] = np.zeros(nbytes, np.uint8)

    def __int__(self) -> int:
        return self.address

    __index__ = __int__

    def free(self) -> None:
        _state["memory"].pop(self.address, None)


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _require_context("cuMemAlloc")
    if nbytes <= 0:
        raise LogicError("cuMemAlloc failed: invalid argument (0 bytes)")
    return DeviceAllocation(int(nbytes))


def device_bytes(address: int, nbytes: int) -> np.ndarray:
    """The device memory [address, address + nbytes) as a writable uint8 view; out of bounds is an error, as on a GPU."""
    for base, block in _state["memory"].items():
        if base <= address < base + block.size:
            if address + nbytes > base + block.size:
                raise LogicError(f"illegal memory access: {nbytes} bytes at {address:#x} overrun an allocation of {block.size}")
            return block[address - base : address - base + nbytes]
    raise LogicError(f"illegal memory access: {address:#x} is not device memory")


def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype)


class Stream:
    def __init__(self) -> None:
        _require_context("cuStreamCreate")
        self.handle = 0x5000_0000 + next(_state["handles"])
        self._queued: list[Callable[[], None]] = []
        _state["streams"][self.handle] = self

    def enqueue(self, work: Callable[[], None]) -> None:
        self._queued.append(work)

    def synchronize(self) -> None:
        _require_context("cuStreamSynchronize")
        queued, self._queued = self._queued, []
        for work in queued:
            work()


def stream_for(handle: int) -> Stream:
    """The Stream behind a raw handle (TensorRT is handed `stream.handle`)."""
    if handle not in _state["streams"]:
        raise LogicError(f"invalid stream handle {handle:#x}")
    return _state["streams"][handle]


def memcpy_htod_async(destination: Any, source: np.ndarray, stream: Stream) -> None:
    _require_context("cuMemcpyHtoDAsync")
    stream.enqueue(lambda: device_bytes(int(destination), source.nbytes).__setitem__(slice(None), source.reshape(-1).view(np.uint8)))


def memcpy_dtoh_async(destination: np.ndarray, source: Any, stream: Stream) -> None:
    _require_context("cuMemcpyDtoHAsync")
    stream.enqueue(lambda: destination.reshape(-1).view(np.uint8).__setitem__(slice(None), device_bytes(int(source), destination.nbytes)))
