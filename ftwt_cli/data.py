"""Datasets a user brings (ImageFolder, torchvision's on-disk CIFAR, Fashion-MNIST idx files, scikit-learn
digits) and the transforms that match a run's stored data config.

Small images (≤ 64 px: CIFAR, Fashion-MNIST, or a folder of such images) are resized to the model's input size;
training augments them with pad-crop + flip. Larger (ImageNet-like) images use the data config's resize/center-crop
for evaluation and random-resized-crop + flip for training. The data config's ``augment`` (small | imagenet) picks
one of the two whatever the size. Grayscale is repeated to the model's ``in_chans``.

Why not the libraries' own: timm's ``create_transform`` builds the same resize/center-crop for evaluation, but it
refuses the uint8 tensors our in-memory datasets hold and a grayscale image for an RGB model (tested in
``tests/test_data.py``), has no hook for a corruption on the [0, 1] image before normalisation, and adds colour jitter
to training by default. torchvision's ``FashionMNIST`` reads only uncompressed idx files under
``root/FashionMNIST/raw`` (it extracts the ``.gz`` files only when downloading), while Debian installs the gzipped files
in a read-only folder: ``read_idx`` reads them where they are. CIFAR is read by torchvision's ``CIFAR10``/``CIFAR100``,
folders by its ``ImageFolder`` (wrapped so that an unreadable image is named, never skipped, and 16-bit PNGs scale).
"""
from __future__ import annotations

import copy
import dataclasses
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .arch.dataconfig import DataConfig
from .errors import FtwtError

__all__ = ["DataChoice", "DataSplits", "open_data", "make_loader", "with_transform", "build_transform", "FASHION_MNIST_DIR", "DATA_KINDS", "read_idx", "find_idx",
           "default_workers", "check_classes", "size_note", "SMALL_IMAGE"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")   # Debian package dataset-fashion-mnist
SMALL_IMAGE = 64        # images of at most this many pixels a side take the small-image path
DATA_KINDS = ("ImageFolder DIR (DIR/train + DIR/val, or DIR/CLASS with --val-split)", "CIFAR-10/100 folder",
              "fashion-mnist (or a folder of its idx files)", "digits")
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_VAL_NAMES = ("val", "validation", "test")


@dataclass(frozen=True)
class DataChoice:
    """Which images of ``--data`` a command uses, beyond the data itself: the share of a DIR/CLASS folder held out for
    validation (``--val-split``) and a fixed random subset of the training split (``--train-samples``)."""
    val_split: Optional[float] = None
    train_samples: Optional[int] = None


@dataclass(frozen=True)
class DataSplits:
    train: Dataset
    val: Dataset
    classes: Tuple[str, ...]
    kind: str       # "imagefolder" | "cifar10" | "cifar100" | "fashion-mnist" | "digits"
    source: str
    small: bool = False   # the small-image path: resized, pad-crop augmentation
    native_size: Optional[Tuple[int, int]] = None   # (H, W) of the source images (the largest of a sample of them)

    def val_with(self, cfg: DataConfig, corruption: Optional[Callable] = None) -> Dataset:
        """The validation split with the eval transform plus ``corruption`` on [0, 1] images."""
        return with_transform(self.val, build_transform(cfg, train=False, small=self.small, corruption=corruption))

    def calibration(self, cfg: DataConfig, samples: int, seed: int = 0) -> Dataset:
        """A fixed random subset of ``samples`` training images with the eval transform (no augmentation): what a
        MACs budget or a static pruning criterion is measured on, never the validation split."""
        ds = with_transform(self.train, build_transform(cfg, train=False, small=self.small))
        if samples >= len(ds):
            return ds
        return Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:samples].tolist())


def with_transform(ds: Dataset, transform: Callable) -> Dataset:
    """A shallow copy of ``ds`` (or of the dataset a Subset wraps) with another transform."""
    if isinstance(ds, Subset):
        return Subset(with_transform(ds.dataset, transform), ds.indices)
    out = copy.copy(ds)
    out.transform = transform
    return out


