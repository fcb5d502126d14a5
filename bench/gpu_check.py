"""The GPU check: one command on one GPU, in a few minutes, with only torch, transformers and
this project installed (no DeepSpeed, vLLM, datasets or network needed).

    python bench/gpu_check.py                          # on a machine with a CUDA GPU
    python bench/gpu_check.py --smoke --device cpu     # the same code paths at toy sizes on CPU

It runs, and prints one JSON line per part plus a summary:
  (a) the tiny spec (specs/tiny_cpu.yaml) in bf16 on the GPU, single process: the reward must
      rise (mean of the last 8 steps above the first 8 by 0.2, as the CPU test asks);
  (b) a random-init Llama-shaped model of ~0.75B parameters: actor training MFU (fp32 master
      weights, bf16 compute, the project's PolicyModule and TorchTrainer) and greedy decode
      throughput of HF generate against the HBM roofline;
  (c) the peak memory measured in (b)'s training step against the resource plan's estimate
      (rlhf_launch/core/memory.py) for the same model and batch.

Rooflines are the figures measured on the H200 this check was written for (--peak-tflops,
--hbm-tbps override them). MFU counts 6 N T + 12 L H S T FLOPs per step (Chowdhery et al. 2022,
appendix B), N the non-embedding parameters, T the tokens, S the sequence length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_launch.core import memory, schema  # noqa: E402 - after the path: runs from a checkout
from rlhf_launch.core.config import JobSpec  # noqa: E402
from rlhf_launch.core.model_shape import shape_from_config  # noqa: E402
from rlhf_launch.core.resolved import resolve  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What (b) and (c) run: the model and the batches."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int  # training sequences per step
    prompt: int
    response: int
    decode_batch: int
    decode_prompt: int
    decode_new: int
    steps: int  # timed training steps


FULL = Sizes(2048, 12, 16, 5632, 32000, 8, 512, 512, 64, 128, 256, 5)
SMOKE = Sizes(64, 2, 2, 128, 512, 2, 8, 8, 2, 4, 4, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- (a)
def tiny_spec(device: str, run_dir: Path, steps: int, smoke: bool) -> JobSpec:
    """specs/tiny_cpu.yaml in bf16 on ``device``, resolved as the launcher would."""
    data = yaml.safe_load((ROOT / "specs" / "tiny_cpu.yaml").read_text())
    data["run"].update(device=device, output_dir=str(run_dir.parent), name=run_dir.name)
    for role in ("actor", "reference", "critic", "reward"):
        data["model_configs"][role]["torch_dtype"] = "bfloat16"
    data["train_config"].update(max_train_step=steps, save_interval=0)
    if smoke:  # bf16 on a CPU is slow: a quarter of the rollout
        data["dataset_config"]["num_samples_each_epoch"] = 16
    spec = schema.from_dict(JobSpec, data)
    resolve(spec, ROOT / "specs")
    return spec


def check_tiny_spec(device: torch.device, smoke: bool) -> dict:
    from rlhf_launch.demo.tiny_models import build
    from rlhf_launch.runtime.loop import PPOLoop

    build()
    steps = 1 if smoke else 40
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        spec = tiny_spec(device.type, Path(tmp) / "tiny", steps, smoke)
        loop = PPOLoop(spec, Path(tmp) / "tiny", device=device)
        started = time.perf_counter()
        rows = [loop.ppo_step() for _ in range(steps)]
        seconds = time.perf_counter() - started
    rewards = [r["reward_mean"] for r in rows]
    window = min(8, len(rewards))
    rise = statistics.fmean(rewards[-window:]) - statistics.fmean(rewards[:window])
    return {
        "part": "a_tiny_spec_bf16", "steps": steps, "seconds": round(seconds, 1),
        "reward_first8": round(statistics.fmean(rewards[:window]), 3), "reward_last8": round(statistics.fmean(rewards[-window:]), 3),
        "rise": round(rise, 3), "ok": smoke or rise > 0.2,
    }


# ---------------------------------------------------------------------------------------- (b), (c)
def llama(sizes: Sizes, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=sizes.hidden, intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads, vocab_size=sizes.vocab,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval(), config


def train_flops(sizes: Sizes, non_embedding: int) -> float:
    tokens = sizes.batch * (sizes.prompt + sizes.response)
    seq = sizes.prompt + sizes.response
    return 6 * non_embedding * tokens + 12 * sizes.layers * sizes.hidden * seq * tokens


def check_training(sizes: Sizes, device: torch.device, peak_tflops: float) -> tuple[dict, dict]:
    from rlhf_launch.core.config import TrainKwargs
    from rlhf_launch.runtime import ppo
    from rlhf_launch.runtime.engine import TorchTrainer
    from rlhf_launch.runtime.models import PolicyModule

    model, config = llama(sizes, torch.bfloat16, device)
    policy = PolicyModule(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = TorchTrainer(policy, TrainKwargs(lr=1e-6, total_steps=1000))
    ids = torch.randint(3, sizes.vocab, (sizes.batch, sizes.prompt + sizes.response), device=device)
    mask = torch.ones_like(ids)
    responses = ids[:, sizes.prompt :]

    def step() -> None:
        logits = trainer.module(ids, mask, sizes.response)
        loss = -ppo.logprobs_from_logits(logits, responses).mean()
        trainer.backward(loss)
        trainer.step()

    step()  # warm-up: allocator, kernels, optimizer state
    sync(device)
    started = time.perf_counter()
    for _ in range(sizes.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / sizes.steps
    params = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    flops = train_flops(sizes, params - embeddings)
    training = {
        "part": "b_actor_training", "params_b": round(params / 1e9, 3), "tokens_per_step": sizes.batch * (sizes.prompt + sizes.response),
        "step_s": round(seconds, 4), "tflops": round(flops / seconds / 1e12, 1),
        "mfu": round(flops / seconds / (peak_tflops * 1e12), 3) if device.type == "cuda" else None,
    }
    measured = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    estimate = plan_estimate(sizes, config)
    peak = {
        "part": "c_peak_memory", "measured_gib": round(measured, 2) if measured is not None else None,
        "plan_estimate_gib": float(f"{estimate.total_gib:.4g}"), "plan_breakdown_gib": estimate.to_json(),
        "measured_over_estimate": round(measured / estimate.total_gib, 2) if measured is not None else None,
    }
    return training, peak


def plan_estimate(sizes: Sizes, config) -> memory.MemoryEstimate:
    """The plan's estimate for an actor of this shape trained in bf16 without DeepSpeed, one rank."""
    data = yaml.safe_load((ROOT / "specs" / "tiny_cpu.yaml").read_text())
    data["dataset_config"]["max_seq_len"] = sizes.prompt
    data["rollout_config"]["max_new_tokens"] = sizes.response
    data["model_configs"]["actor"]["torch_dtype"] = "bfloat16"
    spec = schema.from_dict(JobSpec, data)
    shape = shape_from_config(config.to_dict(), "gpu check")
    return memory.training(spec.model_configs.actor, shape, spec, sizes.batch, logits=True)


