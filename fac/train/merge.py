"""Core-Cocktail's merge: M = alpha * M_stage1 + (1 - alpha) * M_0, optionally with a per-module alpha.

The same arithmetic as mergekit's `linear` method with weights (alpha, 1 - alpha) and normalisation on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fac.atomic import folder as atomic_folder
from fac.model import check_checkpoint, load_checkpoint
from fac.train.trainer import shared_aliases


def alpha_for(name: str, alpha: float, per_module: dict[str, float] | None) -> float:
    """The longest matching prefix in `per_module` decides; otherwise the global alpha."""
    best, value = -1, alpha
    for prefix, a in (per_module or {}).items():
        if name.startswith(prefix) and len(prefix) > best:
            best, value = len(prefix), a
    return value


def linear_merge(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], alpha: float,
                 per_module: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """alpha * other + (1 - alpha) * base for every tensor; both state dicts must have the same names/shapes."""
    if base.keys() != other.keys():
        diff = sorted(set(base) ^ set(other))
        raise ValueError(f"cannot merge: the checkpoints differ in tensors {diff[:5]}")
    merged = {}
    for name, b in base.items():
        o = other[name]
        if b.shape != o.shape:
            raise ValueError(f"cannot merge {name}: shapes {list(b.shape)} and {list(o.shape)} differ")
        a = alpha_for(name, alpha, per_module)
        merged[name] = (a * o.double() + (1.0 - a) * b.double()).to(b.dtype) if b.is_floating_point() else b.clone()
    return merged


def merge_checkpoints(base_dir: str | Path, other_dir: str | Path, alpha: float, out_dir: str | Path,
                      per_module: dict[str, float] | None = None) -> dict:
    """Merge two DRSR checkpoint folders (same config) and save the result with the base's tokenizer."""
    import json

    from transformers import AutoTokenizer

    base_cfg, other_cfg = check_checkpoint(base_dir), check_checkpoint(other_dir)
    if base_cfg.to_diff_dict() != other_cfg.to_diff_dict():
        raise ValueError(f"{base_dir} and {other_dir}: configs differ; only checkpoints of one model can be merged")
    base = load_checkpoint(base_dir)
    other = load_checkpoint(other_dir)
    # Merge each tensor once, under its stored name: a tied alias (the SRH head = the speech embedding)
    # would otherwise be merged with its own alpha and overwrite the stored tensor on load.
    aliases = shared_aliases(base)

    def canonical(state: dict) -> dict:
        return {k: v for k, v in state.items() if k not in aliases}

    merged = linear_merge(canonical(base.state_dict()), canonical(other.state_dict()), alpha, per_module)
    missing, unexpected = base.load_state_dict(merged, strict=False)
    if set(missing) - aliases or unexpected:
        raise RuntimeError(f"merge of {base_dir} and {other_dir} left tensors {sorted(set(missing) - aliases)[:3]} "
                           f"unset or unexpected {unexpected[:3]}")
    info = {"stage": "merge", "alpha": alpha, "per_module": per_module or {}, "base": str(base_dir),
            "other": str(other_dir)}
    with atomic_folder(out_dir) as tmp:
        base.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        (tmp / "merge.json").write_text(json.dumps(info, indent=2))
    return info
