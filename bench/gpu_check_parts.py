"""The model parts of bench/gpu_check.py: versions and rooflines, fp32 master weights, the 7B-shape probe and the
padding / checkpointing numerics. Each takes its device and sizes as arguments: the GPU run and ``--dry`` on CPU
run the same code. Every function here returns the figures of one JSON line, with ``ok`` from its threshold."""

from __future__ import annotations

import importlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from rlhf_launch.core import memory, schema
from rlhf_launch.core.config import JobSpec, TrainKwargs
from rlhf_launch.core.model_shape import ModelShape, shape_from_config
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.engine import TorchTrainer, keep_fp32_master_weights
from rlhf_launch.runtime.losses import ActorLossSettings, actor_loss
from rlhf_launch.runtime.models import (
    PolicyModule,
    ValueModule,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_value_model,
    sequence_scores,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
LR = 1e-6
MASTERS_THRESHOLD = 0.9  # masters' weight movement over fp32's
PLAN_THRESHOLD = 1.2  # measured peak over the plan's figure
# Padded batch against rows alone (max |difference|), and checkpointing on against off (relative gradient
# difference), per dtype: fp32 checks the logic (a wrong position or mask is off by far more); bf16 allows its
# rounding (8 bits of mantissa: ~0.4 % per value) and catches NaNs and kernels that misread a padded mask.
NUMERICS_THRESHOLDS = {
    "float32": {"logprobs": 1e-4, "values": 1e-4, "scores": 1e-4, "checkpointing": 1e-5},
    "bfloat16": {"logprobs": 0.1, "values": 0.05, "scores": 0.05, "checkpointing": 1e-2},
}
LIMIT_OF = {"logprobs_max_diff": "logprobs", "values_max_diff": "values", "scores_max_diff": "scores",
            "gc_policy_grad_rel": "checkpointing", "gc_value_grad_rel": "checkpointing"}
# Dense bf16 TFLOP/s and memory GB/s from the datasheets, for reference only (the MFU figures use the measured
# GEMM): matched against torch's device name, most specific first.
DATASHEETS = (
    ("H100 PCIe", 756.0, 2000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100", 989.0, 3350.0),
    ("H200", 989.0, 4800.0),
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100", 312.0, 1555.0),
)


@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder's sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int) -> float:
    """Seconds per call of ``fn``, after one untimed call (allocator, kernel selection)."""
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - started) / iters


# ------------------------------------------------------------------------------------------ part 1: versions
def versions(device: torch.device) -> dict:
    """torch, CUDA, NCCL, transformers and flash-attn (when importable) versions, and the device's name."""
    import transformers

    nccl = None
    if torch.cuda.is_available():
        try:
            found = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older
            nccl = ".".join(map(str, found)) if isinstance(found, tuple) else str(found)
        except (AttributeError, RuntimeError):
            nccl = None
    try:
        flash = getattr(importlib.import_module("flash_attn"), "__version__", "unknown")
    except ModuleNotFoundError:
        flash = None
    except Exception as exc:  # noqa: BLE001 - installed but broken (a build for another torch): say how
        flash = f"import failed: {type(exc).__name__}: {exc}"[:200]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl, "flash_attn": flash,
        "transformers": transformers.__version__, "python": platform.python_version(), "device_name": name,
        "device_memory_gib": round(memory_gib, 1) if memory_gib else None,
    }


def datasheet(device_name: str) -> tuple[float, float] | None:
    """(bf16 TFLOP/s, memory GB/s) of a known device, or None."""
    for key, tflops, gbps in DATASHEETS:
        if key in device_name:
            return tflops, gbps
    return None


def gemm_tflops(device: torch.device, n: int, iters: int) -> float:
    """Measured TFLOP/s of an n x n x n bf16 matrix product."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    seconds = timed(lambda: torch.matmul(a, b, out=out), device, max(iters, 1) * 10)
    return 2 * n**3 / seconds / 1e12


def copy_gbps(device: torch.device, mib: int, iters: int) -> float:
    """Measured GB/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, max(iters, 1) * 10)
    return 2 * src.numel() / seconds / 1e9