# ------------------------------------------------------------------------------------------- transforms
class _Normalise:
    """float (C,H,W) in [0, 1] → channels repeated to ``in_chans``, then (x - mean) / std."""

    def __init__(self, cfg: DataConfig) -> None:
        self.in_chans = cfg.input_size[0]
        self.mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.in_chans:
            if x.shape[0] == 1:
                x = x.expand(self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(0, keepdim=True)
            else:
                raise FtwtError(f"images have {x.shape[0]} channels but the model reads {self.in_chans}",
                                "use a dataset with matching channels")
        return (x - self.mean) / self.std


def _interp(name: str):
    from torchvision.transforms import v2  # deferred: torchvision loads only when this runs (start-up)
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        return v2.InterpolationMode.BILINEAR


def build_transform(cfg: DataConfig, *, train: bool, small: bool, corruption: Optional[Callable] = None) -> Callable:
    """``corruption`` (for out-of-distribution tests) acts on the resized float image in [0, 1]. With the data config's
    ``augment: none`` training sees what evaluation sees."""
    from torchvision.transforms import v2  # deferred: torchvision loads only when this runs (start-up)
    train = train and cfg.augment != "none"
    _, h, w = cfg.input_size
    interp = _interp(cfg.interpolation)
    if small:
        ops = [v2.Resize((h, w), interpolation=interp, antialias=True)]
        if train:
            ops += [v2.RandomCrop((h, w), padding=max(1, h // 8)), v2.RandomHorizontalFlip()]
    elif train:
        ops = [v2.RandomResizedCrop((h, w), interpolation=interp, antialias=True), v2.RandomHorizontalFlip()]
    else:
        resize = int(round(min(h, w) / cfg.crop_pct))
        ops = [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop((h, w))]
    tail = [corruption] if corruption is not None else []
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), *tail, _Normalise(cfg)])


# ------------------------------------------------------------------------------------------- datasets
class ArrayDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


class _SafeImageFolder(Dataset):
    """ImageFolder whose unreadable files are fatal with the file's name (not skipped silently)."""

    def __init__(self, root: Path, transform: Optional[Callable], in_chans: int) -> None:
        from torchvision.datasets import ImageFolder  # deferred: torchvision loads only when this runs (start-up)
        try:
            self.inner = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as e:
            raise FtwtError(f"{root} has no class folders with images ({e})",
                            "lay it out as DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg, or DIR/CLASS/*.jpg with --val-split 0.1") from None
        self.transform, self.mode = transform, "L" if in_chans == 1 else "RGB"
        self.classes = self.inner.classes

    def __len__(self) -> int:
        return len(self.inner.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError  # deferred: only image files need PIL
        path, label = self.inner.samples[i]
        try:
            with Image.open(path) as im:
                img = _to_8bit(im).convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise FtwtError(f"cannot read image {path} ({e})", "remove or replace the file; ftwt does not skip unreadable images") from None
        return self.transform(img), label


def _to_8bit(im):
    """A 16-bit grayscale image (PIL mode I;16*) scaled to 8 bits (v·255/65535); PIL's own convert clips at 255."""
    if not im.mode.startswith("I;16"):
        return im
    from PIL import Image  # deferred: only image files need PIL
    a = np.asarray(im).astype(np.float32) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (the MNIST format, optionally gzipped) → uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)
    except (OSError, ValueError, struct.error, RuntimeError, EOFError) as e:
        raise FtwtError(f"cannot read idx file {path} ({e})", "check the Fashion-MNIST files") from None


def find_idx(folder: Path, stem: str) -> Optional[Path]:
    """``folder/stem`` or its gzipped ``stem.gz``, whichever exists (None if neither)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion(folder: Path):
    parts = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        img, lab = find_idx(folder, f"{prefix}-images-idx3-ubyte"), find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if img is None or lab is None:
            return None
        x, y = read_idx(img), read_idx(lab)
        if len(x) != len(y):
            raise FtwtError(f"{img} has {len(x)} images but {lab} has {len(y)} labels", "check the Fashion-MNIST files")
        parts[split] = (x.unsqueeze(1), y.long())
    return parts


def _cifar(path: Path):
    from torchvision.datasets import CIFAR10, CIFAR100  # deferred: torchvision loads only when this runs (start-up)
    for cls, folder, kind in ((CIFAR10, "cifar-10-batches-py", "cifar10"), (CIFAR100, "cifar-100-python", "cifar100")):
        root = path.parent if path.name == folder else path if (path / folder).is_dir() else None
        if root is None:
            continue
        try:
            tr, te = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
        except RuntimeError as e:
            raise FtwtError(f"{root / folder} is incomplete or corrupt ({e})", "re-extract the CIFAR archive") from None
        to_t = lambda d: (torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
        return kind, to_t(tr), to_t(te), tuple(tr.classes)
    return None


def _digits():
    from sklearn.datasets import load_digits  # deferred: only --data digits needs scikit-learn
    d = load_digits()
    x = torch.from_numpy(d.images).mul(255 / 16).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))   # fixed 80/20 split
    n_val = len(y) // 5
    return (x[perm[n_val:]], y[perm[n_val:]]), (x[perm[:n_val]], y[perm[:n_val]]), tuple(str(i) for i in range(10))


def _split(n: int, frac: float) -> Tuple[List[int], List[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    k = max(1, int(round(n * frac)))
    return perm[k:], perm[:k]


def open_data(data: str | Path, cfg: DataConfig, *, choice: DataChoice = DataChoice(),
              num_classes: Optional[int] = None) -> DataSplits:
    """Resolve ``--data`` into train/val datasets with the run's transforms, checking the class count; ``choice``
    holds the held-out share of a DIR/CLASS folder and the training subset (quick experiments, the demo)."""
    text = str(data)
    val_split, train_samples = choice.val_split, choice.train_samples
    if val_split is not None and not 0 < val_split < 1:
        raise FtwtError(f"--val-split {val_split} is outside (0, 1)", "pass a fraction such as --val-split 0.1")

    def arrays(kind, train, val, classes, source):
        native = tuple(int(v) for v in train[0].shape[-2:])
        small = _small(cfg, native)
        return DataSplits(ArrayDataset(*train, build_transform(cfg, train=True, small=small)),
                          ArrayDataset(*val, build_transform(cfg, train=False, small=small)), classes, kind, source, small,
                          native)

    if text == "digits":
        tr, va, classes = _digits()
        splits = arrays("digits", tr, va, classes, "scikit-learn digits")
    elif text in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        if not FASHION_MNIST_DIR.is_dir():
            raise FtwtError(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}",
                            "apt-get install dataset-fashion-mnist, or pass the folder holding its idx files")
        parts = _fashion(FASHION_MNIST_DIR)
        splits = arrays("fashion-mnist", parts["train"], parts["val"], tuple(_FASHION_CLASSES), str(FASHION_MNIST_DIR))
    else:
        path = Path(text)
        if not path.exists():
            raise FtwtError(f"data folder not found: {path}", f"pass one of: {'; '.join(DATA_KINDS)}")
        if not path.is_dir():
            raise FtwtError(f"--data {path} is a file, not a folder", f"pass one of: {'; '.join(DATA_KINDS)}")
        fashion, cifar = _fashion(path), _cifar(path)
        if fashion:
            splits = arrays("fashion-mnist", fashion["train"], fashion["val"], tuple(_FASHION_CLASSES), str(path))
        elif cifar:
            kind, tr, va, classes = cifar
            splits = arrays(kind, tr, va, classes, str(path))
        else:
            splits = _image_folder(path, cfg, val_split)
    if num_classes is not None and len(splits.classes) != num_classes:
        raise FtwtError(f"{splits.source} has {len(splits.classes)} classes but the model's head has {num_classes}",
                        f"use data with {num_classes} classes, or attach a checkpoint trained on this data")
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise FtwtError(f"{splits.source} has an empty train or val split", "add images to both splits")
    if train_samples is not None:
        if train_samples <= 0:
            raise FtwtError(f"--train-samples {train_samples} must be positive", "pass a number of training images, e.g. 10000")
        if train_samples < len(splits.train):
            keep = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:train_samples].tolist()
            splits = dataclasses.replace(splits, train=Subset(splits.train, keep))
    return splits


def _small(cfg: DataConfig, native: Tuple[int, int]) -> bool:
    """The small-image path: by the data config's ``augment``, else by the images' size."""
    if cfg.augment in ("small", "imagenet"):
        return cfg.augment == "small"
    return max(native) <= SMALL_IMAGE


def _folder_size(folder: "_SafeImageFolder", n: int = 16) -> Tuple[int, int]:
    """(H, W) of the largest of the first ``n`` images (their headers only)."""
    from PIL import Image, UnidentifiedImageError  # deferred: only image files need PIL
    sizes = []
    for path, _ in folder.inner.samples[:n]:
        try:
            with Image.open(path) as im:
                sizes.append((im.height, im.width))
        except (OSError, UnidentifiedImageError) as e:
            raise FtwtError(f"cannot read image {path} ({e})", "remove or replace the file; ftwt does not skip unreadable images") from None
    return max(sizes, key=lambda hw: hw[0] * hw[1])


def _image_folder(path: Path, cfg: DataConfig, val_split: Optional[float]) -> DataSplits:
    in_chans = cfg.input_size[0]
    train_dir = path / "train"
    val_dir = next((path / v for v in _VAL_NAMES if (path / v).is_dir()), None)
    if train_dir.is_dir():
        if val_dir is None and val_split is None:
            raise FtwtError(f"{path} has train/ but no val/ folder", "add DIR/val/CLASS/*.jpg, or pass --val-split 0.1")
        root = train_dir
    else:
        if val_split is None:
            raise FtwtError(f"{path} has no train/ and val/ folders",
                            "lay it out as DIR/train/CLASS/*.jpg + DIR/val/CLASS/*.jpg, or pass --val-split 0.1 for DIR/CLASS/*.jpg")
        root = path
    tr = _SafeImageFolder(root, None, in_chans)
    native = _folder_size(tr)
    small = _small(cfg, native)
    tr.transform = build_transform(cfg, train=True, small=small)
    if train_dir.is_dir() and val_dir is not None:
        va = _SafeImageFolder(val_dir, build_transform(cfg, train=False, small=small), in_chans)
        if va.classes != tr.classes:
            raise FtwtError(f"{val_dir} has classes {va.classes[:3]}… but {train_dir} has {tr.classes[:3]}…",
                            "use the same class folders in train/ and val/")
        return DataSplits(tr, va, tuple(tr.classes), "imagefolder", str(path), small, native)
    va_all = _SafeImageFolder(root, build_transform(cfg, train=False, small=small), in_chans)
    tr_idx, va_idx = _split(len(tr), val_split)
    return DataSplits(Subset(tr, tr_idx), Subset(va_all, va_idx), tuple(tr.classes), "imagefolder", str(path), small, native)


def check_classes(expected: Optional[Sequence[str]], splits: DataSplits) -> None:
    """Refuse data whose class names or order differ from the run's (one line, naming the first difference)."""
    if expected is None or list(expected) == list(splits.classes):
        return
    got = list(splits.classes)
    i = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    def at(names):
        return repr(names[i]) if i < len(names) else "nothing"
    raise FtwtError(f"{splits.source} has other classes than the run: label {i} is {at(got)} there but {at(list(expected))} "
                    f"in the run ({len(got)} against {len(expected)} classes)",
                    "use data with the run's classes in the same order (ImageFolder sorts class folders by name)")


def size_note(splits: DataSplits, cfg: DataConfig) -> Optional[str]:
    """A note when the images' own size is far from the model's input size (each side off by 2× or more)."""
    if splits.native_size is None:
        return None
    (h, w), (_, mh, mw) = splits.native_size, cfg.input_size
    if max(mh / h, h / mh) >= 2 or max(mw / w, w / mw) >= 2:
        return (f"{splits.source} holds {h}×{w} images but the model's input size is {mh}×{mw}: every image is resized "
                f"(set the size the model was trained at with `ftwt attach --input-size`)")
    return None


def default_workers() -> int:
    """DataLoader worker processes when none are asked for.

    Workers run beside torch's own threads, one per core. Without a GPU on 2 cores they slow the model's
    steps more than loading in the main process costs: a fit-gates epoch on Fashion-MNIST took 29.5 s with
    0 workers against 35.0 s with 2, a dense evaluation epoch 21.7 s against 25.2 s (measured). So 0 there;
    otherwise half the cores, at most 4."""
    n = os.cpu_count() or 1
    if n <= 2 and not torch.cuda.is_available():
        return 0
    return max(1, min(4, n // 2))


def make_loader(ds: Dataset, batch_size: int, *, train: bool, workers: Optional[int], seed: int = 0,
                epoch: int = 0, pin_memory: bool = False, sampler=None) -> DataLoader:
    """Shuffling and worker seeds derive from (seed, epoch) alone, so a resumed run sees the same batches
    (with the same number of workers: each worker draws its own augmentations). ``workers=None``: the
    machine's default (``default_workers``)."""
    workers = default_workers() if workers is None else workers
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = len(sampler) if sampler is not None else len(ds)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and n > batch_size, num_workers=workers, generator=g, persistent_workers=False,
                      pin_memory=pin_memory)
