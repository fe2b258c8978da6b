"""What a model expects at its input (timm's data config): ``DataConfig``, checked when flags or a checkpoint change
it, and ``resolve_data_config``, the values an architecture's reference weights were trained with (timm's
``resolve_model_data_config``; torchvision's weights' own transforms)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Tuple

import torch.nn as nn

from ..errors import FtwtError
from ..settings import AUGMENTS, INTERPOLATIONS
from .registry import ArchSpec

__all__ = ["DataConfig", "resolve_data_config"]


@dataclass(frozen=True)
class DataConfig:
    """What a model expects at its input, as timm's data config spells it."""
    input_size: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    augment: str = "auto"           # training augmentation: auto (by image size) | small (pad-crop + flip) | imagenet | none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "DataConfig":
        return cls(input_size=tuple(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bilinear"), crop_pct=float(d.get("crop_pct", 0.875)),
                   crop_mode=d.get("crop_mode", "center"), augment=d.get("augment", "auto"))

    def updated(self, values: Mapping, where: str) -> "DataConfig":
        """This config with ``values`` (input_size, mean, std, interpolation, crop_pct, crop_mode, augment) put in,
        checked; ``where`` names their source in errors ("--mean", "the checkpoint")."""
        d = self.to_dict()
        c = self.input_size[0]
        for k, v in values.items():
            if v is None:
                continue
            what = f"--{k.replace('_', '-')}" if where == "the flags" else f"{k} from {where}"
            if k == "input_size":
                v = tuple(int(x) for x in v)
                if len(v) == 2:
                    v = (c, *v)
                if len(v) != 3 or min(v) <= 0 or v[0] != c:
                    raise FtwtError(f"{what} {','.join(map(str, v))} does not fit a model reading {c} channels",
                                    f"pass --input-size {c},{v[-2]},{v[-1]}")
            elif k in ("mean", "std"):
                v = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
                if len(v) == 1:                    # one value for every channel, as timm's train.py expands it
                    v = v * c
                if len(v) != c:
                    if where != "the checkpoint" or len(v) != 3:
                        raise FtwtError(f"{what} has {len(v)} values but the model reads {c} channels",
                                        f"pass {c} values")
                    v = (sum(v) / 3,) * c          # RGB statistics for a model with another channel count
            elif k == "interpolation" and v not in INTERPOLATIONS:
                raise FtwtError(f"{what} '{v}' is unknown", f"use one of {', '.join(INTERPOLATIONS)}")
            elif k == "crop_pct" and not 0 < float(v) <= 1:
                raise FtwtError(f"{what} {v} is outside (0, 1]", "e.g. --crop-pct 0.875 (1 = no crop)")
            elif k == "augment" and v not in AUGMENTS:
                raise FtwtError(f"{what} '{v}' is unknown", f"use one of {', '.join(AUGMENTS)}")
            d[k] = float(v) if k == "crop_pct" else v
        return DataConfig.from_dict(d)


def resolve_data_config(arch: ArchSpec, model: nn.Module, in_chans: int = 3) -> DataConfig:
    """Input size, mean/std, interpolation and crop the architecture's reference weights were trained with."""
    if arch.source == "timm":
        # deferred: timm takes seconds to import, and torchvision models never need it
        from timm.data import resolve_model_data_config
        c = resolve_model_data_config(model)
        size, mean, std = tuple(c["input_size"]), tuple(c["mean"]), tuple(c["std"])
        interp, crop_pct, crop_mode = c.get("interpolation", "bilinear"), c.get("crop_pct", 0.875), c.get("crop_mode", "center")
    else:
        from torchvision.models import get_model_weights  # deferred: torchvision loads only when this runs (start-up)
        size, mean, std = (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        interp, crop_pct, crop_mode = "bilinear", 0.875, "center"
        try:
            t = get_model_weights(arch.name).DEFAULT.transforms()
            crop, resize = t.crop_size[0], t.resize_size[0]
            size, mean, std = (3, crop, crop), tuple(t.mean), tuple(t.std)
            interp, crop_pct = t.interpolation.value, round(crop / resize, 4)
        except (ValueError, AttributeError, KeyError):
            pass
    if len(mean) != in_chans:   # e.g. a 1-channel stem: average the RGB statistics
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return DataConfig((in_chans, size[1], size[2]), mean, std, interp, float(crop_pct), crop_mode)
