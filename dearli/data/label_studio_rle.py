"""Label Studio's brush RLE: the ``value.rle`` list of a ``brushlabels`` region with ``"format": "rle"``.

The list holds byte values (0..255) of a bit stream that packs an H×W×4 RGBA image, row-major, in the
run-length format of the ``@thi.ng/rle-pack`` package. Label Studio takes the mask from the alpha channel.
The stream, most significant bit first:

    header   32 bits: how many values N; 5 bits: word size - 1 (7: bytes);
             4 × 4 bits: the widths - 1 of the four possible length fields
    chunks   until N values are out, each: 1 bit kind (1: one word repeated, 0: words given one by one);
             2 bits: which length field width follows; that many bits: the chunk's length - 1; then the
             repeated word, or the chunk's words one after another
    padding  zero bits up to the end of the last byte

Encoding writes every run of equal values as one repeat chunk (a run of one as a one-word literal, which is
as long), with the narrowest length field of the widths 3, 4, 8 and 16 that holds it; runs longer than
65536 values take several chunks. Decoding reads any word size from 1 to 32 and any length field widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LENGTH_WIDTHS = (3, 4, 8, 16)  # bits of the four length fields the encoder declares in its header
WORD_BITS = 8
CHANNELS = 4  # RGBA
MASK_VALUE = 255  # what the encoder writes into every channel of a mask pixel
ALPHA_THRESHOLD = 128  # a decoded pixel belongs to the mask when its alpha is at least this
_HEADER_BITS = 32 + 5 + 4 * 4


class RleError(ValueError):
    """A brush RLE that cannot be decoded (not bytes, cut short, more values than it declares, wrong size)."""


def value_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal neighbours of a 1-D array: (lengths, values), both of length R; empty input gives R = 0."""
    values = np.asarray(values).ravel()
    if values.size == 0:
        return np.zeros(0, np.int64), values[:0]
    ends = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], ends))
    lengths = np.diff(np.concatenate((starts, [values.size])))
    return lengths.astype(np.int64), values[starts]


def _pack_bits(fields: np.ndarray, widths: np.ndarray) -> list[int]:
    """Fields (F int64) written with their widths (F bits each, most significant first) -> bytes, zero-padded."""
    total = int(widths.sum())
    owner = np.repeat(np.arange(widths.size), widths)
    first_bit = np.cumsum(widths) - widths
    shift = widths[owner] - 1 - (np.arange(total) - first_bit[owner])
    bits = ((fields[owner] >> shift) & 1).astype(np.uint8)
    return np.packbits(bits).tolist()


