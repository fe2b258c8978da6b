import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ftwt_cli.arch import DataConfig
from ftwt_cli.data import FASHION_MNIST_DIR, DataChoice, build_transform, make_loader, open_data, read_idx
from ftwt_cli.errors import FtwtError

CFG = DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 0.875, "center")


def _write_idx(path, arr: np.ndarray, gz=True):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def _fashion_folder(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), gz=False)
        (root / f"{prefix}-labels-idx1-ubyte.gz").rename(root / f"{prefix}-labels-idx1-ubyte")
    return root


def test_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", a)
    assert read_idx(tmp_path / "x.gz").tolist() == a.tolist()


def test_fashion_mnist_folder_gray_to_rgb(tmp_path):
    d = open_data(_fashion_folder(tmp_path), CFG, num_classes=10)
    x, y = d.train[0]
    assert d.kind == "fashion-mnist" and len(d.train) == 20 and len(d.val) == 10
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.equal(x[0], x[1])


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    d = open_data("fashion-mnist", CFG, num_classes=10)
    assert len(d.train) == 60000 and len(d.val) == 10000 and d.classes[9] == "Ankle boot"
    x, y = d.val[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def test_digits():
    d = open_data("digits", CFG, num_classes=10)
    assert len(d.train) + len(d.val) == 1797 and len(d.val) == 359
    assert d.train[0][0].shape == (3, 32, 32)


def _image_tree(root, classes=("cat", "dog"), n=3, size=40):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), (40 * i) % 256, np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_train_val(tmp_path):
    _image_tree(tmp_path / "train")
    _image_tree(tmp_path / "val", n=2)
    d = open_data(tmp_path, CFG, num_classes=2)
    assert d.classes == ("cat", "dog") and len(d.train) == 6 and len(d.val) == 4
    assert d.val[0][0].shape == (3, 32, 32)


def test_imagefolder_val_split(tmp_path):
    _image_tree(tmp_path, n=10)
    d = open_data(tmp_path, CFG, choice=DataChoice(val_split=0.2))
    assert len(d.train) == 16 and len(d.val) == 4


@pytest.mark.parametrize("layout,expect", [
    ("missing", "not found"), ("empty", "no train/ and val/"), ("flat-no-split", "no train/ and val/"),
    ("train-only", "no val/"), ("mismatch", "same class folders"), ("no-images", "no class folders with images"),
])
def test_bad_folders(tmp_path, layout, expect):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "flat-no-split":
        _image_tree(root)
    if layout == "train-only":
        _image_tree(root / "train")
    if layout == "mismatch":
        _image_tree(root / "train")
        _image_tree(root / "val", classes=("cat", "cow"))
    if layout == "no-images":
        (root / "train" / "cat").mkdir(parents=True)
        (root / "val" / "cat").mkdir(parents=True)
    with pytest.raises(FtwtError, match=expect):
        open_data(root, CFG)


def test_class_count_mismatch(tmp_path):
    with pytest.raises(FtwtError, match="10 classes but the model's head has 5"):
        open_data("digits", CFG, num_classes=5)


def test_corrupt_image_is_fatal_with_its_name(tmp_path):
    _image_tree(tmp_path / "train")
    _image_tree(tmp_path / "val")
    (tmp_path / "val" / "dog" / "1.png").write_bytes(b"garbage")
    d = open_data(tmp_path, CFG)
    with pytest.raises(FtwtError, match=r"cannot read image .*1\.png"):
        [d.val[i] for i in range(len(d.val))]


def test_cifar_on_disk_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": list(range(4))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    import torchvision.datasets.cifar as cifar_mod
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)        # our fake files have other md5s
    monkeypatch.setattr(cifar_mod, "check_integrity", lambda *a, **k: True)
    for path in (tmp_path, folder):
        d = open_data(path, CFG, num_classes=10)
        assert d.kind == "cifar10" and len(d.train) == 20 and len(d.val) == 4
        assert d.train[0][0].shape == (3, 32, 32)


def test_loader_order_depends_only_on_seed_and_epoch():
    d = open_data("digits", CFG)
    first = lambda s, e: next(iter(make_loader(d.train, 16, train=True, workers=0, seed=s, epoch=e)))[1].tolist()
    assert first(0, 1) == first(0, 1) and first(0, 1) != first(0, 2)


def test_timm_create_transform_loses_what_ours_keeps():
    """Why data.py builds its own transforms (its docstring): timm's eval transform refuses the in-memory uint8 tensors
    and a grayscale image for an RGB model; ours takes both, with the same normalised result for an RGB image."""
    from timm.data import create_transform
    cfg = DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=1.0)
    theirs = create_transform(cfg.input_size, is_training=False, mean=cfg.mean, std=cfg.std, crop_pct=1.0)
    ours = build_transform(cfg, train=False, small=False)
    gray = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    with pytest.raises((TypeError, RuntimeError)):
        theirs(gray)                                               # a uint8 tensor (ArrayDataset)
    with pytest.raises(RuntimeError):
        theirs(Image.fromarray(gray[0].numpy(), mode="L"))         # grayscale for a 3-channel model
    assert ours(gray).shape == (3, 32, 32)
    rgb = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy(), mode="RGB")
    assert torch.allclose(ours(rgb), theirs(rgb), atol=1e-6)
