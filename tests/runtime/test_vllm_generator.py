"""The vLLM generator role against Hugging Face generate on the tiny model: same greedy tokens,
weights loaded in memory through the training job's broadcast, stop tokens, min_new_tokens,
and sampling seeded per prompt. The engine runs in tests/vllm_probe.py (its own process)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rlhf_launch.frontend.spec import load_spec
from rlhf_launch.runtime.roles.vllm_generator import MIN_CPU_KV_CACHE_BYTES, cpu_kv_cache_bytes
from tests.conftest import ROOT

ROLLOUT = ["response_ids", "response_mask", "finished"]


@pytest.fixture(scope="module", params=["untied", "tied"])
def probe(request, tiny_models, tmp_path_factory):
    """Untied and tied output heads: vLLM's CPU build repacks a tied head separately."""
    out = tmp_path_factory.mktemp("vllm") / "probe.pt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_probe.py"), str(out), request.param],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ROLLOUT)


def test_greedy_tokens_equal_hf_generate(probe):
    assert same(probe["initial/vllm"], probe["initial/hf"])
    assert probe["initial/vllm"]["response_mask"].sum() > 8 * 4  # real responses, not empty ones


def test_engine_keeps_its_weights_until_the_update_arrives(probe):
    assert not same(probe["updated_hf_only/vllm"], probe["updated_hf_only/hf"])
    assert same(probe["updated_hf_only/vllm"], probe["initial/vllm"])


def test_weights_broadcast_into_the_engine_give_hf_greedy_tokens(probe):
    assert same(probe["after_sync/vllm"], probe["after_sync/hf"])


def test_stop_tokens_end_responses_as_in_hf(probe):
    vllm, hf = probe["stop/vllm"], probe["stop/hf"]
    assert same(vllm, hf)
    assert vllm["finished"].any()
    lengths = vllm["response_mask"].sum(1)
    stopped_at = vllm["response_ids"][torch.arange(8), (lengths - 1).clamp(min=0)]
    assert (stopped_at[vllm["finished"]] == probe["stop_id"]).all()  # the stop token is kept, last


def test_min_new_tokens_holds_back_early_stops(probe):
    early = probe["stop/vllm"]["finished"] & (probe["stop/vllm"]["response_mask"].sum(1) < 4)
    assert early.any()  # the setting has something to change
    constrained = probe["stop_min4/vllm"]
    assert same(constrained, probe["stop_min4/hf"])
    assert (constrained["response_mask"][early].sum(1) >= 4).all()


def test_sampling_is_seeded_per_prompt_row(probe):
    everything, again, half = probe["sample/all"], probe["sample/again"], probe["sample/second_half"]
    assert same(everything, again)
    assert torch.equal(everything["finished"][4:], half["finished"])
    for key in ("response_ids", "response_mask"):  # padded to each call's longest response
        width = min(everything[key].shape[1], half[key].shape[1])
        assert torch.equal(everything[key][4:, :width], half[key][:, :width]), key
    assert not everything["response_mask"][4:, width:].any() and not half["response_mask"][:, width:].any()
    assert not torch.equal(everything["response_ids"], probe["sample/other_seeds"]["response_ids"])
    assert not same(everything, probe["greedy"])  # it samples


def test_top_k_and_top_p_reach_the_sampler(probe):
    assert same(probe["sample/top_k_1"], probe["greedy"])
    assert same(probe["sample/top_p_tiny"], probe["greedy"])


def test_cpu_kv_cache_is_sized_to_each_engine_rank_share_of_the_batch(tiny_models):
    per_token = 2 * 2 * 2 * 32 * 4  # K and V x 2 layers x 2 KV heads of 32 x float32
    tokens = 48 + 24  # max_seq_len + max_new_tokens of the tiny spec

    def sized(*sets):
        return cpu_kv_cache_bytes(
            load_spec(ROOT / "specs" / "tiny_cpu_vllm.yaml", ["dataset_config.num_samples_each_epoch=4096", *sets]).spec
        )

    assert sized("model_configs.actor.generator_config.parallel.tensor.size=1") == int(per_token * tokens * 4096 * 1.25)
    assert sized() == int(per_token * tokens * 4096 * 1.25 / 2)  # tensor size 2: each rank holds half the heads
    assert (
        sized("model_configs.actor.generator_config.parallel={data: {size: 2}, tensor: {size: 1}}")
        == int(per_token * tokens * 2048 * 1.25)
    )
    assert cpu_kv_cache_bytes(load_spec(ROOT / "specs" / "tiny_cpu_vllm.yaml").spec) == MIN_CPU_KV_CACHE_BYTES  # 32 prompts
