"""Read a user's checkpoint into a clean ``{key: tensor}`` state dict, weights-only by default.

Formats: torchvision-style state dicts (.pth/.pt/.bin), timm train.py checkpoints (``state_dict``,
``state_dict_ema``, ``model``, ...), Lightning checkpoints (``model.`` prefix), DDP (``module.``) and
torch.compile (``_orig_mod.``) prefixes, ``.safetensors`` files, and hub folders (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``). The input file is only ever opened for reading.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..errors import FtwtError

__all__ = ["LoadedCheckpoint", "read_checkpoint", "clean_state_dict", "sha256_file"]

# Checked in order; timm's load_state_dict uses the same precedence (EMA first only when asked).
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_PLAIN_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "weights")
# Wrapper prefixes stripped from every key: DDP, torch.compile, Lightning/wrapper modules.
_PREFIXES = ("module.", "_orig_mod.", "model.")
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: Dict[str, torch.Tensor]
    path: Path               # the file the weights came from
    sha256: str
    fmt: str                 # "state_dict" | "timm-train" | "lightning" | "safetensors" | "hub" | "pickled-module"
    hub_config: Optional[Dict[str, Any]] = None
    arch: Optional[str] = None    # what the checkpoint says it is ("timm:NAME" from a timm train.py checkpoint's ``arch``)
    input_config: Dict[str, Any] = field(default_factory=dict)   # input_size, mean, std, interpolation, crop_pct it states
    classes: Optional[Tuple[str, ...]] = None                    # class names, where the checkpoint has them
    notes: tuple = field(default_factory=tuple)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_state_dict(sd: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Keep tensors, strip wrapper prefixes that *every* key carries (so a real top-level module called
    ``model`` in an architecture is never mangled), drop AveragedModel's ``n_averaged`` counter."""
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and k != "n_averaged"}
    meta = getattr(sd, "_metadata", None)      # module versions torch.save keeps beside the tensors
    changed = True
    while changed and out:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items() if k[len(p):] != "n_averaged"}
                if meta is not None:
                    meta = OrderedDict((k[len(p):] if k.startswith(p) else "", v) for k, v in meta.items()
                                       if k.startswith(p) or k == p[:-1])
                changed = True
    out = OrderedDict(out)
    if meta is not None:
        out._metadata = meta
    return out


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        # timm's train.py stores its argparse.Namespace of arguments; timm's own loader allow-lists that type for
        # weights-only loading, and so do we (an allow-list, never a general unpickle)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise FtwtError(
                f"{path} contains pickled Python objects (for example a whole nn.Module), which ftwt does not "
                "unpickle by default because unpickling can run arbitrary code",
                "re-save it with torch.save(model.state_dict(), PATH), or pass --trust-pickle if you trust its source",
            ) from None
        raise FtwtError(f"{path} is not a PyTorch checkpoint ({e})", "pass a .pth/.pt/.bin/.safetensors file") from None
    except Exception as e:  # torch.load raises KeyError, EOFError, RuntimeError, ... for a damaged file
        if isinstance(e, FtwtError):
            raise
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise FtwtError(
            f"cannot read {path}: it is truncated, corrupt or not a PyTorch checkpoint ({first})",
            "check the file (re-download or re-save it)",
        ) from None


def _unwrap(obj: Any, use_ema: bool, path: Path) -> tuple[Mapping[str, Any], str]:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(), "pickled-module"
    if not isinstance(obj, Mapping):
        raise FtwtError(f"{path} holds a {type(obj).__name__}, not a state dict", "save model.state_dict()")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "state_dict"
    if use_ema and not any(k in obj for k in _EMA_KEYS):
        raise FtwtError(f"{path} has no EMA weights (looked for {', '.join(_EMA_KEYS)})", "drop --use-ema")
    keys = (_EMA_KEYS if use_ema else ()) + _PLAIN_KEYS
    for k in keys:
        v = obj.get(k)
        if isinstance(v, torch.nn.Module):
            return v.state_dict(), "pickled-module"
        if isinstance(v, Mapping) and any(isinstance(t, torch.Tensor) for t in v.values()):
            fmt = "lightning" if "pytorch-lightning_version" in obj else "timm-train"
            return v, fmt
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors, "state_dict"
    raise FtwtError(
        f"{path} holds no weights: top-level keys are {', '.join(map(str, list(obj)[:8]))}",
        "pass a state dict or a checkpoint with a 'state_dict' or 'model' entry",
    )


