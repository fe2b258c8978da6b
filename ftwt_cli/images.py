"""Images → the tensor a loaded model expects: the run's own evaluation transform, for the Python API.

The same transform ``ftwt evaluate`` applies (``data.build_transform`` on the run's data config): resize (and centre
crop by ``crop_pct``) to the input size, scale to [0, 1], normalise by the run's mean and std. Images of at most
``data.SMALL_IMAGE`` px take the small-image path (a plain resize) exactly as in training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from .data import SMALL_IMAGE, _to_8bit, build_transform
from .errors import FtwtError

__all__ = ["preprocess"]

Image = Any   # a PIL image, a path to one, a (C, H, W) uint8/float tensor in [0, 255]/[0, 1], or an (H, W[, C]) uint8 array


def _as_pil(image: Image, mode: str):
    from PIL import Image as PILImage  # deferred: only image files need PIL

    if isinstance(image, (str, Path)):
        try:
            with PILImage.open(image) as im:
                return _to_8bit(im).convert(mode)
        except (OSError, ValueError) as e:
            raise FtwtError(f"cannot read image {image} ({e})", "pass a readable image file") from None
    if isinstance(image, PILImage.Image):
        return _to_8bit(image).convert(mode)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() != 3:
            raise FtwtError(f"an image tensor must be (C, H, W), not {tuple(t.shape)}", "pass one image, or a list of them")
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        from torchvision.transforms.v2.functional import to_pil_image  # torchvision's own tensor → PIL conversion
        return to_pil_image(t.to(torch.uint8)).convert(mode)
    try:
        a = np.asarray(image)
    except Exception:
        a = None
    if a is None or a.ndim not in (2, 3):
        raise FtwtError(f"cannot read a {type(image).__name__} as an image",
                        "pass a PIL image, a file path, a (C, H, W) tensor or an (H, W[, C]) uint8 array")
    return PILImage.fromarray(a.astype("uint8")).convert(mode)


def preprocess(model: Any, images: Union[Image, Sequence[Image]]) -> torch.Tensor:
    """A batch (N, C, H, W) for ``model`` (what ``ftwt_cli.load`` returns, or its ``RunMeta``) from one image or a
    list of them, on the model's device::

        model = ftwt_cli.load("ftwt-run")
        logits = model(ftwt_cli.preprocess(model, "cat.jpg"))
    """
    meta = getattr(model, "meta", model)
    cfg = getattr(meta, "data_config", None)
    if cfg is None:
        raise FtwtError("preprocess needs a model from ftwt_cli.load (or its .meta)", "pass ftwt_cli.load(RUN_OR_FILE)")
    many = isinstance(images, (list, tuple))
    mode = "L" if cfg.input_size[0] == 1 else "RGB"
    out = []
    for im in (images if many else [images]):
        pil = _as_pil(im, mode)
        small = cfg.augment == "small" or (cfg.augment != "imagenet" and max(pil.size) <= SMALL_IMAGE)
        out.append(build_transform(cfg, train=False, small=small)(pil))
    x = torch.stack(out)
    params = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return x.to(params.device) if params is not None else x
