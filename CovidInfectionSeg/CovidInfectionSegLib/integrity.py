"""Check an image file's bytes before trusting what SimpleITK reads from it.

SimpleITK (ITK 5.4) reads some damaged files without a word: a truncated ``.nii`` or ``.nii.gz`` comes
back with the missing voxels as 0, NaN and infinite voxels of a NIfTI come back as 0, and neither the
gzip checksum of NRRD data nor the zlib stream of a compressed MetaImage is verified. So
:func:`verify_image_file` streams the file once (``imageio`` runs it beside the reader, and its error
wins) and raises :class:`InputError` when

- a compressed stream (gzip ``.nii.gz``, gzip/bzip2 NRRD data, zlib MetaImage data) ends early or
  fails its checksum (a flipped byte, a cut-off copy or download),
- there are fewer data bytes than the header's dimensions and voxel type need,
- a NIfTI file with floating-point voxels holds NaN or infinite values.

A flipped byte in uncompressed voxel data cannot be found: these formats carry no checksum. Files
whose header this module does not understand are left to the reader (and its own errors).
"""

from __future__ import annotations

import bz2
import gzip
import re
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from .validation import InputError, non_finite_message

CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
DAMAGED_HINT = "the file is damaged (a changed byte, or a copy that went wrong); get a fresh copy"
TRUNCATED_HINT = "the file is incomplete (cut off while copying or downloading?); get a complete copy"

# NIfTI datatype code -> numpy dtype character (floating-point types get the NaN check).
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
# The first 4 bytes of a NIfTI-1 or NIfTI-2 header (its size, 348 or 540), either byte order.
NIFTI_HEADER_SIZES = {struct.pack(endian + "i", size) for endian in "<>" for size in (348, 540)}


def verify_image_file(path: str | Path) -> None:
    """Raise :class:`InputError` when ``path`` (NIfTI, NRRD, MetaImage, or any gzip file) is truncated,
    its compressed data is damaged, or it is a NIfTI with NaN/infinite voxels. See the module docstring."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _verify_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _verify_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _verify_metaimage(path)
    elif _starts_with(path, GZIP_MAGIC):
        _count_bytes(path, _open_gzip(path, 0))


# -------------------------------------------------------------------------------------------- NIfTI


def _verify_nifti(path: Path) -> None:
    compressed = _starts_with(path, GZIP_MAGIC)
    header = _read_prefix(path, 540, compressed)
    if len(header) < 348 and header[:4] in NIFTI_HEADER_SIZES:
        raise InputError(f"{path}: truncated: {len(header)} bytes, shorter than a NIfTI header; {TRUNCATED_HINT}")
    layout = _nifti_layout(header)
    if layout is None:  # not a header we understand: the reader decides, once the gzip stream is known good
        if compressed:
            _count_bytes(path, _open_gzip(path, 0))
        return
    offset, voxels, itemsize, dtype = layout
    counter = _NonFiniteCounter(dtype, offset) if dtype is not None else None
    if compressed:
        total = _count_bytes(path, _open_gzip(path, 0), counter)
    elif counter is not None:
        total = _count_bytes(path, _open_plain(path, 0), counter)
    else:
        total = path.stat().st_size
    _check_length(path, total - offset, voxels * itemsize, f"{voxels} voxels of {itemsize} bytes")
    if counter is not None and counter.bad:
        raise InputError(non_finite_message(str(path), counter.bad, voxels))


def _nifti_layout(header: bytes) -> tuple[int, int, int, np.dtype | None] | None:
    """(data offset, voxel count, bytes per voxel, float dtype or None) from a NIfTI-1 or -2 header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = max(352, int(struct.unpack(endian + "f", header[108:112])[0]))
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(544, struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or bitpix % 8 or any(d < 1 for d in dims[1 : rank + 1]):
        return None
    voxels = int(np.prod([int(d) for d in dims[1 : rank + 1]], dtype=np.int64))
    float_char = NIFTI_FLOAT_TYPES.get(datatype)
    return offset, voxels, bitpix // 8, np.dtype(endian + float_char) if float_char else None


class _NonFiniteCounter:
    """Counts NaN/inf among the floating-point voxels that follow ``offset`` bytes of header."""

    def __init__(self, dtype: np.dtype, offset: int):
        self.dtype, self.skip, self.bad = dtype, offset, 0
        self.carry = b""

    def __call__(self, chunk: bytes) -> None:
        if self.skip:
            dropped = min(self.skip, len(chunk))
            chunk, self.skip = chunk[dropped:], self.skip - dropped
        data = self.carry + chunk
        usable = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data[:usable], dtype=self.dtype)
        self.bad += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.carry = data[usable:]


# --------------------------------------------------------------------------------------------- NRRD


NRRD_SIZES = (("char", 1), ("int8", 1), ("short", 2), ("int16", 2), ("long", 8), ("int64", 8),
              ("double", 8), ("float", 4), ("int", 4))


