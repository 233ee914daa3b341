import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from pdeformer.data import (
    ListOpsConfig,
    generate_listops,
    load_pathfinder,
    load_task,
    read_aan_tsv,
    read_listops_tsv,
    read_pathfinder_metadata,
    write_listops_tsv,
)
from pdeformer.data.image import rgb_to_gray_tf

EXAMPLE = "( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"

# ---------------------------------------------------------------- ListOps


def _write_listops(root, rows=None):
    d = root / "listops-1000"
    d.mkdir(parents=True)
    for split in ("train", "val", "test"):
        lines = rows if rows is not None else [f"{EXAMPLE}\t9", "( ( [SM 3 ) 8 ] )\t1"]
        (d / f"basic_{split}.tsv").write_text("Source\tTarget\n" + "\n".join(lines) + "\n")
    return d


def test_listops_reader(tmp_path):
    _write_listops(tmp_path)
    task = load_task("listops", tmp_path)
    assert task.name == "listops" and task.vocab_size == 16
    np.testing.assert_array_equal(task.train.labels, [9, 1])
    np.testing.assert_array_equal(task.train.lengths, [9, 4])
    np.testing.assert_array_equal(task.train.tokens[0], [2, 8, 15, 1, 10, 13, 5, 6, 5])
    np.testing.assert_array_equal(task.train.tokens[1, :4], [4, 9, 14, 5])


def test_listops_write_read_roundtrip(tmp_path):
    split = generate_listops(30, ListOpsConfig(min_length=10, max_length=80), seed=0)
    write_listops_tsv(tmp_path / "basic_train.tsv", split)
    back = read_listops_tsv(tmp_path / "basic_train.tsv")
    np.testing.assert_array_equal(back.labels, split.labels)
    np.testing.assert_array_equal(back.lengths, split.lengths)
    np.testing.assert_array_equal(back.tokens, split.tokens[:, : back.tokens.shape[1]])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (f"{EXAMPLE}", r"basic_train.tsv:3: expected 2 tab-separated columns"),
        (f"{EXAMPLE}\tnine", r"basic_train.tsv:3: Target"),
        (f"{EXAMPLE}\t12", r"basic_train.tsv:3: Target must be 0-9"),
        ("( ( [AVG 3 ) 8 ] )\t1", r"basic_train.tsv:3: unknown ListOps token '\[AVG'"),
    ],
)
def test_listops_malformed_rows(tmp_path, row, match):
    d = _write_listops(tmp_path, [f"{EXAMPLE}\t9", row])
    with pytest.raises(ValueError, match=match):
        read_listops_tsv(d / "basic_train.tsv")


def test_listops_bad_header(tmp_path):
    p = tmp_path / "basic_train.tsv"
    p.write_text(f"{EXAMPLE}\t9\n")
    with pytest.raises(ValueError, match=r"basic_train.tsv:1: expected the header"):
        read_listops_tsv(p)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"basic_train.tsv:1: expected the header"):
        read_listops_tsv(p)


def test_listops_undecodable_bytes_name_the_file_and_line(tmp_path):
    p = tmp_path / "basic_train.tsv"
    p.write_bytes(b"Source\tTarget\n( [MAX 2 9 ] )\t9\n( [MAX \xff 2 ) ] )\t2\n")
    with pytest.raises(
        ValueError, match=r"basic_train.tsv:3: not valid UTF-8 text \(byte 0xff at column 8\)"
    ):
        read_listops_tsv(p)


# ---------------------------------------------------------------- AAN


