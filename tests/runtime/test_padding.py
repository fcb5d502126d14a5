"""One pad-and-concatenate for blocks of rows of different widths (rlhf_launch/runtime/padding.py), and the rows of
dynamic sampling's rounds put together with it (rlhf_launch/runtime/dynamic_sampling.py ``concat_rows``)."""

from __future__ import annotations

import torch

from rlhf_launch.runtime.dynamic_sampling import concat_rows
from rlhf_launch.runtime.padding import pad_and_concat


def test_blocks_are_padded_on_the_right_or_the_left_to_the_widest():
    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5], [6, 7, 8]])
    assert pad_and_concat([a, b], 9).tolist() == [[1, 2, 9], [3, 4, 5], [6, 7, 8]]
    assert pad_and_concat([a, b], 9, left=True).tolist() == [[9, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert pad_and_concat([a], 0, width=4).tolist() == [[1, 2, 0, 0]]


def test_only_the_second_dimension_is_padded_and_rows_of_one_dimension_are_concatenated():
    wide = pad_and_concat([torch.ones(1, 1, 2), torch.ones(2, 3, 2)], -1.0)
    assert wide.shape == (3, 3, 2) and wide[0, 1:].eq(-1.0).all() and wide[0, 0].eq(1.0).all()
    flags = pad_and_concat([torch.tensor([True]), torch.tensor([False, True])])
    assert flags.tolist() == [True, False, True]


def test_concat_rows_keeps_every_row_and_pads_prompts_left_and_responses_right():
    first = {"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
             "response_ids": torch.tensor([[7, 8, 9]]), "response_mask": torch.tensor([[1, 1, 1]]),
             "gen_logprobs": torch.tensor([[-0.5, -0.25, -1.0]]), "finished": torch.tensor([True])}
    second = {"prompt_ids": torch.tensor([[1, 2, 3], [4, 2, 3]]), "prompt_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
              "response_ids": torch.tensor([[4], [6]]), "response_mask": torch.tensor([[1], [1]]),
              "gen_logprobs": torch.tensor([[-2.0], [-3.0]]), "finished": torch.tensor([False, True])}
    out = concat_rows([first, second], [(1, 1), (0, 0)], pad_id=0)
    assert list(out) == list(first)
    assert out["prompt_ids"].tolist() == [[4, 2, 3], [0, 5, 6]] and out["prompt_mask"].tolist() == [[0, 1, 1], [0, 1, 1]]
    assert out["response_ids"].tolist() == [[6, 0, 0], [7, 8, 9]] and out["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out["gen_logprobs"].tolist() == [[-3.0, 0.0, 0.0], [-0.5, -0.25, -1.0]]
    assert out["finished"].tolist() == [True, True]
