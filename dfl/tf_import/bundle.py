"""Pure-Python reader of TensorFlow's tensor-bundle checkpoints (``PREFIX.index`` + ``PREFIX.data-*``).

The ``.index`` file is a LevelDB-style sorted table: data blocks of prefix-compressed
``key → value`` entries (with a restart array at the end of each block), an index block
pointing at them, and a 48-byte footer with a magic number. The value for the empty key is a
``BundleHeaderProto``; every other key is a variable name whose value is a ``BundleEntryProto``
(dtype, shape, shard, offset, size, crc32c) locating the raw little-endian tensor bytes in
``PREFIX.data-SSSSS-of-NNNNN``. The few protobuf messages involved are decoded by hand so no
TensorFlow or protobuf runtime is needed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
NO_COMPRESSION = 0
COMPRESSION_NAMES = {1: "snappy", 2: "zlib"}

# tensorflow/core/framework/types.proto: DataType → numpy dtype (little endian).
TF_DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    8: np.dtype("<c8"),  # DT_COMPLEX64
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
TF_DTYPE_NAMES = {7: "string", 14: "bfloat16", 20: "resource", 21: "variant"}


class CheckpointFormatError(ValueError):
    """A file that is not a readable TF tensor-bundle checkpoint; the message names the file."""


# ---------------------------------------------------------------------------------------------
# crc32c (Castagnoli), as TF uses it for table blocks and tensor data.


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """crc32c of ``data``, continuing from ``crc`` (table-driven; ~8 MB/s, ample for checkpoints)."""
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB/TF masked crc: rotate right by 15 and add a constant (stored crcs are masked)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Minimal protobuf wire-format decoding.


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def parse_fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """Protobuf message → list of (field number, wire type, value); length-delimited values are bytes."""
    fields = []
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64 field")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32 field")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, wire, value))
    return fields


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives (a decoded ``BundleEntryProto``)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored
    sliced: bool

    @property
    def dtype_name(self) -> str:
        np_dtype = TF_DTYPES.get(self.dtype)
        return (
            str(np_dtype) if np_dtype is not None else TF_DTYPE_NAMES.get(self.dtype, f"dtype#{self.dtype}")
        )


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, _, value in parse_fields(buf):
        if number == 2:  # repeated Dim dim
            size = 0
            for n, _, v in parse_fields(value):
                if n == 1:
                    size = _signed64(v)
            dims.append(size)
        elif number == 3 and value:  # unknown_rank
            raise ValueError("tensor of unknown rank")
    return tuple(dims)


def parse_entry(name: str, buf: bytes) -> BundleEntry:
    """Decode a ``BundleEntryProto``."""
    dtype, shape, shard, offset, size, crc, sliced = 0, (), 0, 0, 0, None, False
    for number, _, value in parse_fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _parse_shape(value)
        elif number == 3:
            shard = value
        elif number == 4:
            offset = _signed64(value)
        elif number == 5:
            size = _signed64(value)
        elif number == 6:
            crc = value
        elif number == 7:
            sliced = True
    return BundleEntry(name, dtype, shape, shard, offset, size, crc, sliced)


def parse_header(buf: bytes) -> dict:
    """Decode a ``BundleHeaderProto``: num_shards, endianness (0 little, 1 big), version."""
    header = {"num_shards": 1, "endianness": 0, "version": 0}
    for number, _, value in parse_fields(buf):
        if number == 1:
            header["num_shards"] = value
        elif number == 2:
            header["endianness"] = value
        elif number == 3:
            for n, _, v in parse_fields(value):
                if n == 1:
                    header["version"] = v
    return header


# ---------------------------------------------------------------------------------------------
# Sorted-table (.index) reading.


def _read_block(data: bytes, offset: int, size: int, path: Path, verify: bool) -> bytes:
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointFormatError(
            f"{path}: block at offset {offset} (size {size}) runs past the end of the file"
        )
    contents = data[offset:end]
    kind = data[end]
    if kind != NO_COMPRESSION:
        name = COMPRESSION_NAMES.get(kind, f"type {kind}")
        raise CheckpointFormatError(
            f"{path}: index block at offset {offset} is {name}-compressed; only uncompressed "
            "index blocks (TensorFlow's default) are supported"
        )
    if verify:
        stored = struct.unpack_from("<I", data, end + 1)[0]
        if mask_crc(crc32c(data[offset : end + 1])) != stored:
            raise CheckpointFormatError(
                f"{path}: checksum mismatch in index block at offset {offset} (corrupt file)"
            )
    return contents


def iter_block(block: bytes):
    """Yield (key, value) of one table block, undoing the prefix compression."""
    if len(block) < 4:
        raise ValueError("block shorter than its restart count")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ValueError("restart array larger than the block")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        vlen, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise ValueError("corrupt block entry")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield bytes(key), bytes(block[pos : pos + vlen])
        pos += vlen


def _block_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return offset, size, pos


def read_table(path: str | os.PathLike, verify: bool = True) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB-format sorted table, in order."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < FOOTER_SIZE:
        raise CheckpointFormatError(f"{path}: too short to be a TF checkpoint index ({len(data)} bytes)")
    footer = data[-FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise CheckpointFormatError(f"{path}: not a TF checkpoint index (bad table magic number)")
    try:
        _, _, pos = _block_handle(footer)  # metaindex: unused by bundles
        index_offset, index_size, _ = _block_handle(footer, pos)
        index = _read_block(data, index_offset, index_size, path, verify)
        pairs = []
        for _, handle in iter_block(index):
            offset, size, _ = _block_handle(handle)
            pairs.extend(iter_block(_read_block(data, offset, size, path, verify)))
    except ValueError as exc:
        if isinstance(exc, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{path}: corrupt TF checkpoint index ({exc})") from exc
    return pairs


# ---------------------------------------------------------------------------------------------
# Bundle = index + data shards.


def _strip_prefix(prefix: str | os.PathLike) -> Path:
    """Accept the prefix TF prints (``model.ckpt``) or any of its files (``model.ckpt.index`` …)."""
    p = str(prefix)
    if p.endswith(".index"):
        return Path(p[: -len(".index")])
    if ".data-" in Path(p).name:
        return Path(p[: p.rindex(".data-")])
    return Path(p)


class TFCheckpoint:
    """A TF tensor-bundle checkpoint: ``names()``, ``entry(name)``, ``read(name)``, ``read_all()``.

    ``prefix`` is what TF calls the checkpoint (``models/se_model.ckpt``); the files are
    ``prefix.index`` and ``prefix.data-00000-of-0000N``.
    """

    def __init__(self, prefix: str | os.PathLike, verify: bool = True) -> None:
        self.prefix = _strip_prefix(prefix)
        self.verify = verify
        self.index_path = Path(f"{self.prefix}.index")
        if not self.index_path.is_file():
            raise FileNotFoundError(
                f"{self.index_path}: TF checkpoint index not found (give the checkpoint prefix, "
                f"e.g. models/se_model.ckpt, with its .index and .data-* files next to it)"
            )
        self.header: dict = {"num_shards": 1, "endianness": 0, "version": 0}
        self.entries: dict[str, BundleEntry] = {}
        for key, value in read_table(self.index_path, verify):
            try:
                if key == b"":
                    self.header = parse_header(value)
                else:
                    name = key.decode("utf-8")
                    self.entries[name] = parse_entry(name, value)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointFormatError(f"{self.index_path}: corrupt entry {key!r} ({exc})") from exc
        if self.header["endianness"] != 0:
            raise CheckpointFormatError(f"{self.index_path}: big-endian checkpoints are not supported")
        n = self.header["num_shards"]
        self.data_paths = [Path(f"{self.prefix}.data-{i:05d}-of-{n:05d}") for i in range(n)]
        missing = [str(p) for p in self.data_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{missing[0]}: TF checkpoint data file not found (index is {self.index_path})"
            )
        self._shards: dict[int, bytes] = {}

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> BundleEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"{self.prefix}: no variable {name!r} in this checkpoint") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in sorted(self.entries.items())}

    def _shard(self, shard_id: int) -> bytes:
        if shard_id not in self._shards:
            if not 0 <= shard_id < len(self.data_paths):
                raise CheckpointFormatError(f"{self.index_path}: shard {shard_id} out of range")
            self._shards[shard_id] = self.data_paths[shard_id].read_bytes()
        return self._shards[shard_id]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (a copy, native byte order)."""
        e = self.entry(name)
        where = f"{self.prefix}: variable {name!r}"
        if e.sliced:
            raise CheckpointFormatError(f"{where} is a partitioned (sliced) variable, which is not supported")
        dtype = TF_DTYPES.get(e.dtype)
        if dtype is None:
            raise CheckpointFormatError(f"{where} has dtype {e.dtype_name}, which cannot be read as an array")
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.size != count * dtype.itemsize:
            raise CheckpointFormatError(
                f"{where}: stored size {e.size} bytes does not match shape {list(e.shape)} of {dtype}"
            )
        shard = self._shard(e.shard_id)
        if e.offset < 0 or e.offset + e.size > len(shard):
            raise CheckpointFormatError(
                f"{where}: bytes {e.offset}..{e.offset + e.size} lie outside {self.data_paths[e.shard_id]} "
                f"({len(shard)} bytes; truncated file?)"
            )
        raw = shard[e.offset : e.offset + e.size]
        if self.verify and e.crc32c is not None and mask_crc(crc32c(raw)) != e.crc32c:
            raise CheckpointFormatError(
                f"{where}: crc32c mismatch in {self.data_paths[e.shard_id]} (corrupt data)"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(e.shape).astype(dtype.newbyteorder("="))

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in self.names()}
