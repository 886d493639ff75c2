"""Is an image file complete? ``verify_complete`` compares what its header promises with what it holds.

ITK's NIfTI reader (and so ``medunet evaluate``) reads a gzip cut to 2/3 of its bytes without an error and
fills the rest with whatever it finds; training and ``check-data`` would then learn from, or pass, made-up
voxels. One check serves every reader (``medunet.data.readers`` for nibabel/SimpleITK and ``LoadImaged``,
``medunet.evaluation.cases.read_image``), so it lives here, free of MONAI and torch: ``evaluate`` imports it
without the training stack.

The header promises a voxel offset + voxels x bytes per voxel. Cheaply compared with: the file size for raw
data; for gzip, first the uncompressed size the gzip trailer records (its last four bytes), and only when that
disagrees (a truncated file, or one written as several gzip members) a streamed decompression that keeps
nothing in memory. Formats: NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd`` + ``.raw``/``.zraw``),
NRRD (``.nrrd``, ``.nhdr`` + data file; raw or gzip). DICOM files are checked by GDCM when read.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medunet.errors import MedunetError
from medunet.image_files import NIFTI_SUFFIXES, has_suffix

PathLike = str | Path


_CHUNK = 1 << 20
_METAIMAGE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                    "MET_DOUBLE": 8}
# NRRD type names after dropping "signed"/"unsigned", "_t" and spaces (the spec's equivalent spellings).
_NRRD_BYTES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "shortint": 2, "ushort": 2, "int16": 2,
               "uint16": 2, "int": 4, "uint": 4, "int32": 4, "uint32": 4, "longlong": 8, "longlongint": 8,
               "ulonglong": 8, "int64": 8, "uint64": 8, "float": 4, "double": 8}


class IncompleteFileError(MedunetError):
    """An image file holds fewer bytes than its header promises (a cut-short download, copy or export).

    Args:
        path: the file (for a MetaImage/NRRD header with detached data, the data file).
        detail: what is missing, e.g. ``"the gzip stream ends early"``.
    """

    FIX = "it was cut short (an interrupted download, copy or export); re-download or re-export it"

    def __init__(self, path: PathLike, detail: str) -> None:
        self.path, self.detail = Path(path), detail
        super().__init__(f"{path} is incomplete: {detail}. Fix: {self.FIX}.")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        """Rebuild from (path, detail), so the error survives a worker process (e.g. ``evaluate``'s pool)."""
        return type(self), (self.path, self.detail)


def _inflate(path: Path, start: int, gzipped: bool) -> tuple[int, str | None]:
    """Decompress ``path`` from byte ``start`` without keeping the output: (bytes out, error or None).

    ``gzipped``: a gzip stream (several members allowed, CRC checked); otherwise a zlib stream (MetaImage).
    """
    total = 0
    with open(path, "rb") as file:
        file.seek(start)
        try:
            if gzipped:
                with gzip.GzipFile(fileobj=file) as stream:
                    while chunk := stream.read(_CHUNK):
                        total += len(chunk)
                return total, None
            inflater = zlib.decompressobj()
            while not inflater.eof and (data := file.read(_CHUNK)):
                while data and not inflater.eof:
                    total += len(inflater.decompress(data, 16 * _CHUNK))
                    data = inflater.unconsumed_tail
            return total, None if inflater.eof else "the compressed stream ends before its end marker"
        except (EOFError, OSError, zlib.error) as error:
            return total, f"the compressed stream is cut short or damaged ({error})"


def _compressed_problem(path: Path, start: int, expected: int, gzipped: bool = True) -> str | None:
    """What is wrong with the compressed voxels of ``path`` (from byte ``start``), or None when complete."""
    size = path.stat().st_size
    if gzipped and size - start >= 18:  # a gzip member is at least 18 bytes; its last 4 hold the size mod 2**32
        with open(path, "rb") as file:
            file.seek(size - 4)
            if int.from_bytes(file.read(4), "little") == expected % 2**32:
                return None
    total, error = _inflate(path, start, gzipped)
    if error:
        return error
    if total < expected:
        return f"it decompresses to {total} bytes, its header needs {expected}"
    return None


def _raw_problem(path: Path, start: int, expected: int) -> str | None:
    """What is wrong with uncompressed voxels from byte ``start`` of ``path`` (-1: at the end), or None."""
    size = path.stat().st_size
    needed = expected if start < 0 else start + expected
    if size < needed:
        return f"the file has {size} bytes, its header needs {needed}"
    return None


def _text_header(path: Path, last_line: bytes | None) -> tuple[list[str], int] | None:
    """The header lines of a MetaImage (up to ``last_line``'s key) or NRRD (up to a blank line) file, and the
    byte where the data start; None if no end of header is found in the first 64 KiB."""
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    position = 0
    lines = []
    while (end := head.find(b"\n", position)) >= 0:
        line = head[position:end].rstrip(b"\r")
        position = end + 1
        if last_line is None and not line:
            return lines, position
        lines.append(line.decode("latin-1"))
        if last_line is not None and line.split(b"=")[0].strip() == last_line:
            return lines, position
    return None


def _metaimage_problem(path: Path) -> tuple[Path, str] | None:
    """(data file, what is wrong) for a ``.mha``/``.mhd`` whose voxels are incomplete, else None."""
    parsed = _text_header(path, b"ElementDataFile")
    if parsed is None:
        return None  # not a header we understand: SimpleITK reports it
    lines, data_start = parsed
    fields = {key.strip(): value.strip() for key, _, value in (line.partition("=") for line in lines)}
    itemsize = _METAIMAGE_BYTES.get(fields.get("ElementType", ""))
    data_file = fields.get("ElementDataFile", "")
    if itemsize is None or data_file == "LIST" or "%" in data_file:
        return None  # slice lists and file patterns: several files, nothing single to compare
    try:
        voxels = int(np.prod([int(size) for size in fields["DimSize"].split()]))
        expected = voxels * int(fields.get("ElementNumberOfChannels", "1")) * itemsize
    except (KeyError, ValueError):
        return None
    if data_file != "LOCAL":
        path, data_start = path.parent / data_file, int(fields.get("HeaderSize", "0"))
        if not path.is_file():
            return path, "its data file does not exist"
    if fields.get("CompressedData", "False").lower() == "true":
        compressed_size = fields.get("CompressedDataSize", "")
        if compressed_size.isdigit():
            available = path.stat().st_size - max(data_start, 0)
            if available < int(compressed_size):
                return path, f"{available} bytes of compressed voxels, its header says {compressed_size}"
            return None
        problem = _compressed_problem(path, max(data_start, 0), expected, gzipped=False)
    else:
        problem = _raw_problem(path, data_start, expected)
    return (path, problem) if problem else None


def _nrrd_problem(path: Path) -> tuple[Path, str] | None:
    """(data file, what is wrong) for a ``.nrrd``/``.nhdr`` whose voxels are incomplete, else None."""
    parsed = _text_header(path, None)
    if parsed is None:
        return None
    lines, data_start = parsed
    fields = {key.strip().lower(): value.strip() for key, _, value in (line.partition(":") for line in lines[1:])
              if not key.startswith("#")}
    kind = fields.get("type", "").lower().replace("unsigned", "u").replace("signed", "").replace("_t", "")
    itemsize = _NRRD_BYTES.get(kind.replace(" ", ""))
    encoding = fields.get("encoding", "").lower()
    data_file = fields.get("data file", fields.get("datafile", ""))
    if itemsize is None or encoding not in ("raw", "gzip", "gz") or int(fields.get("line skip", "0") or 0):
        return None  # text, bzip2 and block data: SimpleITK (teem) checks those itself
    if data_file.startswith("LIST") or " " in data_file:
        return None  # several data files
    try:
        expected = int(np.prod([int(size) for size in fields["sizes"].split()])) * itemsize
        byte_skip = int(fields.get("byte skip", "0"))
    except (KeyError, ValueError):
        return None
    if data_file:
        path, data_start = path.parent / data_file, 0
        if not path.is_file():
            return path, "its data file does not exist"
    if encoding == "raw":
        problem = _raw_problem(path, -1 if byte_skip < 0 else data_start + byte_skip, expected)
    else:
        problem = _compressed_problem(path, data_start, expected + max(byte_skip, 0))
    return (path, problem) if problem else None


def nifti_voxel_bytes(image: Any) -> tuple[int, int]:
    """(voxel offset, bytes of voxels) that a loaded NIfTI header (``nibabel.load``) promises.

    Args:
        image: a ``nibabel`` NIfTI-1 or NIfTI-2 image.
    """
    voxels = int(np.prod(image.shape))
    return int(image.dataobj.offset), voxels * image.get_data_dtype().itemsize


def verify_complete(path: PathLike) -> None:
    """Raise ``IncompleteFileError`` when ``path`` holds fewer voxels than its header declares.

    Checks NIfTI (``.nii``: file size; ``.nii.gz``: the gzip stream ends and decompresses to voxel offset +
    voxels), MetaImage (``.mha``/``.mhd`` and their ``.raw``/``.zraw`` data) and NRRD (``.nrrd``/``.nhdr``,
    raw or gzip). DICOM folders and other formats pass: each DICOM file is checked by GDCM when read. A file
    whose header itself cannot be parsed also passes here; the reader that follows reports it.

    Args:
        path: an image file or DICOM folder.

    Example::

        verify_complete("imagesTr/hippocampus_003.nii.gz")  # returns None, or raises naming the file and the fix
    """
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return  # a DICOM series, or a missing file the reader reports
    problem: tuple[Path, str] | None = None
    if has_suffix(path, NIFTI_SUFFIXES):
        import nibabel as nib  # here, not at the top: evaluate imports this module without the imaging stack

        try:
            image = nib.load(str(path))  # the header only
        except Exception:  # noqa: BLE001 - not a NIfTI header: the reader that follows reports it
            return
        offset, nbytes = nifti_voxel_bytes(image)
        if has_suffix(path, (".nii.gz",)):
            detail = _compressed_problem(path, 0, offset + nbytes)
        else:
            detail = _raw_problem(path, offset, nbytes)
        problem = (path, detail) if detail else None
    elif has_suffix(path, (".mha", ".mhd")):
        problem = _metaimage_problem(path)
    elif has_suffix(path, (".nrrd", ".nhdr")):
        problem = _nrrd_problem(path)
    if problem is not None:
        raise IncompleteFileError(*problem)
