import zlib

import numpy as np
import pytest

from pdeformer.data._png import decode_png, encode_png, read_png, rgb_to_gray_tf


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
def test_zlib_decoder_roundtrip_all_filters(filter_type, tmp_path):
    rng = np.random.default_rng(filter_type)
    img = rng.integers(0, 256, size=(7, 11)).astype(np.uint8)
    data = encode_png(img, filter_type)
    np.testing.assert_array_equal(decode_png(data), img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_png(path, use_pillow=False), img)


def test_pillow_agrees_with_zlib_decoder(tmp_path):
    pytest.importorskip("PIL")
    img = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(img, 4))
    np.testing.assert_array_equal(read_png(path, use_pillow=True), img)


def test_decoder_errors_name_the_source():
    with pytest.raises(ValueError, match="f.png.*empty"):
        decode_png(b"", "f.png")
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"GIF89a....", "g.gif")
    good = encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="t.png"):
        decode_png(good[:40], "t.png")


def test_rgb_to_gray_matches_tf_formula():
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [10, 200, 30]], np.uint8)
    expected = [
        int(np.float32(s) * np.float32(255.5))
        for s in (rgb.astype(np.float32) / 255 * [0.2989, 0.5870, 0.1140]).sum(1)
    ]
    np.testing.assert_array_equal(rgb_to_gray_tf(rgb), expected)
    assert rgb_to_gray_tf(rgb)[0] == 255


def test_rgb_png_is_converted(tmp_path):
    # Hand-built RGB PNG (colour type 2) to exercise the multi-channel filters.
    import struct

    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [9, 9, 9]]], np.uint8)
    raw = b"".join(b"\x01" + _sub(row) for row in rgb.reshape(2, 6))

    def chunk(k, b):
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))

    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(decode_png(data), rgb_to_gray_tf(rgb))


def _sub(row):
    r = row.astype(np.int32)
    left = np.concatenate([[0, 0, 0], r[:-3]])
    return ((r - left) % 256).astype(np.uint8).tobytes()