def _verify_nrrd(path: Path) -> None:
    parsed = _text_header(path, b"NRRD", blank_line_ends=True)
    if parsed is None:
        return
    fields, header_end = parsed
    fields = {key.replace(" ", ""): value for key, value in fields.items()}
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("datafile")
    if data_file is not None:
        if data_file.startswith("LIST") or " " in data_file or "%" in data_file:
            return  # several data files: the reader checks them
        source, offset = path.parent / data_file, 0
    else:
        source, offset = path, header_end
    itemsize = next((size for word, size in NRRD_SIZES if word in fields.get("type", "").lower()), None)
    try:
        voxels = int(np.prod([int(value) for value in fields.get("sizes", "").split()], dtype=np.int64))
    except ValueError:
        return
    if not source.is_file() or itemsize is None or int(fields.get("lineskip", 0) or 0):
        return
    expected = voxels * itemsize + max(0, int(fields.get("byteskip", 0) or 0))
    what = f"{voxels} voxels of {itemsize} bytes ({fields.get('type')})"
    if encoding in ("gzip", "gz"):
        _check_length(path, _count_bytes(path, _open_gzip(source, offset)), expected, what)
    elif encoding in ("bzip2", "bz2"):
        _check_length(path, _count_bytes(path, _open_bzip2(source, offset)), expected, what)
    elif encoding == "raw":
        _check_length(path, source.stat().st_size - offset, expected, what)


# ---------------------------------------------------------------------------------------- MetaImage


METAIMAGE_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _verify_metaimage(path: Path) -> None:
    parsed = _text_header(path, None, last_key="ElementDataFile")
    if parsed is None:
        return
    fields, header_end = parsed
    data_file = fields.get("ElementDataFile", "")
    if data_file.upper() == "LOCAL":
        source, offset = path, header_end
    elif data_file and " " not in data_file and "%" not in data_file and not data_file.upper().startswith("LIST"):
        source, offset = path.parent / data_file, 0
    else:
        return
    itemsize = METAIMAGE_SIZES.get(fields.get("ElementType", ""))
    try:
        voxels = int(np.prod([int(value) for value in fields.get("DimSize", "").split()], dtype=np.int64))
        channels = int(fields.get("ElementNumberOfChannels", 1))
    except ValueError:
        return
    if not source.is_file() or itemsize is None or "HeaderSize" in fields:
        return
    expected = voxels * channels * itemsize
    what = f"{voxels} voxels of {itemsize} bytes ({fields['ElementType']})"
    if fields.get("CompressedData", "False").lower() == "true":
        _check_length(path, _count_bytes(path, _inflate_zlib(source, offset)), expected, what)
    else:
        _check_length(path, source.stat().st_size - offset, expected, what)


# ------------------------------------------------------------------------------------------ helpers


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def _read_prefix(path: Path, size: int, compressed: bool) -> bytes:
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            return handle.read(size)
    except (OSError, EOFError, zlib.error):
        return b""  # the full pass below reports it


def _text_header(path: Path, magic: bytes | None, blank_line_ends: bool = False,
                 last_key: str | None = None) -> tuple[dict[str, str], int] | None:
    """``key: value`` / ``Key = Value`` lines after an optional magic line, up to a blank line (NRRD)
    or ``last_key`` (MetaImage); returns the fields and the byte offset where the data start, or None
    when the file does not start with such a header."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if magic is not None and not head.startswith(magic):
        return None
    fields: dict[str, str] = {}
    position = 0 if magic is None else head.find(b"\n") + 1  # after the magic line
    while True:
        end = head.find(b"\n", position)
        if magic is not None and position == 0:
            return None
        if end < 0:
            whole_file = len(head) < 65536 and position >= len(head)
            # A detached header (.nhdr) may end with the file; otherwise it is cut off: the reader decides.
            return (fields, position) if whole_file and fields and blank_line_ends else None
        line = head[position:end].rstrip(b"\r").decode("latin-1")
        position = end + 1
        if blank_line_ends and not line:
            return fields, position
        if line.startswith("#"):
            continue
        match = re.match(r"\s*([^:=]+?)\s*(?::=|:|=)\s*(.*)$", line)
        if match is None:
            return None
        fields.setdefault(match.group(1), match.group(2).strip())
        if match.group(1) == last_key:
            return fields, position


def _open_plain(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        yield from iter(lambda: handle.read(CHUNK_BYTES), b"")


def _open_gzip(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        raw.seek(offset)
        yield from _decompressed(gzip.GzipFile(fileobj=raw, mode="rb"))


def _open_bzip2(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        raw.seek(offset)
        yield from _decompressed(bz2.BZ2File(raw, mode="rb"))


def _decompressed(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        yield from iter(lambda: stream.read(CHUNK_BYTES), b"")


def _inflate_zlib(path: Path, offset: int) -> Iterator[bytes]:
    inflater = zlib.decompressobj()
    for chunk in _open_plain(path, offset):
        yield inflater.decompress(chunk)
        if inflater.eof:
            break
    if not inflater.eof:
        raise EOFError("the zlib stream ends before its end marker")


def _count_bytes(path: Path, chunks: Iterator[bytes], consumer: Callable[[bytes], None] | None = None) -> int:
    """Consume ``chunks`` (decompressing, verifying checksums) and return how many bytes they held."""
    total = 0
    try:
        for chunk in chunks:
            total += len(chunk)
            if consumer is not None:
                consumer(chunk)
    except EOFError as error:
        raise InputError(f"{path}: truncated: the compressed data stop before their end ({error}); {TRUNCATED_HINT}") from error
    except (OSError, zlib.error, ValueError) as error:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: the compressed data are damaged ({error}); {DAMAGED_HINT}") from error
    return total


def _check_length(path: Path, have: int, need: int, what: str) -> None:
    """``have`` bytes of voxel data where the header describes ``need``: fewer is a truncated file."""
    if have < need:
        raise InputError(
            f"{path}: truncated: {max(have, 0)} bytes of voxel data where the header describes {need} "
            f"({what}); {TRUNCATED_HINT}"
        )
