"""Minimal PNG codec (8-bit, non-interlaced) built on `zlib`, so Pillow is optional.

LRA's Pathfinder images are 8-bit grayscale PNGs. This decoder handles colour types 0 (gray),
2 (RGB), 4 (gray + alpha) and 6 (RGBA) at bit depth 8 with all five scanline filters; colour
inputs are reduced to gray with the LRA/TensorFlow weights. It is the fallback path; `read_png`
uses Pillow when it is importable because Pillow's C decoder is faster.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from jaxtyping import UInt8

__all__ = ["decode_png", "encode_png", "read_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _unfilter(raw: bytes, height: int, width: int, bpp: int, source: str) -> np.ndarray:
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise ValueError(
            f"{source}: decompressed PNG data has {len(raw)} bytes, expected "
            f"{height * (stride + 1)} for {height}x{width} with {bpp} bytes per pixel; "
            "the file is truncated or corrupt."
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype = int(rows[y, 0])
        line = rows[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:
            # Sub is a running sum per channel; uint8 cumsum wraps modulo 256 like the spec.
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif ftype == 2:
            cur = line + prev
        elif ftype in (3, 4):
            # Average and Paeth depend on the reconstructed left neighbour: sequential per row.
            cur_b = bytearray(stride)
            lb = line.tobytes()
            pb = prev.tobytes()
            for i in range(stride):
                a = cur_b[i - bpp] if i >= bpp else 0
                b = pb[i]
                if ftype == 3:
                    pred = (a + b) >> 1
                else:
                    c = pb[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pbb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if (pa <= pbb and pa <= pc) else (b if pbb <= pc else c)
                cur_b[i] = (lb[i] + pred) & 0xFF
            cur = np.frombuffer(bytes(cur_b), dtype=np.uint8)
        else:
            raise ValueError(
                f"{source}: scanline {y} uses PNG filter type {ftype}; valid types are 0-4. "
                "The file is corrupt."
            )
        out[y] = cur
        prev = cur
    return out


def decode_png(data: bytes, source: str = "<bytes>") -> UInt8[np.ndarray, "h w"]:
    """Decode an 8-bit non-interlaced PNG into a 2-D grayscale uint8 array.

    **Arguments:**

    - `data`: the PNG file contents.
    - `source`: a name (usually the file path) used in error messages.

    **Returns:**

    The image as `uint8` of shape `(height, width)`. RGB(A) images are converted with the
    `tf.image.rgb_to_grayscale` weights; alpha is dropped.

    **Raises:**

    `ValueError` if the data is empty, not a PNG, truncated, or uses an unsupported bit depth,
    colour type or interlacing.
    """
    if len(data) == 0:
        raise ValueError(f"{source}: PNG file is empty (0 bytes); expected a PNG image.")
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{source}: not a PNG file (bad signature {data[:8]!r}).")
    pos = len(_SIGNATURE)
    header: tuple[int, ...] | None = None
    idat = bytearray()
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError(f"{source}: PNG chunk {ctype!r} is truncated.")
        pos += 12 + length
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat += body
        elif ctype == b"IEND":
            break
    if header is None:
        raise ValueError(f"{source}: PNG has no IHDR chunk; the file is truncated or corrupt.")
    width, height, depth, color, _, _, interlace = header
    if width == 0 or height == 0:
        raise ValueError(f"{source}: PNG has zero size {height}x{width}; expected a real image.")
    if depth != 8 or color not in _CHANNELS or interlace != 0:
        raise ValueError(
            f"{source}: unsupported PNG (bit depth {depth}, colour type {color}, interlace "
            f"{interlace}); this decoder handles 8-bit non-interlaced gray/RGB/RGBA. "
            "Install Pillow for other formats."
        )
    try:
        raw = zlib.decompress(bytes(idat))
    except zlib.error as exc:
        raise ValueError(f"{source}: PNG image data does not decompress ({exc}).") from exc
    bpp = _CHANNELS[color]
    pixels = _unfilter(raw, height, width, bpp, source).reshape(height, width, bpp)
    if bpp == 1:
        return pixels[:, :, 0]
    if bpp == 2:
        return np.ascontiguousarray(pixels[:, :, 0])
    return rgb_to_gray_tf(pixels[:, :, :3])


def rgb_to_gray_tf(rgb: UInt8[np.ndarray, "*batch 3"]) -> UInt8[np.ndarray, "*batch"]:
    """Grayscale conversion matching `tf.image.rgb_to_grayscale` on uint8 input.

    TensorFlow converts to float32 in [0, 1], takes the dot product with
    `(0.2989, 0.5870, 0.1140)`, then converts back by multiplying by 255.5 and truncating with
    saturation. LRA then casts to int32, which leaves these values unchanged.

    **Arguments:**

    - `rgb`: uint8 array whose last axis holds R, G, B.

    **Returns:**

    A uint8 array with the last axis removed.
    """
    flt = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    weights = np.asarray([0.2989, 0.5870, 0.1140], dtype=np.float32)
    gray = (flt * weights).sum(axis=-1, dtype=np.float32) * np.float32(255.5)
    return np.clip(gray, 0.0, 255.0).astype(np.uint8)


def encode_png(image: UInt8[np.ndarray, "h w"], filter_type: int = 0) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit grayscale PNG.

    **Arguments:**

    - `image`: pixels, shape `(height, width)`.
    - `filter_type`: PNG scanline filter 0-4 applied to every row (all are valid PNG; the
      choice only matters for testing decoders).

    **Returns:**

    The PNG file contents.

    **Raises:**

    `ValueError` if `filter_type` is not in 0-4 or the image is empty.
    """
    if filter_type not in range(5):
        raise ValueError(f"filter_type must be 0-4, got {filter_type}.")
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {image.shape}.")
    height, width = image.shape
    img = image.astype(np.int32)
    rows = []
    for y in range(height):
        line = img[y]
        up = img[y - 1] if y > 0 else np.zeros(width, dtype=np.int32)
        left = np.concatenate([[0], line[:-1]])
        upleft = np.concatenate([[0], up[:-1]])
        if filter_type == 0:
            pred = np.zeros(width, dtype=np.int32)
        elif filter_type == 1:
            pred = left
        elif filter_type == 2:
            pred = up
        elif filter_type == 3:
            pred = (left + up) >> 1
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        rows.append(bytes([filter_type]) + ((line - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        _SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def read_png(path: str | Path, use_pillow: bool | None = None) -> UInt8[np.ndarray, "h w"]:
    """Read a PNG file as a 2-D uint8 grayscale array.

    **Arguments:**

    - `path`: file to read.
    - `use_pillow`: `True` forces Pillow, `False` forces the built-in zlib decoder, `None`
      (default) uses Pillow if it is importable and falls back to the zlib decoder otherwise.

    **Returns:**

    The pixels, shape `(height, width)`.

    **Raises:**

    `ValueError` naming the file if it is empty or cannot be decoded; `ImportError` if
    `use_pillow=True` and Pillow is missing.
    """
    data = Path(path).read_bytes()
    if len(data) == 0:
        raise ValueError(f"{path}: PNG file is empty (0 bytes); expected a PNG image.")
    if use_pillow is None:
        use_pillow = _pillow_available()
    if not use_pillow:
        return decode_png(data, str(path))
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGB", "RGBA"):
                return rgb_to_gray_tf(np.asarray(im.convert("RGB"), dtype=np.uint8))
            arr = np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot decode PNG ({exc}).") from exc
    if arr.size == 0:
        raise ValueError(f"{path}: PNG has zero size; expected a real image.")
    return arr


_PILLOW: bool | None = None


def _pillow_available() -> bool:
    global _PILLOW
    if _PILLOW is None:
        try:
            import PIL.Image  # noqa: F401

            _PILLOW = True
        except ImportError:
            _PILLOW = False
    return _PILLOW
