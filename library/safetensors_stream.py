"""Reading and writing .safetensors files one tensor at a time, for checkpoints larger than memory.

The safetensors library writes a file only from a dict holding every tensor in memory, and reads
through a memory map; neither lets a tool rewrite a 5-20 GB checkpoint with memory near its largest
tensor. The format is simple (an 8-byte little-endian header length, a JSON header mapping names to
dtype, shape and data offsets plus optional `__metadata__` strings, then the raw little-endian
tensor bytes), so this module owns it: `read_header` parses a file's header without touching tensor
data, `read_tensor` reads one tensor with a plain file read, and `SafetensorsStreamWriter` writes a
header computed in advance (names, dtypes, shapes) and then each tensor's bytes in that order, or
copies them unchanged from a source file in small chunks. Files written here are read by the
safetensors library (the tests check it).
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Optional

from library.errors import UserError

if TYPE_CHECKING:
    import torch

COPY_CHUNK_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit

# safetensors dtype name -> (torch dtype attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
DTYPE_OF_PRECISION = {"float": "F32", "fp16": "F16", "bf16": "BF16"}  # --save_precision values


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype name, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]  # in file order (by offset)
    metadata: dict[str, str]

    def meta_tensors(self) -> dict[str, "torch.Tensor"]:
        """Shape-only stand-ins (meta device) for code that reads `.shape`/`.ndim` of a state dict."""
        import torch

        return {name: torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
                for name, info in self.tensors.items()}


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype: "torch.dtype") -> str:
    for name, (attribute, _) in DTYPES.items():
        if str(dtype) == f"torch.{attribute}":
            return name
    raise ValueError(f"safetensors cannot store {dtype}")


def element_size(name: str) -> int:
    return DTYPES[name][1]


def read_header(path: str) -> SafetensorsHeader:
    """Parse the header of `path`; UserError if it is not a readable safetensors file."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise ValueError("file shorter than a safetensors header")
            (header_size,) = struct.unpack("<Q", size_bytes)
            if header_size > MAX_HEADER_BYTES:
                raise ValueError(f"header of {header_size} bytes is too large")
            header = json.loads(f.read(header_size))
        file_size = os.path.getsize(path)
        return _parse_header(path, header, 8 + header_size, file_size)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e


def _parse_header(path: str, header: dict, data_start: int, file_size: int) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None) or {}
    tensors = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name} has unsupported dtype {dtype}")
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * element_size(dtype) or data_start + end > file_size:
            raise ValueError(f"tensor {name}: byte range does not match its shape, or the file is truncated")
        tensors.append(TensorInfo(name, dtype, shape, data_start + begin, data_start + end))
    tensors.sort(key=lambda info: info.begin)
    return SafetensorsHeader(path, {info.name: info for info in tensors}, dict(metadata))