_INPUT_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def _input_config(obj: Any, hub_config: Optional[Mapping]) -> Dict[str, Any]:
    """What a checkpoint says about the model's input: a timm train.py checkpoint's ``args`` (``input_size`` or
    ``img_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``), a ``pretrained_cfg``, or a hub config.json
    (its ``pretrained_cfg`` or top-level keys). Only stated values; None and empty ones are left out."""
    found: Dict[str, Any] = {}
    sources = []
    if hub_config:
        sources += [hub_config.get("pretrained_cfg") or {}, hub_config]
    if isinstance(obj, Mapping):
        sources.append(obj.get("pretrained_cfg") or {})
        args = obj.get("args")
        a = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, Mapping) else None
        if a is not None and _is_torchvision_reference(a):
            sources.append(_torchvision_reference_input(a))
        elif a is not None:
            sources.append({**a, "input_size": a.get("input_size") or (
                [a.get("in_chans") or 3, a["img_size"], a["img_size"]] if a.get("img_size") else None)})
    for src in sources:
        if not isinstance(src, Mapping):
            continue
        for k in _INPUT_KEYS:
            v = src.get(k)
            if k not in found and v not in (None, "", [], ()):
                found[k] = list(v) if isinstance(v, (list, tuple)) else v
    return found


def _is_torchvision_reference(a: Mapping) -> bool:
    """The ``args`` of torchvision's reference training script (references/classification/train.py)."""
    return any(k in a for k in ("train_crop_size", "val_crop_size", "val_resize_size"))


# torchvision's reference script defaults: it evaluates at val_crop_size after resizing to val_resize_size
_TV_VAL_CROP, _TV_VAL_RESIZE = 224, 256


def _torchvision_reference_input(a: Mapping) -> Dict[str, Any]:
    """Input size, crop and interpolation from torchvision's reference-script ``args`` (mean/std are ImageNet's there,
    fixed in its presets, so they are not stated). The evaluation size is ``val_crop_size``, unless only
    ``train_crop_size`` was changed from the defaults (a small-image run: the model learned at that size, and the
    evaluation sizes were left at 224/256 unread by the user)."""
    train, val = a.get("train_crop_size"), a.get("val_crop_size")
    resize = a.get("val_resize_size")
    size = val or train
    if train and train != _TV_VAL_CROP and val in (None, _TV_VAL_CROP) and resize in (None, _TV_VAL_RESIZE):
        size, resize = train, train
    out: Dict[str, Any] = {"interpolation": a.get("interpolation")}
    if size:
        out["input_size"] = [3, int(size), int(size)]
        if resize:
            out["crop_pct"] = round(min(1.0, int(size) / int(resize)), 4)
    return out


def _classes(hub_config: Optional[Mapping]) -> Optional[Tuple[str, ...]]:
    """Class names from a hub config.json (``label_names``, or ``id2label`` by index)."""
    if not hub_config:
        return None
    names = hub_config.get("label_names") or (hub_config.get("pretrained_cfg") or {}).get("label_names")
    if isinstance(names, list) and names:
        return tuple(str(n) for n in names)
    id2label = hub_config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            return tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        except (TypeError, ValueError):
            return None
    return None


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError  # deferred: only safetensors files need it
    from safetensors.torch import load_file  # deferred: only safetensors files need it

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FtwtError(f"cannot read {path}: not a valid safetensors file ({e})", "check the file") from None


def read_checkpoint(path: Path | str, *, use_ema: bool = False, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read any supported checkpoint. Raises FtwtError with a fix for anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise FtwtError(f"checkpoint not found: {path}", "check the path")
    hub_config = None
    if path.is_dir():
        cfg = path / "config.json"
        weights = next((path / w for w in _HUB_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise FtwtError(
                f"{path} is a folder without {' or '.join(_HUB_WEIGHTS)}",
                "pass a checkpoint file, or a hub folder with config.json and model.safetensors",
            )
        if cfg.is_file():
            try:
                hub_config = json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FtwtError(f"{cfg} is not valid JSON ({e})", "fix or remove config.json") from None
        path = weights
    if path.stat().st_size == 0:
        raise FtwtError(f"{path} is empty", "check the file (re-download or re-save it)")

    arch, obj = None, None
    if path.suffix == ".safetensors":
        raw, fmt = _read_safetensors(path), "safetensors"
    else:
        obj = _torch_load(path, trust_pickle)
        raw, fmt = _unwrap(obj, use_ema, path)
        if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str) and obj["arch"]:
            # timm's train.py saves timm model names: look the name up among timm's, not torchvision's
            arch = obj["arch"] if ":" in obj["arch"] or fmt != "timm-train" else f"timm:{obj['arch']}"
        elif isinstance(obj, Mapping) and isinstance(obj.get("args"), (argparse.Namespace, Mapping)):
            a = vars(obj["args"]) if isinstance(obj["args"], argparse.Namespace) else obj["args"]
            if _is_torchvision_reference(a) and isinstance(a.get("model"), str) and a["model"]:
                arch = f"torchvision:{a['model']}"      # torchvision's reference script names its model in args.model
    if hub_config is not None:
        fmt = "hub"
    sd = clean_state_dict(raw)
    if not sd:
        raise FtwtError(f"{path} holds no tensors", "pass a checkpoint with model weights")
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise FtwtError(f"{path}: tensor {k} holds NaN or infinite values", "use a checkpoint from before training diverged")
    return LoadedCheckpoint(state_dict=sd, path=path.resolve(), sha256=sha256_file(path), fmt=fmt, hub_config=hub_config,
                            arch=arch, input_config=_input_config(obj, hub_config), classes=_classes(hub_config))
