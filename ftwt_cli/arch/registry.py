"""The architectures ftwt can build: a registry view over torchvision and timm.

``parse_arch`` (a name → ArchSpec, with close-name suggestions), ``build_model`` (random init, optionally on the meta
device, which is cheap), ``head_and_stem`` and ``load_weights`` (a strict load that names what does not fit).
Detection of a bare state dict is ``detect``; the input a model expects is ``dataconfig``.
"""
from __future__ import annotations

import difflib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import FtwtError

__all__ = ["ArchSpec", "SOURCES", "parse_arch", "build_model", "head_and_stem", "load_weights", "list_archs"]

SOURCES = ("torchvision", "timm")


@dataclass(frozen=True)
class ArchSpec:
    source: str  # "torchvision" | "timm"
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


@lru_cache(maxsize=None)
def _torchvision_names() -> Tuple[str, ...]:
    import torchvision  # deferred: torchvision loads only when this runs (start-up)
    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=None)
def _timm_names() -> Tuple[str, ...]:
    import timm  # deferred: timm takes seconds to import, and torchvision models never need it
    return tuple(timm.list_models())


def list_archs() -> List[ArchSpec]:
    return [ArchSpec("torchvision", n) for n in _torchvision_names()] + [ArchSpec("timm", n) for n in _timm_names()]


def parse_arch(text: str) -> ArchSpec:
    """``timm:NAME``, ``torchvision:NAME`` or a bare name (torchvision first, then timm)."""
    source, _, name = text.rpartition(":")
    name = name.strip()
    if source and source not in SOURCES:
        raise FtwtError(f"unknown architecture source '{source}' in --arch {text}",
                        f"use one of {', '.join(s + ':NAME' for s in SOURCES)}")
    # timm names may carry a pretrained tag (resnet34.tv_in1k); the architecture is the part before it.
    name = name.split(".")[0] if source != "torchvision" else name
    # each source's names only as needed: listing timm's imports timm (seconds), which a torchvision name never needs
    names = {"torchvision": _torchvision_names, "timm": _timm_names}
    for src in ([source] if source else SOURCES):
        if name in names[src]():
            return ArchSpec(src, name)
    pools = {"torchvision": _torchvision_names(), "timm": _timm_names()}
    every = [f"{s}:{n}" for s in ([source] if source else SOURCES) for n in pools[s]]
    close = difflib.get_close_matches(text if source else name, every if source else list(set(pools["timm"]) | set(pools["torchvision"])), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "list choices with: python -c 'import timm; print(timm.list_models(\"resnet*\"))'"
    raise FtwtError(f"unknown architecture '{text}'", hint)


# --------------------------------------------------------------------------------------------- building
def _replace_stem_in_chans(model: nn.Module, in_chans: int) -> None:
    """torchvision models are fixed at 3 input channels; swap the first conv for one with ``in_chans``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_chans:
                return
            new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def build_model(arch: ArchSpec, num_classes: Optional[int] = None, in_chans: int = 3, *, meta: bool = False) -> nn.Module:
    """Random-init model. ``meta=True`` builds without allocating weights (falls back to CPU for the few
    builders, like torchvision's RegNets, that compute with tensors while constructing)."""
    def _build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if arch.source == "timm":
                import timm  # deferred: timm takes seconds to import, and torchvision models never need it
                kw = {} if num_classes is None else {"num_classes": num_classes}
                return timm.create_model(arch.name, pretrained=False, in_chans=in_chans, **kw)
            import torchvision  # deferred: torchvision loads only when this runs (start-up)
            kw = {} if num_classes is None else {"num_classes": num_classes}
            if arch.name in ("googlenet", "inception_v3"):
                kw["init_weights"] = False   # the scipy-based init is slow and irrelevant: weights get loaded
            m = torchvision.models.get_model(arch.name, weights=None, **kw)
            if in_chans != 3:
                _replace_stem_in_chans(m, in_chans)
            return m

    if meta:
        try:
            with torch.device("meta"):
                return _build()
        except (NotImplementedError, RuntimeError):
            pass
    try:
        return _build()
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise FtwtError(f"cannot build {arch} with num_classes={num_classes}, in_chans={in_chans} ({e})",
                        "check --num-classes / --in-chans") from None


def head_and_stem(model: nn.Module, arch: ArchSpec) -> Tuple[Optional[str], Optional[str]]:
    """Module paths of the classifier head and the stem conv (from timm's cfg when it has one)."""
    head = stem = None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if arch.source == "timm":
        c = cfg.get("classifier")
        head = (c[0] if c else None) if isinstance(c, (tuple, list)) else c      # timm may state an empty list
        stem = cfg.get("first_conv")
        stem = (stem[0] if stem else None) if isinstance(stem, (tuple, list)) else stem
    names = dict(model.named_modules())
    if head not in names:
        lin = [n for n, m in names.items() if isinstance(m, nn.Linear)]
        convs = [n for n, m in names.items() if isinstance(m, nn.Conv2d)]
        head = lin[-1] if lin else (convs[-1] if convs else None)
    if stem not in names:
        stem = next((n for n, m in names.items() if isinstance(m, nn.Conv2d)), None)
    return head, stem


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: ArchSpec) -> None:
    """Strict load with a one-line summary of what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
        raise FtwtError(f"the checkpoint does not fit {arch}: {'; '.join(parts)} keys",
                        "pass the right --arch / --num-classes / --in-chans, or omit --arch to detect it")
    for k, v in own.items():
        if v.is_floating_point() and not sd[k].is_floating_point():
            raise FtwtError(f"the checkpoint's {k} holds {sd[k].dtype} values where {arch} has floating-point weights",
                            "save the model's own state_dict() (its weights are floats)")
    sd = OrderedDict(sd)
    # Some modules read the version their weights were saved with (torchvision's MNASNet); a state dict that lost it
    # (rebuilt, or from safetensors) gets the current one, which is what build_model constructed.
    sd._metadata = getattr(sd, "_metadata", None) or getattr(own, "_metadata", None)
    model.load_state_dict(sd, strict=True)
