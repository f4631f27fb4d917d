"""Height and width of an encoded image, read from its header without decoding it.

The train crops are drawn on the host before decoding (see `transforms.random_resized_crops`), so
every image's size is needed for every batch. Hand-written because PIL's lazy open costs about
20 µs per image in this hot loop; walking the JPEG markers to the frame header costs about 2 µs.
Images stored as pixels (`tools.make_shards --train-raw-pixels`) are binary PPMs: `ppm_header` also
says where their pixels start.

The converter uses it too (`image_check`): a JPEG whose header DALI could not parse is re-encoded.
The walk checks what DALI cannot be handed: DALI 2.4's decoder kills the process (SIGSEGV)
when, in a batch of 32 or more, a JPEG's markers before its scan data cannot be parsed, or a PNG
cannot be decoded at all (a batch of fewer raises an error; damage inside a JPEG's scan data raises
one at any size). So a JPEG is walked to its start of scan and a PNG's chunks are checked against
their CRCs, and such a sample is named instead of crashing the run.
"""

from __future__ import annotations

import zlib

import numpy as np

# What may precede a stored PPM's pixels ("P6", width, height, 255, whitespace, comments): far more
# than the ~15 bytes PIL writes. The converter, the verifier and the loaders hold PPMs to it.
PPM_HEADER_MAX_BYTES = 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PPM_SIGNATURE = b"P6"
PPM_WHITESPACE = b" \t\r\n"
JPEG_START = b"\xff\xd8"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coded):
# every one but DHT (C4), JPG (C8) and DAC (CC) in C0-CF.
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI and EOI cannot come before the frame header).
JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])
JPEG_START_OF_SCAN = 0xDA


class UnreadableHeader(ValueError):
    """Not a JPEG or PNG, or its header is damaged."""


def encoded_image_size(data) -> tuple[int, int]:
    """(height, width) of a JPEG or PNG, from a bytes-like object whose header is whole (see above)."""
    data = memoryview(data)
    if data[:8] == PNG_SIGNATURE:
        return _png_size(data)
    if data[:2] != JPEG_START:
        raise UnreadableHeader("not a JPEG or PNG")
    size = None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            raise UnreadableHeader(f"JPEG marker expected at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        segment_end = position + 2 + (data[position + 2] << 8 | data[position + 3])
        if segment_end > end:
            raise UnreadableHeader(f"JPEG segment at byte {position} runs past the end ({end} bytes)")
        if marker in JPEG_FRAME_MARKERS and size is None:
            if segment_end < position + 9:
                raise UnreadableHeader(f"JPEG frame header at byte {position} is too short")
            size = data[position + 5] << 8 | data[position + 6], data[position + 7] << 8 | data[position + 8]
            if 0 in size:
                raise UnreadableHeader(f"JPEG frame header gives a {size[1]}x{size[0]} image")
        if marker == JPEG_START_OF_SCAN:
            if size is None:
                raise UnreadableHeader("JPEG scan before any frame header")
            return size
        position = segment_end
    raise UnreadableHeader("JPEG header ends before its scan data" if size else "no JPEG frame header")


def _png_size(data: memoryview) -> tuple[int, int]:
    """(height, width) of a PNG whose chunks are all whole, with their CRCs right, IHDR to IEND."""
    position, end, size = len(PNG_SIGNATURE), len(data), None
    while position + 12 <= end:
        length = int.from_bytes(data[position : position + 4], "big")
        chunk_end = position + 12 + length
        if chunk_end > end:
            raise UnreadableHeader(f"PNG chunk at byte {position} runs past the end ({end} bytes)")
        kind = bytes(data[position + 4 : position + 8])
        crc = int.from_bytes(data[chunk_end - 4 : chunk_end], "big")
        if zlib.crc32(data[position + 4 : chunk_end - 4]) != crc:
            raise UnreadableHeader(f"PNG chunk {kind!r} at byte {position}: CRC mismatch")
        if size is None:
            if kind != b"IHDR" or length < 8:
                raise UnreadableHeader("PNG does not start with its IHDR chunk")
            size = (
                int.from_bytes(data[position + 12 : position + 16], "big"),
                int.from_bytes(data[position + 8 : position + 12], "big"),
            )
            if 0 in size:
                raise UnreadableHeader(f"PNG header gives a {size[1]}x{size[0]} image")
        if kind == b"IEND":
            return size
        position = chunk_end
    raise UnreadableHeader("PNG ends before its IEND chunk")


def ppm_header(data) -> tuple[int, int, int]:
    """(height, width, header bytes) of a binary PPM of 8-bit RGB: "P6", width, height and 255,
    separated by whitespace (comments from # to the line's end allowed), then one whitespace byte."""
    head = bytes(memoryview(data)[:PPM_HEADER_MAX_BYTES])
    if head[:2] != PPM_SIGNATURE:
        raise UnreadableHeader("not a binary PPM")
    numbers, position = [], 2
    while len(numbers) < 3:
        while position < len(head) and (head[position] in PPM_WHITESPACE or head[position] == ord("#")):
            if head[position] == ord("#"):
                line_end = head.find(b"\n", position)
                position = len(head) if line_end < 0 else line_end
            position += 1
        start = position
        while position < len(head) and head[position : position + 1].isdigit():
            position += 1
        if start == position:
            raise UnreadableHeader("PPM header: width, height and maximum value expected")
        numbers.append(int(head[start:position]))
    if position >= len(head) or head[position] not in PPM_WHITESPACE:
        raise UnreadableHeader("PPM header: no whitespace before the pixels")
    width, height, maximum = numbers
    if width == 0 or height == 0 or maximum != 255:
        raise UnreadableHeader(f"PPM of {width}x{height} with maximum value {maximum}: 8-bit RGB expected")
    return height, width, position + 1


def ppm_pixels(data: np.ndarray) -> np.ndarray:
    """The pixels of a binary PPM held in a uint8 array, as an H x W x 3 view (no copy).

    The pixels must be exactly what the header promises: a shard not made by the converter may hold
    fewer, or trailing bytes.
    """
    height, width, header = ppm_header(data)
    if len(data) != header + height * width * 3:
        raise UnreadableHeader(f"{len(data) - header} bytes of pixels, its header says {width}x{height} RGB")
    return data[header:].reshape(height, width, 3)
