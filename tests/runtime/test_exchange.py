"""Moving tensors between ranks (rlhf_launch/runtime/exchange.py): shard bounds, broadcasts whose dtype and shape
only the source knows, and gathers of shards of different widths; on a one-rank group and on a
real two-rank gloo group (two local processes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from rlhf_launch.runtime import exchange
from rlhf_launch.runtime.dist import PeerGroup
from rlhf_launch.runtime.exchange import broadcast_tensor, gather_from, shard_bounds
from tests.factory import run_on_ranks

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8]
SHAPES = [(), (3,), (2, 3), (2, 1, 3), (1, 2, 2, 3)]  # 0 to 4 dimensions


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values that tell sources (``seed``) and positions apart, exact in every dtype."""
    values = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape) + 5 * seed
    if dtype == torch.bool:
        return values % 3 == seed % 3
    if dtype.is_floating_point:
        return (values.double() * 0.5 - 1.0).to(dtype)  # halves and negatives, exact in half precision
    return values.to(dtype)


def one_rank_group() -> PeerGroup:
    """A gloo group of this process alone."""
    return PeerGroup(dist.HashStore(), "one", [0], 0, CPU)


def two_rank_group(rank: int, store) -> PeerGroup:
    """The gloo group of ranks 0 and 1 on ``store``; a lost peer fails it in 30 s rather than 30 min."""
    return PeerGroup(store, "pair", [0, 1], rank, CPU, timeout_s=30)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and values, exactly."""
    assert got.dtype == expected.dtype and tuple(got.shape) == tuple(expected.shape), (got, expected)
    assert torch.equal(got, expected), (got, expected)


# --------------------------------------------------------------------------- shard_bounds
@pytest.mark.parametrize("size, parts", [(8, 1), (8, 2), (12, 3), (32, 4), (6, 6), (0, 2)])
def test_shards_are_contiguous_equal_and_in_order(size, parts):
    bounds = [shard_bounds(size, parts, i) for i in range(parts)]
    rows = [r for start, stop in bounds for r in range(start, stop)]
    assert rows == list(range(size))  # every row once, shard 0 first
    assert {stop - start for start, stop in bounds} == {size // parts}


def test_shard_bounds_known_answer():
    assert [shard_bounds(12, 3, i) for i in range(3)] == [(0, 4), (4, 8), (8, 12)]


# --------------------------------------------------------------------------- broadcast_tensor
def test_the_dtype_table_is_the_one_tested():
    """A dtype added to the wire table gets tested here too."""
    assert exchange._DTYPES == DTYPES and exchange._MAX_DIMS == len(SHAPES) - 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_broadcast_on_one_rank_returns_the_tensor(dtype, shape):
    sent = sample(dtype, shape, seed=1)
    assert_same(broadcast_tensor(sent, 0, CPU, one_rank_group(), 0), sent)


def test_broadcast_refuses_what_the_header_cannot_describe():
    group = one_rank_group()
    with pytest.raises(AssertionError):
        broadcast_tensor(torch.zeros(1, 1, 1, 1, 1), 0, CPU, group, 0)  # 5 dimensions
    with pytest.raises(ValueError):
        broadcast_tensor(torch.zeros(2, dtype=torch.complex64), 0, CPU, group, 0)


def _broadcast_everything(rank: int, world: int, store) -> dict:
    group = two_rank_group(rank, store)
    received = {}
    for src in (0, 1):
        for dtype in DTYPES:
            for shape in SHAPES:
                sent = sample(dtype, shape, seed=src) if rank == src else None
                received[src, str(dtype), shape] = broadcast_tensor(sent, src, CPU, group, rank)
        # A non-contiguous tensor (a transposed view) arrives with its logical layout.
        sent = sample(torch.float32, (3, 4), seed=src).t() if rank == src else None
        received[src, "transposed"] = broadcast_tensor(sent, src, CPU, group, rank)
    return received


def test_broadcast_on_two_ranks_every_dtype_and_dimension_from_either_rank():
    results = run_on_ranks(_broadcast_everything, 2)
    for rank, received in enumerate(results):
        for src in (0, 1):
            for dtype in DTYPES:
                for shape in SHAPES:
                    assert_same(received[src, str(dtype), shape], sample(dtype, shape, seed=src))
            assert_same(received[src, "transposed"], sample(torch.float32, (3, 4), seed=src).t().contiguous())
        assert len(received) == 2 * (len(DTYPES) * len(SHAPES) + 1), f"rank {rank}"


# --------------------------------------------------------------------------- gather_from
def shard(rank: int, rows: int, width: int) -> dict[str, torch.Tensor]:
    """A rank's shard: token ids and a mask [rows, width], per-token values [rows, width, 2], a score per row."""
    ids = torch.tensor([[100 * rank + 10 * r + t + 1 for t in range(width)] for r in range(rows)])
    return {
        "response_ids": ids,
        "response_mask": torch.ones(rows, width, dtype=torch.int64),
        "values": torch.stack([ids.float(), -ids.float()], dim=-1),
        "scores": torch.tensor([float(100 * rank + r) for r in range(rows)]),
    }


