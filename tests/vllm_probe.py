"""Runs a real vLLM engine (tiny model, CPU) next to Hugging Face generate and saves what
tests/runtime/test_vllm_generator.py checks: ``python tests/vllm_probe.py OUT.pt [untied|tied]``
(tied: the output head shares the input embedding's weight).

A process of its own because an engine changes its process for good (a torch.distributed
world, thread settings, the global seed): the test process stays clean.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_launch.frontend.spec import load_spec  # noqa: E402
from rlhf_launch.runtime.data import PromptMix, load_tokenizer, render_prompts  # noqa: E402
from rlhf_launch.runtime.dist import PeerGroup  # noqa: E402
from rlhf_launch.runtime.models import load_causal_lm  # noqa: E402
from rlhf_launch.runtime.roles.vllm_generator import VLLMGeneratorRole  # noqa: E402
from rlhf_launch.runtime.rollout import SamplingSettings, hf_generate  # noqa: E402
from rlhf_launch.runtime.weight_sync import send_weights  # noqa: E402

SEPARATE = "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: vllm}"


def send_from_another_process(port: int, model_dir: str) -> None:
    cpu = torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60))
    model = load_causal_lm(model_dir, "float32", cpu)
    send_weights(list(model.named_parameters()), 0, PeerGroup(store, "sync", [0, 1], 0, cpu), cpu)


def broadcast_into(role: VLLMGeneratorRole, model: torch.nn.Module, scratch: Path) -> None:
    """The training job's path: an actor process sends over a PeerGroup, the engine receives."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model.save_pretrained(scratch / "updated_actor")
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    actor = multiprocessing.get_context("spawn").Process(target=send_from_another_process, args=(port, str(scratch / "updated_actor")))
    actor.start()
    role.receive(0, PeerGroup(store, "sync", [0, 1], 1, torch.device("cpu")))
    actor.join(timeout=60)
    assert actor.exitcode == 0, f"the sending process exited with {actor.exitcode}"


def tied_copy(source: Path, target: Path) -> Path:
    """The tiny actor with its output head tied to the input embedding (as in SmolLM2, Gemma, ...)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(source)
    model.config.tie_word_embeddings = True
    tied = LlamaForCausalLM(model.config)
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def main(out: str, variant: str) -> None:
    overrides = [SEPARATE, "rollout_config.generate_kwargs.do_sample=false"]
    if variant == "tied":
        model = tied_copy(ROOT / "build" / "tiny" / "actor", Path(out).parent / "tied_actor")
        overrides.append(f"model_configs.actor.model_path={model}")
    spec = load_spec(ROOT / "specs" / "tiny_cpu.yaml", overrides).spec
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
    greedy = SamplingSettings.from_spec(spec, tokenizer.eos_token_id, tokenizer.pad_token_id)
    encoded = render_prompts(tokenizer, PromptMix(spec.dataset_config).batch(0)[:8], spec.dataset_config.max_seq_len, None)
    prompts = {"prompt_ids": encoded["input_ids"], "prompt_mask": encoded["attention_mask"]}
    hf = load_causal_lm(spec.model_configs.actor.model_path, "float32", cpu)
    role = VLLMGeneratorRole(spec, cpu, greedy)
    seeds = lambda row: 1000 + row  # noqa: E731
    results = {"prompts": prompts}

    def both(settings: SamplingSettings, key: str) -> None:
        role.sampling = settings
        results[f"{key}/vllm"] = role.generate(prompts, 0, seeds)
        results[f"{key}/hf"] = hf_generate(hf, prompts["prompt_ids"], prompts["prompt_mask"], settings, 4)

    both(greedy, "initial")
    # One optimizer-sized step away from the engine's weights, as after a PPO update.
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    both(greedy, "updated_hf_only")
    broadcast_into(role, hf, Path(out).parent)
    both(greedy, "after_sync")

    # Stop tokens and min_new_tokens: stop on a token the greedy responses produce early.
    first_tokens = results["after_sync/hf"]["response_ids"][:, 1]
    stop = int(first_tokens.mode().values)
    stops = dataclasses.replace(greedy, stop_ids=(stop,), min_new_tokens=0)
    both(stops, "stop")
    both(dataclasses.replace(stops, min_new_tokens=4), "stop_min4")
    results["stop_id"] = stop

    # Sampling: seeded per prompt row, whatever the shard; top_k 1 and a tiny top_p are greedy.
    sample = dataclasses.replace(greedy, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    role.sampling = sample
    results["sample/all"] = role.generate(prompts, 0, seeds)
    results["sample/again"] = role.generate(prompts, 0, seeds)
    results["sample/second_half"] = role.generate({k: v[4:] for k, v in prompts.items()}, 4, seeds)
    results["sample/other_seeds"] = role.generate(prompts, 0, lambda row: 5000 + row)
    role.sampling = dataclasses.replace(sample, top_k=1)
    results["sample/top_k_1"] = role.generate(prompts, 0, seeds)
    role.sampling = dataclasses.replace(sample, top_p=1e-6)
    results["sample/top_p_tiny"] = role.generate(prompts, 0, seeds)
    results["greedy"] = results["after_sync/vllm"]
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "untied")
