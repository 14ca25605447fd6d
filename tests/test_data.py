"""Data layer: image folders, file lists, the bundled Fashion-MNIST subset and eval transforms."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2tedge.calibration import CalibrationSet
from t2tedge.data.cache import cached_pixels
from t2tedge.data.datasets import (
    BUNDLED_DIR,
    BundledFashionMNIST,
    FileListDataset,
    ImageFolderDataset,
    TransformedDataset,
    open_dataset,
    select,
)
from t2tedge.data.transforms import build_eval_transform, to_rgb
from t2tedge.errors import DatasetError
from t2tedge.models.spec import Preprocess

PRE = Preprocess(input_size=16, resize_size=20, interpolation="bicubic")


def _expected(value: int, pre: Preprocess = PRE) -> torch.Tensor:
    """Normalized value of a constant 8-bit gray level, per channel."""
    return (value / 255.0 - torch.tensor(pre.mean)) / torch.tensor(pre.std)


def _jpeg_bytes(size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _mode_images() -> dict[str, tuple[Image.Image, str, int]]:
    """name -> (image, file extension, gray level it shows after to_rgb)."""
    palette = Image.new("P", (30, 22), 0)
    palette.putpalette([77, 77, 77] + [0, 0, 0] * 255)
    transparent = Image.new("RGBA", (22, 30), (0, 0, 0, 0))
    return {
        "rgb": (Image.new("RGB", (30, 22), (128, 128, 128)), ".png", 128),
        "gray": (Image.new("L", (22, 30), 60), ".png", 60),
        "palette": (palette, ".gif", 77),
        "rgba": (transparent, ".png", 255),  # fully transparent black composites to white
        "cmyk": (Image.new("CMYK", (30, 22), (0, 0, 0, 0)), ".jpg", 255),
        "gray16": (Image.fromarray(np.full((22, 30), 257 * 200, dtype=np.uint16)), ".png", 200),
    }


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for index, (name, (img, ext, _)) in enumerate(_mode_images().items()):
        folder = root / ("a_class" if index % 2 == 0 else "b_class") / ("nested" if index == 4 else "")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{name}{ext}")
    (root / "a_class" / "notes.txt").write_text("not an image")
    (root / "b_class" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 4)
    (root / "b_class" / "cut.jpg").write_bytes(_jpeg_bytes()[:12])  # header cut short
    (root / "b_class" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not counted
    return root


def test_image_folder_scans_all_modes_and_skips_non_images(image_folder: Path) -> None:
    dataset = ImageFolderDataset(image_folder)
    assert dataset.classes == ["a_class", "b_class"]
    # listing reads names, not pixels: notes.txt is skipped there, the two broken .jpg at first decode
    assert len(dataset) == 8
    assert dataset.skipped == 1
    assert dataset.labels.dtype == np.int64
    keys = [dataset.key(i) for i in range(len(dataset))]
    assert "a_class/nested/cmyk.jpg" in keys
    levels = {name: level for name, (_, _, level) in _mode_images().items()}
    transform = build_eval_transform(PRE)
    for index in range(len(dataset)):
        if keys[index] in ("b_class/garbage.jpg", "b_class/cut.jpg"):
            with pytest.raises(DatasetError, match=keys[index].split("/")[1]):
                dataset.load(index)
            continue
        image, label = dataset.load(index)
        assert image.mode == "RGB"
        assert label == dataset.classes.index(dataset.key(index).split("/")[0])
        tensor = transform(image)
        assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
        level = levels[Path(dataset.key(index)).stem]
        # JPEG may shift a flat colour by a level or two.
        tolerance = 0.05 if dataset.key(index).endswith(".jpg") else 1e-5
        torch.testing.assert_close(tensor[:, 0, 0], _expected(level), atol=tolerance, rtol=0)
        assert torch.allclose(tensor, tensor[:, :1, :1].expand_as(tensor), atol=tolerance)


def test_transformed_dataset_and_select(image_folder: Path) -> None:
    dataset = ImageFolderDataset(image_folder)
    keys = [dataset.key(i) for i in range(len(dataset))]
    a, b = keys.index("b_class/gray.png"), keys.index("a_class/rgb.png")
    subset = select(dataset, [a, b])
    assert len(subset) == 2 and subset.key(0) == dataset.key(a)
    assert subset.labels.tolist() == [dataset.labels[a], dataset.labels[b]]
    assert subset.sample_hash(1) == dataset.sample_hash(b)
    assert subset.cheap_key(1) == dataset.cheap_key(b) == (image_folder / "a_class" / "rgb.png").stat().st_size
    tensor, label = TransformedDataset(subset, build_eval_transform(PRE))[0]
    assert tensor.shape == (3, 16, 16) and label == dataset.labels[a]


def test_unlabelled_folder(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    Image.new("L", (8, 8)).save(tmp_path / "two.bmp")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == [] and dataset.labels.tolist() == [-1, -1]
    assert [dataset.key(i) for i in range(2)] == ["one.png", "two.bmp"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "a.txt").write_text("x")
    (tmp_path / "junk" / "cls" / "b.png").write_bytes(b"not a png")
    junk = ImageFolderDataset(tmp_path / "junk")  # b.png has an image's name: found out when decoded
    assert (len(junk), junk.skipped) == (1, 1)
    with pytest.raises(DatasetError, match=r"junk has no readable images \(2 files skipped\)"):
        cached_pixels(junk, np.arange(1), PRE, None, "images")
    (tmp_path / "texts" / "cls").mkdir(parents=True)
    (tmp_path / "texts" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"texts has no readable images \(1 files skipped\)"):
        ImageFolderDataset(tmp_path / "texts")


@pytest.mark.parametrize("pre", [PRE, Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))])
def test_normalize_is_the_eval_transform_bit_for_bit_on_every_level(pre: Preprocess) -> None:
    from t2tedge.data.transforms import normalize

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([levels, levels[::-1], levels.T], axis=-1))  # every level in every channel
    exact = Preprocess(16, 16, "nearest", pre.mean, pre.std)  # no resampling: the pixels are the levels
    expected = build_eval_transform(exact)(image).numpy()
    pixels = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    got = normalize(pixels[None].expand(2, -1, -1, -1), exact).numpy()  # a batch, from a strided view
    assert got.dtype == np.float32 and got.shape == (2, 3, 16, 16)
    assert np.array_equal(got[1].view(np.uint32), expected.view(np.uint32))  # identical bits, not just close
    with pytest.raises(ValueError, match="uint8 pixels"):
        normalize(pixels.float(), exact)


def test_pixels_skip_what_does_not_decode_and_match_the_transform(image_folder: Path, tmp_path: Path) -> None:
    dataset = ImageFolderDataset(image_folder)
    indices = np.arange(len(dataset))
    keys = [dataset.key(i) for i in indices]
    good = [i for i, key in enumerate(keys) if key not in ("b_class/garbage.jpg", "b_class/cut.jpg")]
    expected = np.stack([build_eval_transform(PRE)(dataset.load(i)[0]).numpy() for i in good])
    cache = tmp_path / "tensors"
    for run in range(2):  # decoded and written, then read from the cache file
        pixels, key, cached = cached_pixels(dataset, indices, PRE, cache, "validation images")
        assert cached == (run == 1)
        assert pixels.kept.tolist() == good and len(pixels) == len(good)
        assert sorted(row[1] for row in pixels.skipped) == ["b_class/cut.jpg", "b_class/garbage.jpg"]
        assert pixels.path is not None and pixels.path.name.startswith(key[:16])
        # bit for bit the per-image eval transform, read whole or in batches that span a skipped image
        np.testing.assert_array_equal(pixels.to_array(), expected)
        np.testing.assert_array_equal(np.concatenate([pixels[i : i + 3] for i in range(0, len(pixels), 3)]), expected)
        np.testing.assert_array_equal(pixels[-1], expected[-1])  # one image by index, as an array's
        np.testing.assert_array_equal(np.stack(list(pixels)), expected)
    in_memory, _, _ = cached_pixels(dataset, indices, PRE, None, "validation images")
    np.testing.assert_array_equal(in_memory[:], expected)
    assert in_memory.raw(0, 2).dtype == np.uint8
    # a cache file cut short is one error line naming it, not garbage
    with open(pixels.path, "r+b") as fh:
        fh.truncate(pixels.path.stat().st_size - 10)
    with pytest.raises(DatasetError, match="shorter than its header"):
        cached_pixels(dataset, indices, PRE, cache, "validation images")[0].to_array()


def test_listing_is_cached_and_revalidated_by_folder_mtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2TEDGE_LISTING_CACHE", str(tmp_path / "listings"))
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            Image.new("L", (8, 8), j).save(root / cls / f"{j}.png")
    old = 1_600_000_000 * 10**9  # folders last changed long before the scan: the listing may be cached
    for folder in (root / "a", root / "b", root):
        os.utime(folder, ns=(old, old))
    first = ImageFolderDataset(root)
    assert not first.listing_cached and len(first) == 6
    second = ImageFolderDataset(root)
    assert second.listing_cached and [second.key(i) for i in range(6)] == [first.key(i) for i in range(6)]
    assert second.listing_hash() == first.listing_hash()
    # a file added: its folder's mtime changes, the cache is not used
    Image.new("L", (8, 8), 9).save(root / "b" / "new.png")
    third = ImageFolderDataset(root)
    assert not third.listing_cached and len(third) == 7 and "b/new.png" in [third.key(i) for i in range(7)]
    assert third.listing_hash() != first.listing_hash()
    # freshly changed folders are not cached (an mtime tick could hide a second change)
    assert not ImageFolderDataset(root).listing_cached
    # a file rewritten in place keeps the cached listing but still changes the listing hash (fresh stats)
    for folder in (root / "a", root / "b", root):
        os.utime(folder, ns=(old, old))
    before = ImageFolderDataset(root).listing_hash()
    cached = ImageFolderDataset(root)
    assert cached.listing_cached
    Image.new("L", (9, 9), 3).save(root / "a" / "0.png")
    os.utime(root / "a", ns=(old, old))
    rewritten = ImageFolderDataset(root)
    assert rewritten.listing_cached and rewritten.listing_hash() != before


def test_overlap_hashes_only_where_cheap_keys_collide(tmp_path: Path) -> None:
    for split in ("calib", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8 + i, 8, 3), dtype=np.uint8)) for i in range(6)]
    for i in range(4):
        images[i].save(tmp_path / "calib" / "c" / f"{i}.png")
    for i in (3, 4, 5):
        images[i].save(tmp_path / "val" / "c" / f"v{i}.png")  # image 3 is in both
    calib_ds, val_ds = ImageFolderDataset(tmp_path / "calib"), ImageFolderDataset(tmp_path / "val")
    plan = CalibrationSet(calib_ds, PRE, np.arange(4), 0, None)
    hashed: dict[str, list[int]] = {"calib": [], "val": []}
    for name, dataset in (("calib", calib_ds), ("val", val_ds)):
        original = dataset.sample_hash
        dataset.sample_hash = lambda i, original=original, name=name: hashed[name].append(i) or original(i)
    assert plan.overlap(val_ds, np.arange(3)) == 1
    # only the files whose sizes match were read (image 3: calibration file 3, validation file 0)
    assert hashed == {"calib": [3], "val": [0]}


def test_truncated_image_fails_at_load_naming_the_file(tmp_path: Path) -> None:
    # The header survives, so the cheap scan keeps it; decoding must fail with a clear error.
    data = _jpeg_bytes((64, 64))
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.skipped == 0
    with pytest.raises(DatasetError, match="half.jpg"):
        dataset.load(0)


def test_listing_hash_stable_and_sensitive(image_folder: Path) -> None:
    first, second = ImageFolderDataset(image_folder), ImageFolderDataset(image_folder)
    listing = first.listing_hash()
    assert listing == second.listing_hash()
    target = image_folder / "a_class" / "rgb.png"
    before = first.sample_hash(first.paths.index(target))
    Image.new("RGB", (31, 22), (128, 128, 128)).save(target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = ImageFolderDataset(image_folder)
    assert changed.listing_hash() != listing
    assert changed.sample_hash(changed.paths.index(target)) != before
    assert changed.sample_hash(0) == hashlib.sha256(changed.paths[0].read_bytes()).hexdigest()


def test_file_list(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name in ("x.png", "y.png", "z.png"):
        Image.new("L", (10, 12), 9).save(tmp_path / "imgs" / name)
    named = tmp_path / "named.csv"
    named.write_text("path,label\nimgs/x.png,dog\nimgs/y.png,cat\n\nimgs/z.png,dog\n")
    dataset = FileListDataset(named)
    assert dataset.classes == ["cat", "dog"]
    assert dataset.labels.tolist() == [1, 0, 1]
    assert dataset.key(2) == "imgs/z.png"
    assert dataset.load(0)[0].mode == "RGB"

    numbered = tmp_path / "numbered.csv"
    numbered.write_text("imgs/x.png,2\nimgs/y.png,0\n")
    assert FileListDataset(numbered).labels.tolist() == [2, 0]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("imgs/x.png,1\nimgs/y.png,cat\n")
    assert FileListDataset(mixed, classes=["cat", "dog"]).labels.tolist() == [1, 0]
    with pytest.raises(DatasetError, match="line 1: integer label"):
        FileListDataset(mixed)

    cases = [
        ("imgs/x.png,dog\nimgs/missing.png,dog\n", None, "line 2: .*missing.png does not exist"),
        ("path,label\nimgs/x.png,dog\nimgs/y.png,dog,extra\n", None, "line 3: expected 'path,label'"),
        ("imgs/x.png,0\nimgs/y.png,7\n", ["cat", "dog"], "line 2: label 7 out of range 0..1"),
        ("imgs/x.png,cat\n\nimgs/y.png,cow\n", ["cat", "dog"], "line 3: unknown class 'cow'"),
        ("imgs/x.png,dog\nimgs/y.png\n", None, "line 2: label missing"),
    ]
    for text, classes, message in cases:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(DatasetError, match=message):
            FileListDataset(bad, classes=classes)
    with pytest.raises(DatasetError, match="does not exist"):
        FileListDataset(tmp_path / "nope.csv")


def test_bundled_fashion_mnist() -> None:
    record = json.loads((BUNDLED_DIR / "fashion_mnist.json").read_text())
    npz_path = BUNDLED_DIR / "fashion_mnist.npz"
    assert hashlib.sha256(npz_path.read_bytes()).hexdigest() == record["npz"]["sha256"]
    assert npz_path.stat().st_size <= 10 * 1024 * 1024

    train, test = BundledFashionMNIST("train"), BundledFashionMNIST("test")
    assert len(train.classes) == 10 and train.classes[0] == "T-shirt/top" and test.classes == train.classes
    for dataset in (train, test):
        counts = np.bincount(dataset.labels, minlength=10)
        assert len(dataset) == record["counts"][dataset.split]["total"]
        assert counts.min() == counts.max() == record["counts"][dataset.split]["per_class"]
        assert dataset.labels.min() >= 0 and dataset.labels.max() < 10
    # Disjoint by source index within each official file, and no image shared across the splits
    # (what matters when one calibrates on train and validates on test).
    for dataset in (train, test):
        assert len(np.unique(dataset.source_index)) == len(dataset)
        assert dataset.source_index.max() < record["counts"][dataset.split]["official_total"]
    train_hashes = {train.sample_hash(i) for i in range(len(train))}
    test_hashes = {test.sample_hash(i) for i in range(len(test))}
    assert len(train_hashes) == len(train) and len(test_hashes) == len(test)
    assert not train_hashes & test_hashes
    assert test.key(0) == f"fashion_mnist/test/{test.source_index[0]}"

    image, label = test.load(0)
    assert image.mode == "RGB" and image.size == (28, 28) and label == test.labels[0]
    tensor = build_eval_transform(PRE)(image)
    assert tensor.shape == (3, 16, 16)
    unnormalized = tensor * torch.tensor(PRE.std)[:, None, None] + torch.tensor(PRE.mean)[:, None, None]
    torch.testing.assert_close(unnormalized[0], unnormalized[2])  # grayscale: equal channels
    assert BundledFashionMNIST("test").listing_hash() == test.listing_hash() != train.listing_hash()


def test_open_dataset(tmp_path: Path, image_folder: Path) -> None:
    assert isinstance(open_dataset("fashion_mnist"), BundledFashionMNIST)
    assert open_dataset("fashion_mnist", split="train").split == "train"
    assert open_dataset("fashion_mnist:train").split == "train"
    assert isinstance(open_dataset(str(image_folder)), ImageFolderDataset)
    csv_path = image_folder / "list.csv"
    csv_path.write_text("a_class/rgb.png,0\n")
    assert isinstance(open_dataset(str(csv_path)), FileListDataset)
    with pytest.raises(DatasetError, match="splits 'train' and 'test'"):
        open_dataset("fashion_mnist:val")
    with pytest.raises(DatasetError, match="conflicts"):
        open_dataset("fashion_mnist:train", split="test")
    with pytest.raises(DatasetError, match="accepted: 'fashion_mnist'"):
        open_dataset(str(tmp_path / "nothing_here"))


def test_transform_values_and_modes() -> None:
    pre = Preprocess(input_size=8, resize_size=10, interpolation="bilinear", mean=(0.5, 0.4, 0.3))
    out = build_eval_transform(pre)(Image.new("RGB", (40, 20), (128, 128, 128)))
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out, _expected(128, pre)[:, None, None].expand(3, 8, 8), atol=1e-6, rtol=0)
    # Short side goes to resize_size, then a centred crop: a left/right split stays centred.
    halves = np.zeros((20, 40), dtype=np.uint8)
    halves[:, 20:] = 255
    out = build_eval_transform(Preprocess(8, 10, "nearest", (0, 0, 0), (1, 1, 1)))(Image.fromarray(halves))
    assert out[0, 0, :4].eq(0).all() and out[0, 0, 4:].eq(1).all()
    with pytest.raises(ValueError, match="unknown interpolation"):
        build_eval_transform(Preprocess(interpolation="lanczos5"))
    # Palette with a transparent index composites on white; 16-bit full scale is white.
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))).getpixel((0, 0)) == (255,) * 3
    assert to_rgb(Image.new("LA", (2, 2), (0, 128))).getpixel((0, 0)) == (127, 127, 127)
