"""Image decoding and resizing to a model's input, as its `model_info` says. No torch."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import PIL.Image

from .model_info import ModelInfo

# Bounds on a decoded image, checked from its header before any pixel is decoded: a few
# kilobytes of PNG can declare 30000 x 30000 pixels (2.7 GB decoded), and very long, thin
# images make pictures that cannot be encoded (libpng's row limit) or whose legend outgrows
# memory. 40 megapixels is larger than any camera photo a classifier needs.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_SIDE = 16_384
# An encoded image file larger than this holds no photo within those bounds (40 megapixels
# as an uncompressed 16-bit TIFF are 240 MB); it is refused before it is read.
MAX_IMAGE_FILE_BYTES = 256 << 20
FORMATS = "JPEG, PNG, BMP, TIFF or WebP"
# The same, as Pillow names them (its JPEG reader takes multi-picture JPEGs too). Others are
# refused: Pillow reads an AVIF's size from a box the decoder does not obey.
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
# A JPEG's size is in its frame header, after its APPn segments: read from the first 2 MiB
# only, so that padding segments cannot make reading the header itself the cost (31 MB of
# them took 6 s); photos carry well under 1 MiB of metadata.
JPEG_HEADER_BYTES = 2 << 20
# Each progressive scan decodes the whole image again: a 270 KB JPEG repeating one scan 1000
# times took 19 s of CPU. Cameras and encoders write about 10.
MAX_JPEG_SCANS = 100


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks a decoder to RGB needs: the critical ones (an upper-case first letter) and tRNS.
# libpng prints a warning on stderr for each broken ancillary chunk (a bad CRC, a short iCCP),
# so a PNG of thousands of them wrote thousands of log lines per request.
PNG_KEPT_ANCILLARY = (b"tRNS",)


class ImageError(ValueError):
    """An image cannot be decoded or has the wrong shape."""


def check_image_size(height: int, width: int) -> None:
    """ImageError when an image of this size is over the bounds above."""
    if height > MAX_IMAGE_SIDE or width > MAX_IMAGE_SIDE:
        raise ImageError(f"{width}x{height} pixels: a side is over {MAX_IMAGE_SIDE}; "
                         "send a smaller image")
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageError(f"{width}x{height} pixels: over {MAX_IMAGE_PIXELS} pixels; "
                         "send a smaller image")


def declared_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the encoded image's header, without decoding its pixels; a JPEG
    with more scans than MAX_JPEG_SCANS is refused here too."""
    jpeg = data[:2] == b"\xff\xd8"
    try:
        with PIL.Image.open(io.BytesIO(data[:JPEG_HEADER_BYTES] if jpeg else data),
                            formats=PILLOW_FORMATS) as header:
            width, height = header.size
    except PIL.Image.DecompressionBombError:  # Pillow's own bound, far above ours
        raise ImageError(f"over {MAX_IMAGE_PIXELS} pixels; send a smaller image") from None
    except (PIL.Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"not a decodable image ({FORMATS} expected)") from None
    # 0xFFDA starts a scan; entropy-coded data cannot hold it (a 0xFF there is followed by 0)
    if jpeg and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ImageError(f"a JPEG of over {MAX_JPEG_SCANS} scans; encode it again")
    return height, width