KEYS = ["response_ids", "response_mask", "values", "scores"]
PAD = {"response_ids": 7, "values": -1}  # response_mask and scores take the default 0


def expected_gather(shards: list[tuple[int, int, int]], pad: dict[str, int]) -> dict[str, torch.Tensor]:
    """The gather written out row by row: shards in rank order, each row right-padded to the widest."""
    width = max(w for _, _, w in shards)
    ids, mask, values, scores = [], [], [], []
    for rank, rows, w in shards:
        for r in range(rows):
            row = [100 * rank + 10 * r + t + 1 for t in range(w)]
            fill = width - w
            ids.append(row + [pad.get("response_ids", 0)] * fill)
            mask.append([1] * w + [pad.get("response_mask", 0)] * fill)
            values.append([[float(x), float(-x)] for x in row] + [[float(pad.get("values", 0))] * 2] * fill)
            scores.append(float(100 * rank + r))
    return {"response_ids": torch.tensor(ids), "response_mask": torch.tensor(mask),
            "values": torch.tensor(values), "scores": torch.tensor(scores)}


def test_gather_on_one_rank_returns_the_shard():
    local = shard(0, rows=3, width=4)
    gathered = gather_from([0], local, KEYS, CPU, one_rank_group(), 0, PAD)
    assert list(gathered) == KEYS
    for key in KEYS:
        assert_same(gathered[key], local[key])


def _gather_two_shards(rank: int, world: int, store) -> list[dict]:
    group = two_rank_group(rank, store)
    rows, width = [(2, 2), (3, 4)][rank]  # rank 1's responses are wider, and it has more rows
    local = shard(rank, rows, width)
    return [
        gather_from([0, 1], local, KEYS, CPU, group, rank, PAD),
        gather_from([0, 1], local, KEYS, CPU, group, rank),  # every pad value the default 0
        gather_from([1], local if rank == 1 else None, KEYS, CPU, group, rank, PAD),  # rank 0 computed nothing
    ]


def test_gather_on_two_ranks_pads_to_the_widest_in_rank_order():
    results = run_on_ranks(_gather_two_shards, 2)
    both = [(0, 2, 2), (1, 3, 4)]
    for padded, default, from_one in results:  # every rank receives the same whole batch
        for key in KEYS:
            assert_same(padded[key], expected_gather(both, PAD)[key])
            assert_same(default[key], expected_gather(both, {})[key])
            assert_same(from_one[key], expected_gather([(1, 3, 4)], PAD)[key])


# --------------------------------------------------------------------------- uneven shards
def _plain_shards(size: int, parts: int) -> list[tuple[int, int]]:
    """Deal the rows out one at a time to the shard with the fewest (the first among equals), then
    number them in shard order: contiguous shards, first ones larger, sizes within one."""
    sizes = [0] * parts
    for _ in range(size):
        sizes[sizes.index(min(sizes))] += 1
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


@pytest.mark.parametrize("size, parts", [(512, 3), (10, 4), (7, 7), (5, 2), (3, 5), (33, 8), (1, 1)])
def test_uneven_shards_match_a_plain_deal(size, parts):
    assert [shard_bounds(size, parts, i) for i in range(parts)] == _plain_shards(size, parts)


def test_512_prompts_over_3_ranks():
    assert [shard_bounds(512, 3, i) for i in range(3)] == [(0, 171), (171, 342), (342, 512)]


def _gather_unequal_rows(rank: int, world: int, store) -> dict:
    group = two_rank_group(rank, store)
    rows, width = [(3, 2), (2, 4)][rank]
    return gather_from([0, 1], shard(rank, rows, width), KEYS, CPU, group, rank, PAD)


def test_gather_on_two_ranks_with_unequal_row_counts():
    """Shares of 3 and 2 rows (and widths 2 and 4): every rank gets the 5 rows in rank order."""
    expected = expected_gather([(0, 3, 2), (1, 2, 4)], PAD)
    for got in run_on_ranks(_gather_unequal_rows, 2):
        assert set(got) == set(expected)
        for key in expected:
            assert_same(got[key], expected[key])
