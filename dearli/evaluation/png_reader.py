"""The fast reader of panoptic PNGs: a small PNG parser, libdeflate's inflate and dearli's C extension.

Only 8-bit RGB/RGBA non-interlaced files are read here; for anything else, and where the extension
(``dearli/evaluation/_runs.c``, compiled by the install) or the ``deflate`` package is missing, the
functions return None and :mod:`dearli.evaluation.panoptic_io` decodes with Pillow: the same runs and
the same errors, several times slower.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

try:  # dearli's C extension (optional): PNG unfiltering into runs, and the pair histogram of two run maps
    from dearli.evaluation import _runs
except ImportError:  # not compiled (an install without a C compiler): Pillow and numpy do all the work
    _runs = None
try:  # libdeflate's inflate: several times faster than zlib on these highly compressed files
    import deflate
except ImportError:
    deflate = None

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BYTES_PER_PIXEL = {2: 3, 6: 4}  # PNG colour type -> bytes of an 8-bit pixel (RGB, RGBA)


def png_image_data(data: bytes) -> tuple[int, int, int, list[bytes]] | None:
    """(width, height, bytes per pixel, IDAT chunk contents) of an 8-bit RGB/RGBA non-interlaced PNG.

    None for anything else, including a truncated file or a bad checksum before the image data, so
    that Pillow decides about those (and its error messages stay the evaluation's). As in Pillow, the
    checksums of the image data and whatever follows it are not checked.
    """
    if len(data) < 33 or data[:16] != _PNG_SIGNATURE + b"\0\0\0\x0dIHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    bpp = _BYTES_PER_PIXEL.get(colour)
    if depth != 8 or bpp is None or compression or filtering or interlace or not width or not height:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None  # Pillow warns about or refuses possible decompression bombs
    if height * (width * bpp + 1) >= 2**32:  # more than deflate.zlib_decompress can be asked for
        return None
    pos, parts = 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or kind == b"acTL":  # truncated, or animated: left to Pillow
            return None
        if kind == b"IDAT":
            parts.append(data[pos + 8:end])
        elif parts:  # the image data has ended
            break
        elif zlib.crc32(data[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return None
        pos = end + 4
    return (width, height, bpp, parts) if parts else None


def png_runs(data: bytes) -> tuple[tuple[int, int], np.ndarray, np.ndarray] | None:
    """Runs of a panoptic PNG's bytes without Pillow: libdeflate's inflate, then unfiltering and run
    finding in one pass of the ``_runs`` extension (without the GIL), with no H×W image in memory.

    Returns ((H, W), starts: M int64, ids: M uint32), as ``panoptic_io.PanopticRuns`` holds them, or None
    when the extension or the ``deflate`` package is missing or the file is not one
    :func:`png_image_data` takes or is corrupt: Pillow then decodes it (same runs, same errors).
    """
    header = None if _runs is None or deflate is None else png_image_data(data)
    if header is None:
        return None
    width, height, bpp, parts = header
    try:
        raw = deflate.zlib_decompress(b"".join(parts), height * (width * bpp + 1))
        starts, ids = _runs.png_runs(raw, width, height, bpp)
    except (deflate.DeflateError, ValueError):
        return None
    return (height, width), np.frombuffer(starts, dtype=np.int64), np.frombuffer(ids, dtype=np.uint32)


def read_runs(path: str) -> tuple[tuple[int, int], np.ndarray, np.ndarray] | None:
    """:func:`png_runs` of a file (None when it cannot be read: Pillow then reports why)."""
    if _runs is None or deflate is None or not isinstance(path, (str, os.PathLike)):
        return None
    try:
        data = _runs.read_file(path)  # one release of the GIL, where open() and read() take several
    except OSError:
        return None
    return png_runs(data)