def pack_runs(lengths: np.ndarray, values: np.ndarray) -> list[int]:
    """RLE bytes of the byte array given as runs: R run lengths (>= 1) and R values (0..255)."""
    lengths, values = np.asarray(lengths, np.int64), np.asarray(values, np.int64)
    if values.size and (values.min() < 0 or values.max() > 255 or lengths.min() < 1):
        raise ValueError("runs need lengths >= 1 and byte values 0..255")
    caps = 2 ** np.asarray(LENGTH_WIDTHS, np.int64)
    longest = int(caps[-1])
    pieces = -(-lengths // longest)  # chunks per run
    run = np.repeat(np.arange(lengths.size), pieces)
    last = np.cumsum(pieces) - 1
    chunk = np.full(run.size, longest, np.int64)
    chunk[last] = lengths - (pieces - 1) * longest
    which = np.searchsorted(caps, chunk)  # narrowest field that holds length - 1
    chunk_fields = np.stack([(chunk > 1).astype(np.int64), which, chunk - 1, values[run]], axis=1)
    chunk_widths = np.stack([np.ones_like(which), np.full_like(which, 2), np.asarray(LENGTH_WIDTHS)[which],
                             np.full_like(which, WORD_BITS)], axis=1)
    header = [int(lengths.sum()), WORD_BITS - 1, *(w - 1 for w in LENGTH_WIDTHS)]
    header_widths = [32, 5, 4, 4, 4, 4]
    fields = np.concatenate([np.asarray(header, np.int64), chunk_fields.ravel()])
    widths = np.concatenate([np.asarray(header_widths, np.int64), chunk_widths.ravel()])
    return _pack_bits(fields, widths)


def pack_values(values: np.ndarray) -> list[int]:
    """RLE bytes of a 1-D array of byte values (N, 0..255)."""
    return pack_runs(*value_runs(np.asarray(values).ravel()))


def encode_mask(mask: np.ndarray) -> list[int]:
    """Brush RLE of an H×W bool mask: mask pixels are (255, 255, 255, 255), the rest (0, 0, 0, 0)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    lengths, flags = value_runs(mask.astype(bool).ravel())
    return pack_runs(lengths * CHANNELS, flags.astype(np.int64) * MASK_VALUE)


class _BitReader:
    """Reads unsigned fields of up to 32 bits, most significant bit first, from bytes."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.size = data, 0, len(data) * 8

    def _span(self, bits: int) -> tuple[int, int, int]:
        end = self.pos + bits
        if end > self.size:
            raise RleError(f"the data ends inside a field (bit {self.pos} of {self.size})")
        return self.pos >> 3, (end + 7) >> 3, end

    def read(self, bits: int) -> int:
        first, last, end = self._span(bits)
        word = int.from_bytes(self.data[first:last], "big")
        self.pos = end
        return (word >> ((last << 3) - end)) & ((1 << bits) - 1)

    def read_words(self, count: int, bits: int) -> np.ndarray:
        """``count`` consecutive fields of ``bits`` bits each, as int64."""
        first, last, end = self._span(count * bits)
        raw = np.unpackbits(np.frombuffer(self.data, np.uint8, last - first, first))
        offset = self.pos - first * 8
        self.pos = end
        stream = raw[offset:offset + count * bits].reshape(count, bits).astype(np.int64)
        return stream @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


def _as_bytes(rle: Sequence[int]) -> bytes:
    try:
        array = np.asarray(rle)
    except (TypeError, ValueError) as err:
        raise RleError(f"not a list of byte values: {err}") from None
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise RleError("not a flat list of integers")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise RleError("values outside 0..255")
    return array.astype(np.uint8).tobytes()


def unpack_values(rle: Sequence[int], expected: int | None = None) -> np.ndarray:
    """The values of RLE bytes: a 1-D uint8/uint16/uint32 array (by word size) of the declared length N.

    ``expected``: the N the caller needs; any other is an RleError before anything is decoded.
    """
    reader = _BitReader(_as_bytes(rle))
    if reader.size < _HEADER_BITS:
        raise RleError(f"{reader.size // 8} bytes are shorter than the header")
    count, word = reader.read(32), reader.read(5) + 1
    widths = [reader.read(4) + 1 for _ in range(4)]
    if expected is not None and count != expected:
        raise RleError(f"holds {count} values, expected {expected}")
    if count > (reader.size - _HEADER_BITS) << 16:
        raise RleError(f"declares {count} values, more than {reader.size // 8} bytes can hold")
    out = np.zeros(count, np.uint8 if word <= 8 else np.uint16 if word <= 16 else np.uint32)
    done = 0
    while done < count:
        repeat = reader.read(1)
        end = done + 1 + reader.read(widths[reader.read(2)])
        if end > count:
            raise RleError(f"a chunk runs past the {count} declared values")
        if repeat:
            out[done:end] = reader.read(word)
        else:
            out[done:end] = reader.read_words(end - done, word)
        done = end
    return out


def decode_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """H×W bool mask of a brush RLE of an H×W RGBA image: the pixels whose alpha is at least 128."""
    values = unpack_values(rle, expected=height * width * CHANNELS)
    return values.reshape(height, width, CHANNELS)[..., 3] >= ALPHA_THRESHOLD