def without_png_ancillary_chunks(data: bytes) -> bytes:
    """A PNG with only the chunks that decoding to pixels needs (see PNG_KEPT_ANCILLARY);
    other bytes are returned as they are, as is a PNG whose chunk structure is broken (its
    decoder then refuses it)."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    kept, position, size = [PNG_SIGNATURE], len(PNG_SIGNATURE), len(data)
    view, dropped = memoryview(data), False
    while position + 12 <= size:
        length = int.from_bytes(view[position:position + 4], "big")
        end = position + 12 + length
        if end > size:
            return data
        kind = bytes(view[position + 4:position + 8])
        if kind[:1].isupper() or kind in PNG_KEPT_ANCILLARY:
            kept.append(view[position:end])
        else:
            dropped = True
        position = end
        if kind == b"IEND":
            break
    return b"".join(kept) if dropped else data  # no copy of a PNG that has nothing to drop


def decode_image(data: bytes, flags: int = cv2.IMREAD_COLOR_RGB) -> np.ndarray:
    """Encoded JPEG/PNG/... bytes -> RGB u8 [H, W, 3] (or what `flags` ask for), refused
    before decoding when its header declares more pixels than MAX_IMAGE_PIXELS."""
    if not data:
        raise ImageError(f"no bytes: send an encoded {FORMATS} image")
    # Pillow reads the header of what libpng will decode: it refused a PNG with an ICC profile
    # over 1 MB, or a bad CRC in a text chunk, that libpng only warns about
    data = without_png_ancillary_chunks(data)
    check_image_size(*declared_size(data))
    try:
        # decoded straight to RGB: no BGR array to swap (about 50 us less per request)
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error:  # OpenCV rejects some malformed headers by raising, not returning None
        array = None
    if array is None:
        raise ImageError(f"not a decodable image ({FORMATS} expected)")
    return array


def read_image_file(path: str | Path) -> bytes:
    """An image file's bytes, refused (ImageError) over MAX_IMAGE_FILE_BYTES: a regular file
    by its size before it is read (a 3 GB file was read whole, 3.3 GB and 12 s, before its
    header was looked at), a pipe or device (`<(curl ...)`, /dev/zero, which filled the
    memory) once that much has been read."""
    path = Path(path)
    too_large = ImageError(f"{path}: over {MAX_IMAGE_FILE_BYTES} bytes: not an image "
                           f"({FORMATS}) of at most {MAX_IMAGE_PIXELS} pixels")
    try:
        if path.is_dir():
            raise ImageError(f"{path}: a folder; give image files")
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > MAX_IMAGE_FILE_BYTES:
                raise too_large
            data = handle.read(MAX_IMAGE_FILE_BYTES + 1)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read it ({exc.strerror})") from None
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise too_large
    return data


def read_image(path: str | Path, flags: int = cv2.IMREAD_COLOR_RGB) -> np.ndarray:
    """An image file decoded as `decode_image` does; errors name the file. The bytes go to
    OpenCV, never the path: a name that is not valid UTF-8 crashed it."""
    data = read_image_file(path)
    try:
        return decode_image(data, flags)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Gray, RGB or RGBA u8 -> RGB u8 [H, W, 3]."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"image of shape {image.shape}: expected [H, W, 3]")
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)


def resize_for_model(image: np.ndarray, info: ModelInfo) -> np.ndarray:
    """RGB u8 [H, W, 3] of any size -> [input_height, input_width, 3].

    `standard` stretches the whole image, so the saliency map covers all of it; `crop` resizes
    the shorter side and takes the centre; `fit_to_window*` keeps the aspect ratio and pads."""
    image = as_rgb(image)
    h, w = info.input_height, info.input_width
    if info.resize_type == "crop":
        scale = max(h / image.shape[0], w / image.shape[1])
        resized = cv2.resize(image, (max(w, round(image.shape[1] * scale)),
                                     max(h, round(image.shape[0] * scale))),
                             interpolation=cv2.INTER_LINEAR)
        top = (resized.shape[0] - h) // 2
        left = (resized.shape[1] - w) // 2
        return np.ascontiguousarray(resized[top:top + h, left:left + w])
    if info.resize_type.startswith("fit_to_window"):
        scale = min(h / image.shape[0], w / image.shape[1])
        nh, nw = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
        resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        canvas = np.full((h, w, 3), info.pad_value, dtype=np.uint8)
        top = (h - nh) // 2 if info.resize_type.endswith("letterbox") else 0
        left = (w - nw) // 2 if info.resize_type.endswith("letterbox") else 0
        canvas[top:top + nh, left:left + nw] = resized
        return canvas
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
