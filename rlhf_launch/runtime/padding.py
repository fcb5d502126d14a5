"""Stacking blocks of rows whose widths differ: each padded along its second dimension to one width, then
concatenated. Rollouts need it wherever blocks meet: generated chunks of different response lengths, the shards
gathered from several ranks, the rounds of dynamic sampling (whose prompts are padded on the left).

Only padding is added, never a value changed: a row's tokens keep their positions relative to its mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pad_and_concat(blocks: list[Tensor], value: float = 0, left: bool = False, width: int | None = None) -> Tensor:
    """``blocks`` ([b_i, w_i, ...]) concatenated along their rows, each padded with ``value`` along its second
    dimension to ``width`` (default: the widest w_i): on the right, or with ``left`` on the left. Blocks of one
    dimension have no width: they are concatenated as they are."""
    if blocks[0].dim() >= 2:
        width = max(b.shape[1] for b in blocks) if width is None else width
        blocks = [_pad_columns(b, width - b.shape[1], value, left) for b in blocks]
    return torch.cat(blocks)


def _pad_columns(block: Tensor, extra: int, value: float, left: bool) -> Tensor:
    # F.pad lists its (before, after) pairs from the last dimension back: the leading zeros skip dimensions 2, 3, ...
    if extra == 0:
        return block
    return torch.nn.functional.pad(block, (0, 0) * (block.dim() - 2) + ((extra, 0) if left else (0, extra)), value=value)