# ------------------------------------------------------------------------------------------ models and plan
def llama(shape: LlamaShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of ``shape`` in ``dtype`` on ``device`` (eval mode) and its config;
    the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config


def plan_spec(prompt: int, response: int, dtype: str, checkpointing: bool, sixteen_bit: bool = False) -> JobSpec:
    """specs/tiny_cpu.yaml with sequences of ``prompt`` + ``response`` tokens, an actor of ``dtype`` with its
    generator apart (training alone), and a reference of ``dtype``: the keys the plan's memory estimate reads.
    The actor trains without DeepSpeed (bf16: fp32 master weights computing under autocast), or with
    ``sixteen_bit`` under DeepSpeed's bf16 mode on one rank, whose activations are 16-bit as the probe's are."""
    data = yaml.safe_load((ROOT / "specs" / "tiny_cpu.yaml").read_text())
    data["dataset_config"]["max_seq_len"] = prompt
    data["rollout_config"]["max_new_tokens"] = response
    models = data["model_configs"]
    for role in ("actor", "reference"):
        models[role].update(torch_dtype=dtype, attn_implementation="sdpa")
    models["actor"]["trainer_config"]["gradient_checkpointing"] = checkpointing
    models["actor"]["generator_config"] = {"shared_with_trainer": False, "generator_type": "hf"}
    if sixteen_bit:
        models["actor"]["trainer_config"]["parallel"] = {"data": {"size": 1, "mode": "deepspeed"}}
        models["actor"]["trainer_config"]["deepspeed_config"] = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    return schema.from_dict(JobSpec, data)


def model_shape(config) -> ModelShape:
    """The plan's view of a model (rlhf_launch/core/model_shape.py)."""
    return shape_from_config(config.to_dict(), "gpu check")


def peak_gib(device: torch.device) -> float | None:
    """The most memory torch held at once on ``device`` since the last reset, in GiB; None on CPU (not measured)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    """Start a new peak (``peak_gib``) from what is held now."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def random_batch(vocab: int, rows: int, prompt: int, response: int, device: torch.device, seed: int = 1):
    """Unpadded random token ids [rows, prompt + response] (no special ids), their mask and response columns."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, prompt + response), generator=gen).to(device)
    return ids, torch.ones_like(ids), ids[:, prompt:]


# ------------------------------------------------------------------------------------------ part 2: masters
def masters(device: torch.device, shape: LlamaShape, rows: int, prompt: int, response: int, steps: int) -> dict:
    """Weight movement (mean |w_after - w_before|) over ``steps`` AdamW steps at lr 1e-6 from the same initial
    weights: fp32; bf16 with fp32 master weights (TorchTrainer, runtime/engine.py keep_fp32_master_weights); pure
    bf16 (AdamW on the bf16 weights themselves). Threshold: masters' movement >= 0.9 of fp32's; pure bf16's is
    expected far below (updates of ~lr round away against bf16's spacing of ~1e-4). Also the masters run's peak
    memory against the plan's figure for a bf16 actor trained without DeepSpeed (reported, not judged)."""
    ids, mask, responses = random_batch(shape.vocab, rows, prompt, response, device)
    moved = {}
    for variant in ("fp32", "masters", "bf16"):
        reset_peak(device)
        model, config = llama(shape, torch.float32 if variant == "fp32" else torch.bfloat16, device)
        policy = PolicyModule(model)
        if variant == "bf16":  # the control: what training the bf16 weights themselves does
            params = list(model.parameters())
            optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)

            def update(loss, params=params, optimizer=optimizer):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            trainer = TorchTrainer(policy, TrainKwargs(lr=LR))

            def update(loss, trainer=trainer):
                trainer.backward(loss)
                trainer.step()
        before = [p.detach().to("cpu", torch.float32, copy=True) for p in model.parameters()]
        for _ in range(steps):
            update(-ppo.logprobs_from_logits(policy(ids, mask, response), responses).mean())
        moved[variant] = _movement(model, before)
        if variant == "masters":
            moved["published"] = _movement(model, before, torch.bfloat16)
            peak, params_b = peak_gib(device), sum(p.numel() for p in model.parameters()) / 1e9
            spec = plan_spec(prompt, response, "bfloat16", False)
            estimate = training_phase(spec, model_shape(config), rows)
            plan = estimate.total_gib - _outside_allocator(estimate)
        del model, policy, before
        reset_peak(device)
    ratio = moved["masters"] / moved["fp32"] if moved["fp32"] else 0.0
    return {
        "params_b": round(params_b, 3), "lr": LR, "steps": steps, "tokens_per_step": rows * (prompt + response),
        "movement_fp32": moved["fp32"], "movement_masters": moved["masters"], "movement_bf16": moved["bf16"],
        "masters_over_fp32": round(ratio, 4), "bf16_over_fp32": round(moved["bf16"] / moved["fp32"], 4) if moved["fp32"] else None,
        "published_bf16_over_fp32": round(moved["published"] / moved["fp32"], 4) if moved["fp32"] else None,
        "masters_peak_gib": sig(peak), "masters_plan_gib": sig(plan),
        "masters_peak_over_plan": rounded(peak / plan if peak is not None else None, 3),
        "threshold": f"masters_over_fp32 >= {MASTERS_THRESHOLD}", "ok": ratio >= MASTERS_THRESHOLD,
    }


def _movement(model: torch.nn.Module, before: list[torch.Tensor], as_dtype: torch.dtype | None = None) -> float:
    """Mean |w - w_before| over every weight (``as_dtype``: both rounded to it first, as a published copy is)."""
    total, count = 0.0, 0
    for p, b in zip(model.parameters(), before, strict=True):
        now, then = p.detach().float(), b.to(p.device)
        if as_dtype is not None:
            now, then = now.to(as_dtype).float(), then.to(as_dtype).float()
        total += float((now - then).abs().sum())
        count += p.numel()
    return total / count


# ------------------------------------------------------------------------------------------ part 3: 7B probe
def probe(device: torch.device, shape: LlamaShape, micro: int, prompt: int, response: int, infer_micro: int, iters: int,
          gemm_tflops_measured: float | None) -> dict:
    """A model of ``shape`` with random bf16 weights: forward + backward of the actor's loss at ``micro`` sequences of
    ``prompt + response`` tokens without and with gradient checkpointing (bf16 gradients, no optimizer), then a
    no-grad forward of ``infer_micro`` sequences (a reference's log-probs). Each case: the peak memory torch held
    against the plan's figure for the same work (rlhf_launch/core/memory.py: the activations and logits it counts
    for an actor computing in 16 bits, as DeepSpeed's bf16 mode does, plus bf16 weights and whole bf16 gradients;
    not the optimizer, DeepSpeed's buckets, the CUDA context or NCCL, which the probe does not hold), tokens/s and
    model TFLOP/s (also over the measured GEMM). Threshold: every peak <= 1.2 x its plan figure (a case that runs
    out of memory passes only where its plan figure is over the device's memory as well); on CPU memory is not
    measured and only the code paths are checked."""
    model, config = llama(shape, torch.bfloat16, device)
    shape_plan = model_shape(config)
    params = sum(p.numel() for p in model.parameters())
    non_embedding = params - 2 * shape.vocab * shape.hidden
    policy = PolicyModule(model)
    seq = prompt + response
    capacity = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    cases = {}
    for name, checkpointing in (("train", False), ("train_gc", True)):
        if checkpointing:
            enable_gradient_checkpointing(policy)
        spec = plan_spec(prompt, response, "bfloat16", checkpointing, sixteen_bit=True)
        estimate = training_phase(spec, shape_plan, micro)
        # The probe holds bf16 weights and whole bf16 gradients, no optimizer: the plan's activations and logits.
        plan = _beyond_model_states(estimate) + 4 * params / GIB
        flops = 6 * non_embedding * micro * seq + 12 * shape.layers * shape.hidden * seq * micro * seq
        cases[name] = _case(lambda: _train_step(policy, shape.vocab, micro, prompt, response, device), device, iters,
                            micro * seq, flops, plan, capacity, gemm_tflops_measured)
        cases[name]["plan_breakdown_gib"] = estimate.to_json()
        model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    spec = plan_spec(prompt, response, "bfloat16", False)
    estimate = memory.inference(spec.model_configs.reference, shape_plan, spec, infer_micro, logits=True)
    flops = 2 * non_embedding * infer_micro * seq + 4 * shape.layers * shape.hidden * seq * infer_micro * seq
    cases["infer"] = _case(lambda: _infer_step(policy, shape.vocab, infer_micro, prompt, response, device), device, iters,
                           infer_micro * seq, flops, _beyond_model_states(estimate) + 2 * params / GIB, capacity,
                           gemm_tflops_measured)
    cases["infer"]["plan_breakdown_gib"] = estimate.to_json()
    judged = [c for c in cases.values() if c["ok"] is not None]
    return {
        "params_b": round(params / 1e9, 3), "micro": micro, "seq": seq, "infer_micro": infer_micro, **cases,
        "memory_checked": bool(judged), "threshold": f"peak_over_plan <= {PLAN_THRESHOLD}",
        "ok": all(c["ok"] for c in judged),
    }


def training_phase(spec: JobSpec, shape: ModelShape, micro: int) -> memory.MemoryEstimate:
    """The plan's estimate for the actor while it trains a micro batch (not while it scores or generates)."""
    actor = spec.model_configs.actor
    phases = getattr(memory, "training_phases", None)  # a plan that estimates its phases apart
    found = [e for e in phases(actor, shape, spec, micro, logits=True) if e.phase == "training"] if phases else []
    return found[0] if found else memory.training(actor, shape, spec, micro, logits=True)


def _outside_allocator(estimate: memory.MemoryEstimate) -> float:
    """What the plan counts that torch's allocator (max_memory_allocated) never holds: the CUDA context and NCCL."""
    return getattr(estimate, "overhead_gib", 0.0)


def _beyond_model_states(estimate: memory.MemoryEstimate) -> float:
    """The plan's activations, logits and KV cache: its figure less the model states, DeepSpeed's buckets and
    ``_outside_allocator``, for a probe that holds its weights and gradients in its own way."""
    states = estimate.weights_gib + estimate.gradients_gib + estimate.optimizer_gib
    return estimate.total_gib - states - getattr(estimate, "buffers_gib", 0.0) - _outside_allocator(estimate)


def _train_step(policy: PolicyModule, vocab: int, micro: int, prompt: int, response: int, device: torch.device) -> None:
    ids, mask, responses = random_batch(vocab, micro, prompt, response, device)
    batch = {
        "response_ids": responses, "response_mask": torch.ones_like(responses, dtype=torch.float32),
        "old_logprobs": torch.full(responses.shape, -float(torch.log(torch.tensor(float(vocab)))), device=device),
        "advantages": torch.ones(responses.shape, device=device),
    }
    loss, _ = actor_loss(ActorLossSettings(max_len=response), policy(ids, mask, response), batch, micro, micro * response)
    loss.backward()
    policy.model.zero_grad(set_to_none=True)


@torch.no_grad()
def _infer_step(policy: PolicyModule, vocab: int, micro: int, prompt: int, response: int, device: torch.device) -> None:
    ids, mask, responses = random_batch(vocab, micro, prompt, response, device)
    ppo.logprobs_from_logits(policy(ids, mask, response), responses)


def _case(step, device: torch.device, iters: int, tokens: int, flops: float, plan: float, capacity: float | None,
          gemm: float | None) -> dict:
    """One probe case: its step timed (``timed``), its peak memory against ``plan``; out of memory is a result too."""
    reset_peak(device)
    try:
        seconds = timed(step, device, iters)
    except torch.cuda.OutOfMemoryError:
        seconds = None  # handled below, once the exception (and the tensors its frames hold) is gone
    peak = peak_gib(device)
    if seconds is None:
        reset_peak(device)
        return {"oom": True, "peak_gib": sig(peak), "plan_gib": sig(plan), "peak_over_plan": None,
                "tokens_per_s": None, "tflops": None, "of_gemm": None, "ok": within_plan(peak, plan, True, capacity)}
    tflops = flops / seconds / 1e12
    return {
        "oom": False, "peak_gib": sig(peak), "plan_gib": sig(plan),
        "peak_over_plan": rounded(peak / plan if peak is not None else None, 3),
        "tokens_per_s": sig(tokens / seconds), "tflops": sig(tflops), "of_gemm": rounded(tflops / gemm if gemm else None, 3),
        "ok": within_plan(peak, plan, False, capacity),
    }


def within_plan(peak: float | None, plan: float, oom: bool, capacity: float | None) -> bool | None:
    """The probe's threshold for one case: the measured peak is at most PLAN_THRESHOLD x the plan's figure; a case
    that ran out of memory passes only when the plan also said it would not fit (its figure is over ``capacity``);
    None when nothing was measured (CPU)."""
    if oom:
        return capacity is not None and plan > capacity
    if peak is None:
        return None
    return peak <= PLAN_THRESHOLD * plan


# ------------------------------------------------------------------------------------------ part 4: numerics
def numerics(device: torch.device, prompt: int, response: int) -> dict:
    """The tiny models (rlhf_launch.demo.tiny_models, built here if need be), loaded by the runtime's loaders, in
    fp32 and in bf16: a batch of four rows, left-padded prompts and right-padded responses of different lengths,
    against each row run alone (max |difference| of the policy's log-probs, the critic's values and the reward's
    scores, on the real tokens); and the gradients of a policy and a value loss on that batch with gradient
    checkpointing on against off (|g_on - g_off| / |g_off| over all weights; bf16 trains with fp32 master weights,
    as the runtime does). Thresholds: NUMERICS_THRESHOLDS; any NaN fails."""
    from rlhf_launch.demo.tiny_models import build

    folder = build()
    lengths = [(prompt, response), (prompt - 3, response - 5), (prompt // 2, 1), (2, response - 2)]
    result, ok = {"rows": lengths}, True
    for dtype in ("float32", "bfloat16"):
        limits = NUMERICS_THRESHOLDS[dtype]
        models = _models(folder, dtype, device)
        rows = _rows(models[0].config.vocab_size, lengths)
        ids, mask = _padded(rows, lengths, prompt, response, device)
        figures = _padding(*models, rows, lengths, ids, mask, prompt, response)
        figures.update(_checkpointing(*models[:2], ids, mask, prompt, response))  # after: it makes bf16 models fp32 masters
        del models
        layers = figures.pop("gc_layers")
        passed = {k: v is not None and v <= limits[LIMIT_OF[k]] for k, v in figures.items()}
        passed["gc_layers"] = layers > 0
        figures["gc_layers"] = layers
        ok = ok and all(passed.values())
        result[dtype] = {**{k: rounded(v, 7) if v is not None else None for k, v in figures.items()}, "limits": limits,
                         "ok": all(passed.values())}
    return {**result, "ok": ok}


def _padded(rows: list[list[int]], lengths: list[tuple[int, int]], prompt: int, response: int, device: torch.device):
    """Left-padded prompts then right-padded responses (pad id 0), as rollouts are laid out (runtime/models.py)."""
    ids = torch.zeros(len(rows), prompt + response, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, (p, r)) in enumerate(zip(rows, lengths, strict=True)):
        ids[i, prompt - p : prompt + r] = torch.tensor(row)
        mask[i, prompt - p : prompt + r] = 1
    return ids.to(device), mask.to(device)


def _rows(vocab: int, lengths: list[tuple[int, int]]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(10, vocab, (p + r,), generator=gen).tolist() for p, r in lengths]


def _models(folder, dtype: str, device: torch.device):
    actor = load_causal_lm(str(folder / "actor"), dtype, device)
    critic = load_value_model(str(folder / "critic"), dtype, device, 0, role="critic")
    reward = load_value_model(str(folder / "reward"), dtype, device, 0, role="reward")
    return actor, critic, reward


@torch.no_grad()
def _padding(actor, critic, reward, rows: list[list[int]], lengths, ids: torch.Tensor, mask: torch.Tensor, prompt: int,
             response: int) -> dict:
    """Largest |padded - alone| of log-probs, values and scores over the rows' real tokens (None: a NaN)."""
    device = ids.device
    policy, value = PolicyModule(actor), ValueModule(critic)
    logprobs = ppo.logprobs_from_logits(policy(ids, mask, response), ids[:, prompt:])
    values, scores = value(ids, mask, response), sequence_scores(reward, ids, mask)
    diffs = {"logprobs_max_diff": 0.0, "values_max_diff": 0.0, "scores_max_diff": 0.0}
    for i, (row, (p, r)) in enumerate(zip(rows, lengths, strict=True)):
        alone = torch.tensor([row], device=device)
        ones = torch.ones_like(alone)
        pairs = {
            "logprobs_max_diff": (logprobs[i, :r], ppo.logprobs_from_logits(policy(alone, ones, r), alone[:, p:])[0]),
            "values_max_diff": (values[i, :r], value(alone, ones, r)[0]),
            "scores_max_diff": (scores[i : i + 1], sequence_scores(reward, alone, ones)),
        }
        for key, (batched, single) in pairs.items():
            diff = (batched.float() - single.float()).abs().max()
            diffs[key] = float("nan") if not torch.isfinite(diff) else max(diffs[key], float(diff))
    return {k: (None if v != v else v) for k, v in diffs.items()}  # NaN -> None: fails the threshold


def _checkpointing(actor, critic, ids: torch.Tensor, mask: torch.Tensor, prompt: int, response: int) -> dict:
    """|g_on - g_off| / |g_off| of a policy and a value loss on the padded batch, checkpointing on against off
    (None: a NaN or no gradient)."""
    real = mask[:, prompt:].float()
    figures = {}
    for key, module in (("gc_policy_grad_rel", PolicyModule(actor)), ("gc_value_grad_rel", ValueModule(critic))):
        keep_fp32_master_weights(module)  # bf16 trains over fp32 masters; fp32 is left as it is

        def loss(module=module):
            out = module(ids, mask, response)
            per_token = ppo.logprobs_from_logits(out, ids[:, prompt:]) if isinstance(module, PolicyModule) else out
            return (per_token * real).sum() / real.sum()

        off = _gradients(module, loss)
        layers = enable_gradient_checkpointing(module)  # 0 would mean the comparison compared nothing
        figures["gc_layers"] = min(figures.get("gc_layers", layers), layers)
        on = _gradients(module, loss)
        num = sum(float((a - b).pow(2).sum()) for a, b in zip(on, off, strict=True)) ** 0.5
        den = sum(float(b.pow(2).sum()) for b in off) ** 0.5
        figures[key] = num / den if den > 0 and num == num else None
    return figures


def _gradients(module: torch.nn.Module, loss) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss().backward()
    return [p.grad.detach().float().clone() for p in module.parameters() if p.grad is not None]


def rounded(x: float | None, digits: int) -> float | None:
    """``x`` rounded to ``digits``, or None for None (a figure not measured)."""
    return None if x is None else round(x, digits)


def sig(x: float | None) -> float | None:
    """Four significant digits: the figures of a GPU and of --dry's toy sizes alike."""
    return None if x is None else float(f"{x:.4g}")
