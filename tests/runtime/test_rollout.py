"""Generation and the rollout layout."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime.models import load_causal_lm
from rlhf_launch.runtime.padding import pad_and_concat
from rlhf_launch.runtime.rollout import SamplingSettings, hf_generate, response_mask, sequences

torch.set_num_threads(1)


def settings(**kw) -> SamplingSettings:
    base = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0, max_new_tokens=12, stop_ids=(2,), pad_id=0)
    return SamplingSettings(**{**base, **kw})


def test_response_mask_stops_after_the_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9], [9, 9, 9, 3, 0]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert response_mask(ids, (2,)).tolist()[:3] == expected[:3]
    assert response_mask(ids, (2, 3)).tolist()[3] == expected[3]


def test_pad_and_concat():
    out = pad_and_concat([torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5]])], value=0)
    assert out.tolist() == [[1, 2, 0], [3, 4, 5]]


@pytest.fixture(scope="module")
def actor(tiny_models):
    return load_causal_lm(str(tiny_models / "actor"), "float32", torch.device("cpu"))


def prompts(pad=0):
    ids = torch.tensor([[pad, pad, 1, 5, 9], [1, 7, 8, 9, 10], [pad, pad, pad, 1, 4]])
    return ids, (ids != pad).long()


def test_generation_layout_and_micro_batches(actor):
    ids, mask = prompts()
    torch.manual_seed(0)
    out = hf_generate(actor, ids, mask, settings(), micro_bs=2)
    assert out["prompt_ids"] is ids and out["response_ids"].shape[0] == 3
    assert out["response_ids"].shape[1] <= 12
    m, r = out["response_mask"], out["response_ids"]
    assert (r[m == 0] == 0).all(), "tokens after the stop are padding"
    for row_mask, row, finished in zip(m, r, out["finished"], strict=False):
        n = int(row_mask.sum())
        assert row_mask[:n].all()
        assert bool(finished) == (2 in row[:n].tolist())
        if finished:
            assert row[n - 1] == 2
    input_ids, attention_mask = sequences(out)
    assert input_ids.shape[1] == ids.shape[1] + r.shape[1]


def test_greedy_generation_is_deterministic_and_independent_of_micro_batching(actor):
    ids, mask = prompts()
    a = hf_generate(actor, ids, mask, settings(do_sample=False), micro_bs=3)
    b = hf_generate(actor, ids, mask, settings(do_sample=False), micro_bs=1)
    assert torch.equal(a["response_ids"], b["response_ids"])


def test_min_new_tokens_and_seeded_sampling(actor):
    ids, mask = prompts()
    torch.manual_seed(1)
    a = hf_generate(actor, ids, mask, settings(min_new_tokens=12), micro_bs=3)
    torch.manual_seed(1)
    b = hf_generate(actor, ids, mask, settings(min_new_tokens=12), micro_bs=3)
    assert torch.equal(a["response_ids"], b["response_ids"])
    assert (a["response_mask"].sum(1) == 12).all()


def test_generation_ignores_checkpoint_and_library_defaults(actor, tmp_path):
    """A checkpoint asking for top_k 1 and a repetition penalty must not change our sampling (top_k 0 = off)."""
    cfg = settings(top_k=0, top_p=1.0, stop_ids=(2, 7)).generation_config()
    assert cfg.top_k == 0 and cfg.eos_token_id == [2, 7] and cfg.repetition_penalty == 1.0
    ids, mask = prompts()
    torch.manual_seed(3)
    ours = hf_generate(actor, ids, mask, settings(), micro_bs=3)["response_ids"]
    actor.generation_config.top_k = 1
    actor.generation_config.repetition_penalty = 5.0
    try:
        torch.manual_seed(3)
        again = hf_generate(actor, ids, mask, settings(), micro_bs=3)["response_ids"]
    finally:
        actor.generation_config.top_k = None
        actor.generation_config.repetition_penalty = None
    assert torch.equal(ours, again)
    torch.manual_seed(3)
    top1 = hf_generate(actor, ids, mask, settings(top_k=1), micro_bs=3)["response_ids"]
    assert not torch.equal(ours, top1)  # the knob itself works


@pytest.mark.parametrize("temperature,min_new", [(1.0, 0), (0.7, 0), (1.0, 3)])
def test_behaviour_logprobs_are_those_of_a_full_forward(actor, temperature, min_new):
    """The log-probs generate records while it samples equal the actor's recomputed ones (the same weights and the
    same distribution, through the KV cache instead of one forward), on the mask, and are 0 off it; min_new_tokens
    bans the stop token from the first steps' sampling, not from their log-probs."""
    from rlhf_launch.runtime.models import PolicyModule
    from rlhf_launch.runtime.roles.common import policy_logprobs

    ids, mask = prompts()
    torch.manual_seed(1)
    out = hf_generate(actor, ids, mask, settings(temperature=temperature, min_new_tokens=min_new), micro_bs=2)
    assert (out["response_mask"].sum(1) >= min_new).all()
    gen, resp_mask = out["gen_logprobs"], out["response_mask"]
    assert gen.shape == out["response_ids"].shape and gen.dtype == torch.float32
    with torch.no_grad():
        full = policy_logprobs(PolicyModule(actor), out, temperature)
    on = resp_mask.bool()
    assert on.any() and (gen[on] < 0).all()
    torch.testing.assert_close(gen[on], full[on], atol=1e-5, rtol=0)
    assert (gen[~on] == 0).all()


def test_behaviour_logprobs_ignore_top_k_but_follow_temperature(actor):
    """The processor sees the model's own logits before the warpers: with top_k the log-probs stay those of the
    whole tempered distribution, the definition the actor's old log-probs use."""
    from rlhf_launch.runtime.models import PolicyModule
    from rlhf_launch.runtime.roles.common import policy_logprobs

    ids, mask = prompts()
    torch.manual_seed(2)
    out = hf_generate(actor, ids, mask, settings(temperature=0.8, top_k=5), micro_bs=3)
    with torch.no_grad():
        full = policy_logprobs(PolicyModule(actor), out, 0.8)
    on = out["response_mask"].bool()
    torch.testing.assert_close(out["gen_logprobs"][on], full[on], atol=1e-5, rtol=0)