def check_decode(sizes: Sizes, device: torch.device, hbm_tbps: float) -> dict:
    model, config = llama(sizes, torch.bfloat16, device)
    prompts = torch.randint(3, sizes.vocab, (sizes.decode_batch, sizes.decode_prompt), device=device)
    kwargs = dict(max_new_tokens=sizes.decode_new, min_new_tokens=sizes.decode_new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompts[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        sync(device)
        started = time.perf_counter()
        out = model.generate(prompts, **kwargs)
        sync(device)
    seconds = time.perf_counter() - started
    new = (out.shape[1] - sizes.decode_prompt) * sizes.decode_batch
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * sizes.layers * sizes.hidden * 2  # bf16 keys and values, all heads
    mean_context = sizes.decode_prompt + sizes.decode_new / 2
    bytes_per_step = weight_bytes + kv_per_token * mean_context * sizes.decode_batch
    roofline = sizes.decode_batch / (bytes_per_step / (hbm_tbps * 1e12))
    return {
        "part": "b_decode", "batch": sizes.decode_batch, "new_tokens": new, "seconds": round(seconds, 3),
        "tokens_per_s": round(new / seconds, 1), "roofline_tokens_per_s": round(roofline, 1),
        "of_roofline": round(new / seconds / roofline, 3) if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three parts; exit 1 when the tiny spec's reward does not rise."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for --smoke")
    p.add_argument("--smoke", action="store_true", help="toy sizes, to check that the code paths run")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul roofline (measured on the H200)")
    p.add_argument("--hbm-tbps", type=float, default=4.3, help="device memory bandwidth roofline in TB/s")
    p.add_argument("--out", type=Path, help="also write the results as one JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --smoke --device cpu to check the code paths", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    results = [check_tiny_spec(device, args.smoke)]
    print(json.dumps(results[-1]), flush=True)
    training, peak = check_training(sizes, device, args.peak_tflops)
    results += [training, peak]
    print(json.dumps(training), flush=True)
    print(json.dumps(peak), flush=True)
    results.append(check_decode(sizes, device, args.hbm_tbps))
    print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    ok = results[0]["ok"]
    print(f"gpu_check: {'ok' if ok else 'FAILED: the tiny spec reward did not rise'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