def _write_aan(root, bad_row=None):
    d = root / "tsv_data"
    d.mkdir(parents=True)
    rows = ["1.0\tid1\tid2\tab c\t\u00e9x", '0\tid3\tid4\thello\tworld, "quoted"']
    if bad_row:
        rows.append(bad_row)
    for name in ("train", "eval", "test"):
        (d / f"new_aan_pairs.{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


def test_aan_reader(tmp_path):
    _write_aan(tmp_path)
    task = load_task("retrieval", tmp_path, max_length=4)
    assert task.dual and task.vocab_size == 257
    np.testing.assert_array_equal(task.train.labels, [1, 0])
    np.testing.assert_array_equal(task.train.tokens[0, :4], np.frombuffer(b"ab c", np.uint8) + 1)
    np.testing.assert_array_equal(task.val.lengths2, [3, 4])  # 'éx' is 3 UTF-8 bytes
    assert task.train.tokens2[0, 0] == 0xC3 + 1 and task.train.tokens.dtype == np.uint16


def test_aan_undecodable_bytes_name_the_file_and_line(tmp_path):
    p = tmp_path / "new_aan_pairs.train.tsv"
    p.write_bytes(b"1\tid1\tid2\tab c\tde\n0\tid3\tid4\tab\xffc\tde\n")
    with pytest.raises(
        ValueError,
        match=r"new_aan_pairs.train.tsv:2: not valid UTF-8 text \(byte 0xff at column 13\)",
    ):
        read_aan_tsv(p)


def test_aan_missing_column(tmp_path):
    d = _write_aan(tmp_path, bad_row="1\tid5\tid6\tonly one text")
    with pytest.raises(ValueError, match=r"new_aan_pairs.train.tsv:3: expected 5"):
        read_aan_tsv(d / "new_aan_pairs.train.tsv")


# ---------------------------------------------------------------- Pathfinder


def _meta_line(k, label):
    return f"imgs/0 sample_{k}.png {k} {label} 1.0 14 4 2 0.5 1 1"


def _write_pathfinder(root, n=10, res=32, empty=(), meta_extra=None):
    base = root / f"pathfinder{res}" / "curv_contour_length_14"
    (base / "imgs" / "0").mkdir(parents=True)
    (base / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs, lines = [], []
    for k in range(n):
        img = rng.integers(0, 256, size=(res, res)).astype(np.uint8)
        path = base / "imgs" / "0" / f"sample_{k}.png"
        if k in empty:
            path.write_bytes(b"")
        else:
            Image.fromarray(img).save(path)
        lines.append(_meta_line(k, k % 2))
        if k not in empty:
            imgs.append(img)
    if meta_extra:
        lines.append(meta_extra)
    (base / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
    return base, np.stack(imgs)


def test_pathfinder_reader_and_split(tmp_path):
    _, imgs = _write_pathfinder(tmp_path, n=11, empty=(4,))
    task = load_task("pathfinder", tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (8, 1, 1)  # 80/10/10 of 10
    got = np.concatenate([task.train.tokens, task.val.tokens, task.test.tokens])
    np.testing.assert_array_equal(got, imgs.reshape(10, -1))
    labels = [k % 2 for k in range(11) if k != 4]
    np.testing.assert_array_equal(
        np.concatenate([task.train.labels, task.val.labels, task.test.labels]), labels
    )
    assert np.all(task.train.lengths == 1024)


def test_pathx_and_difficulty_alias(tmp_path):
    _write_pathfinder(tmp_path, n=10, res=128)
    task = load_task("pathx", tmp_path, difficulty="hard")
    assert task.name == "pathx" and task.train.tokens.shape == (8, 128 * 128)
    with pytest.raises(FileNotFoundError, match="curv_baseline"):
        load_task("pathx", tmp_path, difficulty="baseline")


def test_pathfinder_malformed(tmp_path):
    base, _ = _write_pathfinder(tmp_path, n=3, meta_extra="imgs/0 sample_9.png 9 1 1.0")
    with pytest.raises(ValueError, match=r"0.npy:4: expected 11 space-separated"):
        read_pathfinder_metadata(base / "metadata" / "0.npy")


def test_pathfinder_undecodable_metadata_names_the_file_and_line(tmp_path):
    base, _ = _write_pathfinder(tmp_path, n=3)
    meta = base / "metadata" / "0.npy"
    meta.write_bytes(meta.read_bytes().replace(b"sample_1.png 1", b"sample_1.png \xff"))
    with pytest.raises(
        ValueError, match=r"0.npy:2: not valid UTF-8 text \(byte 0xff at column 21\)"
    ):
        load_task("pathfinder", tmp_path)


def test_pathfinder_binary_npy_metadata_is_refused(tmp_path):
    base, _ = _write_pathfinder(tmp_path, n=3)
    np.save(base / "metadata" / "0.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"0.npy:1: a binary NumPy array, not Pathfinder"):
        load_task("pathfinder", tmp_path)


def test_pathfinder_empty_image_raises_when_not_skipped(tmp_path):
    _write_pathfinder(tmp_path, n=3, empty=(1,))
    with pytest.raises(ValueError, match=r"sample_1.png: PNG file is empty"):
        load_task("pathfinder", tmp_path, skip_empty=False)


def test_pathfinder_wrong_size(tmp_path):
    _write_pathfinder(tmp_path, n=3)
    (tmp_path / "pathfinder32").rename(tmp_path / "pathfinder64")
    with pytest.raises(ValueError, match=r"sample_0.png: expected a 64x64"):
        load_pathfinder(tmp_path, 64)


def test_pathfinder_colour_png_is_gray_with_tf_weights(tmp_path):
    base, imgs = _write_pathfinder(tmp_path, n=10)
    rgb = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(base / "imgs" / "0" / "sample_9.png")
    task = load_task("pathfinder", tmp_path)
    np.testing.assert_array_equal(task.test.tokens[0], rgb_to_gray_tf(rgb).reshape(-1))
    np.testing.assert_array_equal(task.train.tokens, imgs[:8].reshape(8, -1))


def test_pathfinder_corrupt_png_names_the_file(tmp_path):
    base, _ = _write_pathfinder(tmp_path, n=3)
    (base / "imgs" / "0" / "sample_2.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match=r"sample_2.png: cannot decode the PNG image"):
        load_task("pathfinder", tmp_path)


def test_pathfinder_without_pillow_says_what_to_install(tmp_path, monkeypatch):
    _write_pathfinder(tmp_path, n=3)
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(ImportError, match=r"sample_0.png: reading Pathfinder's PNG images needs"):
        load_task("pathfinder", tmp_path)


@pytest.mark.parametrize(
    ("images", "sizes"), [(1, (0, 0, 1)), (3, (2, 0, 1)), (5, (4, 0, 1)), (10, (8, 1, 1))]
)
def test_pathfinder_few_images_give_empty_splits(tmp_path, images, sizes):
    # 80/10/10 rounded down: a handful of images leaves the validation split (and, with one
    # image, the training split) empty, each a split of size 0 with 1024 columns.
    _write_pathfinder(tmp_path, n=images)
    task = load_task("pathfinder", tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == sizes
    for split in (task.train, task.val, task.test):
        assert split.tokens.shape == (len(split), 1024)


def test_pathfinder_max_examples(tmp_path):
    _write_pathfinder(tmp_path, n=10)
    task = load_task("pathfinder", tmp_path, max_examples=3)
    assert (len(task.train), len(task.val), len(task.test)) == (2, 0, 1)
    assert task.val.tokens.shape == (0, 1024)
    with pytest.raises(ValueError, match=r"max_examples must be >= 1, got 0"):
        load_task("pathfinder", tmp_path, max_examples=0)


# ---------------------------------------------------------------- IMDB and CIFAR


def test_imdb_reader(tmp_path):
    for split in ("train", "test"):
        for cls in ("pos", "neg"):
            d = tmp_path / "aclImdb" / split / cls
            d.mkdir(parents=True)
            for k in range(2):
                (d / f"{k}_7.txt").write_text(f"{cls} review {k}<br />ok", encoding="utf-8")
    task = load_task("text", tmp_path, max_length=8)
    assert task.val is task.test and task.vocab_size == 257
    np.testing.assert_array_equal(task.train.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(task.train.tokens[0], np.frombuffer(b"neg revi", np.uint8) + 1)


def test_imdb_undecodable_review_names_the_file_and_line(tmp_path):
    for split in ("train", "test"):
        for cls in ("pos", "neg"):
            d = tmp_path / "aclImdb" / split / cls
            d.mkdir(parents=True)
            (d / "0_7.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "aclImdb" / "train" / "pos" / "0_7.txt").write_bytes(b"one\ntwo \xff\n")
    with pytest.raises(
        ValueError, match=r"pos/0_7.txt:2: not valid UTF-8 text \(byte 0xff at column 5\)"
    ):
        load_task("text", tmp_path)


def _write_cifar(root):
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, size=4).tolist()
        raw[name] = (data, labels)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return raw


def test_rgb_to_gray_matches_tf_formula():
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [10, 200, 30]], np.uint8)
    expected = [
        int(np.float32(s) * np.float32(255.5))
        for s in (rgb.astype(np.float32) / 255 * [0.2989, 0.5870, 0.1140]).sum(1)
    ]
    np.testing.assert_array_equal(rgb_to_gray_tf(rgb), expected)
    assert rgb_to_gray_tf(rgb)[0] == 255


def test_cifar_reader_grayscale(tmp_path):
    raw = _write_cifar(tmp_path)
    task = load_task("image", tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (18, 2, 4)
    data, labels = raw["test_batch"]
    rgb = data.reshape(4, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(task.test.tokens, rgb_to_gray_tf(rgb).reshape(4, 1024))
    np.testing.assert_array_equal(task.test.labels, labels)
    assert np.all(task.test.lengths == 1024)


@pytest.mark.parametrize(("val_fraction", "sizes"), [(0.0, (20, 0, 4)), (1.0, (0, 20, 4))])
def test_cifar_val_fraction_at_the_ends_gives_an_empty_split(tmp_path, val_fraction, sizes):
    _write_cifar(tmp_path)
    task = load_task("image", tmp_path, val_fraction=val_fraction)
    assert (len(task.train), len(task.val), len(task.test)) == sizes
    for split in (task.train, task.val, task.test):
        assert split.tokens.shape == (len(split), 1024)


@pytest.mark.parametrize("val_fraction", [1.5, -0.5])
def test_cifar_val_fraction_outside_unit_interval_is_refused(tmp_path, val_fraction):
    _write_cifar(tmp_path)
    with pytest.raises(
        ValueError, match=rf"val_fraction must lie in \[0, 1\] .*, got {val_fraction}\."
    ):
        load_task("image", tmp_path, val_fraction=val_fraction)


def test_cifar_malformed(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_1: expected data of shape"):
        load_task("image", tmp_path)


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("listops", r"basic_train.tsv[\s\S]*lra_release.gz"),
        ("retrieval", r"new_aan_pairs.train.tsv[\s\S]*long-range-arena"),
        ("pathfinder", r"pathfinder32/curv_contour_length_14/metadata[\s\S]*lra_release"),
        ("pathx", r"pathfinder128[\s\S]*lra_release"),
        ("text", r"train/pos[\s\S]*aclImdb"),
        ("image", r"data_batch_1[\s\S]*cifar-10-python"),
    ],
)
def test_missing_directory_lists_files_and_source(tmp_path, name, expect):
    with pytest.raises(FileNotFoundError, match=expect):
        load_task(name, tmp_path / "nowhere")