def read_tensor(file: BinaryIO, info: TensorInfo, into: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """The tensor `info` describes, read from the open file into `into` (uint8 bytes of the right
    size, e.g. from a BufferRing) or a new CPU tensor."""
    import torch

    raw = torch.empty(info.nbytes, dtype=torch.uint8) if into is None else into
    if info.nbytes:
        file.seek(info.begin)
        if file.readinto(tensor_bytes(raw)) != info.nbytes:
            raise UserError(f"{getattr(file, 'name', 'the file')} is truncated inside tensor {info.name}")
    return raw.view(torch_dtype(info.dtype)).view(info.shape) if info.nbytes else torch.empty(
        info.shape, dtype=torch_dtype(info.dtype))


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a CPU tensor (works for bf16/fp8, which numpy lacks)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will write: its name, dtype name and shape, known before any data."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * element_size(self.dtype)


def encode_header(entries: list[OutputTensor], metadata: Optional[dict[str, str]]) -> bytes:
    """Length prefix + JSON header, padded with spaces so tensor data starts 8-byte aligned."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


# After write_bytes(block) returns, every block handed over BLOCKS_IN_FLIGHT or more calls earlier
# has been written, so a ring of BLOCKS_IN_FLIGHT + 1 buffers can be refilled safely.
BLOCKS_IN_FLIGHT = 2


class BufferRing:
    """A few reusable byte buffers taken in turn. Fresh allocations of tens of MB cost more in page
    faults than merging the tensor they hold, so streaming code refills these instead."""

    def __init__(self, nbytes: int, count: int = BLOCKS_IN_FLIGHT + 1) -> None:
        import torch

        self._buffers = [torch.empty(max(nbytes, 1), dtype=torch.uint8) for _ in range(count)]
        self._next = 0

    def take(self, nbytes: int) -> "torch.Tensor":
        """The next buffer's first nbytes, as a uint8 tensor."""
        buffer = self._buffers[self._next]
        self._next = (self._next + 1) % len(self._buffers)
        return buffer[:nbytes]

    def take_tensor(self, dtype: str, shape: tuple) -> "torch.Tensor":
        count = 1
        for dim in shape:
            count *= dim
        return self.take(count * element_size(dtype)).view(torch_dtype(dtype)).view(shape)


@dataclass(frozen=True)
class _SourceRange:
    """Bytes to copy from another open file, in the kernel where it can (os.copy_file_range, as cp
    does: no trip through this process's memory)."""

    source: BinaryIO
    offset: int
    count: int

    def copy_to(self, file: BinaryIO) -> None:
        file.flush()  # the kernel copy writes at the descriptor's position
        done = 0
        try:
            while done < self.count:
                copied = os.copy_file_range(self.source.fileno(), file.fileno(), self.count - done, self.offset + done)
                if copied == 0:
                    raise UserError(f"{getattr(self.source, 'name', 'the source file')} is truncated")
                done += copied
        except (AttributeError, OSError) as e:  # no copy_file_range here (other OS, filesystem pairs)
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self._copy_in_chunks(file, done)

    def _copy_in_chunks(self, file: BinaryIO, done: int) -> None:
        with open(self.source.name, "rb") as source:  # own handle: the caller's may be mid-read
            source.seek(self.offset + done)
            remaining = self.count - done
            while remaining:
                chunk = source.read(min(COPY_CHUNK_BYTES, remaining))
                if not chunk:
                    raise UserError(f"{source.name} is truncated")
                file.write(chunk)
                remaining -= len(chunk)


class _BackgroundWriter:
    """Writes byte blocks to a file in a thread, so the caller computes the next tensor meanwhile.

    One block waits while one is written (BLOCKS_IN_FLIGHT); an error in the thread is raised in
    the caller at its next write or at finish().
    """

    def __init__(self, file: BinaryIO) -> None:
        import queue
        import threading

        self._file, self._error = file, None
        self._queue: "queue.Queue" = queue.Queue(maxsize=BLOCKS_IN_FLIGHT - 1)
        self._thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            if self._error is None:
                try:
                    if isinstance(block, _SourceRange):
                        block.copy_to(self._file)
                    else:
                        self._file.write(block)
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, block) -> None:
        self._raise_pending()
        self._queue.put(block)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()

    def abort(self) -> None:
        """Stop the thread after a failure elsewhere (pending blocks are dropped, errors ignored)."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensor list is fixed up front, one tensor at a time.

    Tensors must be written in the order given; each must have its announced dtype and shape.
    With `background=True` the bytes reach the file from a writer thread while the caller prepares
    the next tensor: a tensor handed to write_tensor must then stay unchanged for BLOCKS_IN_FLIGHT
    further writes. `close()` waits for the writes and checks that every tensor was written.
    """

    def __init__(self, file: BinaryIO, entries: list[OutputTensor], metadata: Optional[dict[str, str]] = None,
                 background: bool = False):
        self._sink = _BackgroundWriter(file) if background else None
        self._file = file
        self._entries = entries
        self._next = 0
        self.write_bytes(encode_header(entries, metadata))

    def write_bytes(self, data) -> None:
        """The single place bytes go to the file (tests replace it to simulate a full disk)."""
        if self._sink is not None:
            self._sink.write(data)
        else:
            self._file.write(data)

    def _expect(self, name: str) -> OutputTensor:
        if self._next >= len(self._entries) or self._entries[self._next].name != name:
            expected = self._entries[self._next].name if self._next < len(self._entries) else "nothing"
            raise ValueError(f"tensor {name} written out of order (expected {expected})")
        self._next += 1
        return self._entries[self._next - 1]

    def write_tensor(self, name: str, tensor: "torch.Tensor") -> None:
        entry = self._expect(name)
        if dtype_name(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                             f"announced {entry.dtype} {entry.shape}")
        self.write_bytes(tensor_bytes(tensor))

    def copy_range(self, source: BinaryIO, offset: int, count: int) -> None:
        """Copy bytes unchanged from another file (in the kernel when writing in the background)."""
        if self._sink is not None:
            self._sink.write(_SourceRange(source, offset, count))
        else:
            _SourceRange(source, offset, count).copy_to(self._file)

    def copy_tensor(self, name: str, source: BinaryIO, info: TensorInfo) -> None:
        """Copy a tensor's bytes unchanged from an open source file."""
        entry = self._expect(name)
        if entry.dtype != info.dtype or entry.shape != info.shape:
            raise ValueError(f"tensor {name}: the source holds {info.dtype} {info.shape}")
        self.copy_range(source, info.begin, info.nbytes)

    def fill_tensor(self, name: str, block) -> None:
        """Write the tensor's bytes as `block` repeated (synthetic files for benchmarks and tests)."""
        remaining = self._expect(name).nbytes
        view = memoryview(block)
        while remaining:
            chunk = view[: min(remaining, len(view))]
            self.write_bytes(chunk)
            remaining -= len(chunk)

    def abort(self) -> None:
        """Give up on this file (the caller removes it); stops the writer thread."""
        if self._sink is not None:
            self._sink.abort()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.finish()
        if self._next != len(self._entries):
            raise ValueError(f"only {self._next} of {len(self._entries)} tensors were written")
