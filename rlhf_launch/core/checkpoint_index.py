"""Which tensors a Hugging Face checkpoint folder holds, read from its index and file headers only.

Shared by the runtime, which copies a value head out of the checkpoint (rlhf_launch/runtime/value_head.py), and
by the launcher's pre-flight check, which must find the same head without loading any weights
or importing torch: a safetensors file starts with a JSON header of every tensor's name and shape.
A model named by hub id is read from its snapshot in the hub cache (rlhf_launch/core/hub_cache.py), as
transformers reads its weights.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from rlhf_launch.core.hub_cache import local_folder

# Names of a one-output value head in reward and value checkpoints: Hugging Face's own, XTuner and
# InternLM2 reward models, OpenRLHF, and TRL's value-head wrapper.
KNOWN_HEADS = ("score", "v_head", "value_head", "v_head.summary")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# A safetensors header is a few KiB per hundred tensors; anything this large is not one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LAYER = re.compile(r"(^|\.)(layers|h|blocks|layer)\.\d+\.")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files (sharded or not) of a Hugging Face folder or of a hub id's snapshot in the hub cache
    (``local_folder``); [] when there is neither, or no weights in it."""
    folder = local_folder(path)
    if folder is None:
        return []
    for index in INDEX_FILES:
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    return [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]


def head_keys(names: set[str] | dict, head: str) -> tuple[str | None, str | None]:
    """(weight key, bias key) of ``head`` in the checkpoint, allowing a wrapper prefix."""
    for prefix in ("", "model.", "base_model."):
        weight = f"{prefix}{head}.weight"
        if weight in names:
            bias = f"{prefix}{head}.bias"
            return weight, bias if bias in names else None
    return None, None


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a .safetensors file, from its header (no tensor is read)."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: too short for a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"{file}: header of {size} bytes; not a safetensors file")
        header = json.loads(f.read(size))
    return {name: list(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def tensor_shapes(folder: str | Path) -> dict[str, list[int] | None] | None:
    """Name -> shape (None where only the name is known) of a checkpoint's tensors (a folder or a cached hub id), or None when
    they cannot be listed without loading the weights (a single pytorch_model.bin) or there are none."""
    root = local_folder(folder)
    files = checkpoint_files(root) if root is not None else []
    if root is None or not files:
        return None
    if all(f.suffix == ".safetensors" for f in files):
        shapes: dict[str, list[int] | None] = {}
        for file in files:
            shapes.update(safetensors_shapes(file))
        return shapes
    for index in INDEX_FILES:
        if (root / index).is_file():
            return dict.fromkeys(json.loads((root / index).read_text())["weight_map"])
    return None


def find_value_head(names: set[str] | dict, head_name: str | None) -> str | None:
    """The head the runtime would use: ``head_name`` when given, else ``score`` or one of the other
    known names; None when the checkpoint has none of them."""
    for head in [head_name] if head_name else KNOWN_HEADS:
        if head_keys(names, head)[0] is not None:
            return head
    return None


def head_like_tensors(shapes: dict[str, list[int] | None], limit: int = 8) -> list[str]:
    """Tensors outside the decoder layers, one-output ones first, as 'name [shape]' (up to ``limit``):
    what a value head of an unknown name would be among."""
    outside = [name for name in shapes if not _LAYER.search(name)]

    def one_output(name: str) -> bool:
        shape = shapes[name]
        return shape is not None and (len(shape) <= 1 or shape[0] == 1)

    ranked = sorted(outside, key=lambda name: (not one_output(name), name))
    return [f"{name!r} {shapes[name]}" if shapes[name] is not None else repr(name) for name in ranked[:limit]]
