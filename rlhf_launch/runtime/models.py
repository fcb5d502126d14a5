"""Loading the four models and the few forward passes PPO needs.

Token alignment, used everywhere: a sequence is a left-padded prompt of P columns followed by
a right-padded response of R columns. Response token t sits at column P + t; its log-prob
and the critic's value V_t both come from the hidden state at column P + t - 1, the prefix
before the action. So every per-token output here is [B, R], column t for response token t.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime.engine import InferenceEngine, inference_deepspeed_config
from rlhf_launch.runtime.value_head import install_value_head

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def quiet_transformers() -> None:
    """Progress bars for loading a few shards only clutter the training log."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _prepare(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    # eval() for good: PPO ratios must compare the same function, so dropout stays off in training too.
    return model.to(device).eval()


@contextlib.contextmanager
def partitioned_loading(zero3_config: dict | None):
    """While it lasts, ``from_pretrained`` builds the model under ``deepspeed.zero.Init`` with this
    DeepSpeed config (ZeRO-3): parameters are partitioned over the role's ranks as they are created
    and loaded, so no rank ever holds the whole model. Every rank of the role must load inside it
    (the loading is a collective). A no-op for None."""
    if zero3_config is None:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # DeepSpeed's communication over torch's default group (the role's ranks), as deepspeed.initialize
    # will set it up: zero.Init reads the world size from it to check the batch sizes, before it would.
    deepspeed.init_distributed(dist_init_required=False)
    # transformers holds only a weak reference: the object must stay alive for the whole load.
    alive = HfDeepSpeedConfig(zero3_config)
    try:
        yield
    finally:
        # Afterwards nothing else may see ZeRO-3: generate() would sync ranks that generate apart.
        unset_hf_deepspeed_config()
        del alive


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built under ZeRO-3's zero.Init (its parameters hold only this rank's shard)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


_FELL_BACK: set[str] = set()  # fallback reasons already reported by this process


def attention_kernel(requested: str, device: torch.device) -> str:
    """The attention implementation to load with: ``requested`` (eager, sdpa, flash_attention_2), except that
    flash_attention_2 without a CUDA device or without the flash-attn package falls back to sdpa, with one
    warning line per process (every model of a process would otherwise repeat it)."""
    if requested != "flash_attention_2":
        return requested
    from transformers.utils import is_flash_attn_2_available

    if device.type != "cuda":
        reason = f"needs a CUDA GPU, and this process runs on {device.type}"
    elif not is_flash_attn_2_available():
        reason = "needs the flash-attn package, which is not installed here (pip install flash-attn)"
    else:
        return requested
    if reason not in _FELL_BACK:
        _FELL_BACK.add(reason)
        print(f"rlhf: warning: attn_implementation flash_attention_2 {reason}; using sdpa", flush=True)
    return "sdpa"


def load_causal_lm(
    path: str, dtype: str, device: torch.device, zero3_config: dict | None = None, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A causal LM (Hugging Face id or folder) in ``dtype`` on ``device``, in eval mode, with the given
    attention kernel (``attention_kernel``); from the local cache only when HF_HUB_OFFLINE is set. With
    ``zero3_config`` (a ZeRO-3 DeepSpeed config) it is loaded partitioned (``partitioned_loading``), to
    be handed to DeepSpeed with that config."""
    with partitioned_loading(zero3_config):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], local_files_only=_is_offline(), attn_implementation=attention_kernel(attn_implementation, device)
        )
    return _prepare(model, device)


def load_value_model(
    path: str, dtype: str, device: torch.device, pad_token_id: int, role: str = "reward", head_name: str | None = None,
    zero3_config: dict | None = None, attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A sequence-classification model with one output, used per token (critic) or at the end
    (reward); its ``score`` head is the checkpoint's value head under whatever name it was saved
    (rlhf_launch/runtime/value_head.py). ``zero3_config`` and ``attn_implementation``: as in ``load_causal_lm``."""
    with partitioned_loading(zero3_config):
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=_DTYPES[dtype], local_files_only=_is_offline(), output_loading_info=True,
            attn_implementation=attention_kernel(attn_implementation, device),
        )
    model.config.pad_token_id = pad_token_id
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise ValueError(f"{path}: {type(model).__name__} has no 'score' head; expected a decoder sequence-classification model")
    with _whole(model.score) if is_partitioned(model) else contextlib.nullcontext():
        install_value_head(model, path, list(info["missing_keys"]), head_name, role)
    if role == "reward" and not is_partitioned(model):  # load_frozen makes a partitioned one whole in fp32
        model.score.float()  # a frozen head: fp32 costs nothing and keeps the score's digits (head_scores)
    return _prepare(model, device)


def load_frozen(spec: JobSpec, role: str, device: torch.device, pad_token_id: int | None = None) -> tuple[PreTrainedModel, InferenceEngine]:
    """The reference's causal LM or the reward's sequence-classification model (``pad_token_id``),
    frozen, and the ``InferenceEngine`` to run its forwards with.

    With data.mode deepspeed over several processes (``inference_deepspeed_config``) the model is
    loaded partitioned over the role's ranks (``partitioned_loading``: no rank ever holds all of it)
    and run under ZeRO-3; each rank keeps its shard plus the layer being computed. The reward's
    value head is found under any name before that (``load_value_model``), then kept whole and in
    fp32 outside DeepSpeed (``_unpartitioned_head``), as without it."""
    cfg = spec.model_configs.roles()[role]
    config = inference_deepspeed_config(spec, role)
    if role == "reference":
        model = load_causal_lm(cfg.model_path, cfg.torch_dtype, device, config, cfg.attn_implementation).requires_grad_(False)
        return model, InferenceEngine(model, config)
    model = load_value_model(cfg.model_path, cfg.torch_dtype, device, pad_token_id, role, cfg.head_name, config,
                             cfg.attn_implementation).requires_grad_(False)
    if config is None:
        return model, InferenceEngine(model)
    head = _unpartitioned_head(model.score)
    # DeepSpeed runs the base model; sequence_scores calls it, so ZeRO-3 sees the start of every forward.
    engine = InferenceEngine(model.base_model, config)
    model.score = head  # after DeepSpeed has wrapped the model: it would partition the head again
    return model, engine


def _unpartitioned_head(score: torch.nn.Module) -> torch.nn.Linear:
    """A partitioned one-output head as an ordinary fp32 Linear, the same on every rank (gathered: a collective)."""
    import deepspeed

    params = list(score.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        weight = score.weight.detach().float()
        bias = score.bias.detach().float() if getattr(score, "bias", None) is not None else None
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
    return head.requires_grad_(False)


def _whole(module: torch.nn.Module):
    """A partitioned module's parameters whole on every rank; what rank 0 writes into them is kept
    (every rank reads the same head from the checkpoint)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def _is_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generate() assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def enable_gradient_checkpointing(module: PolicyModule | ValueModule) -> int:
    """Checkpoint every decoder layer of a trained module's model (non-reentrant): its forward keeps only
    each layer's inputs and the backward recomputes the layer. Returns the number of checkpointed layers.

    Hugging Face checkpoints a layer only while ``layer.training`` is true, and these models stay in
    ``eval()`` for good (``_prepare``); so the module raises that flag on exactly the checkpointing
    modules (not their children: dropout stays off) for the length of each forward that builds a graph
    (``_checkpointing``). Forwards without grad (rollout log-probs, generation with its KV cache) are
    left alone: a checkpointing layer drops the cache."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.checkpointing = [m for m in module.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    layers = sum(isinstance(m, GradientCheckpointingLayer) for m in module.checkpointing)
    if layers == 0:
        raise ValueError(f"{type(module.model).__name__} has no decoder layers that Hugging Face can checkpoint")
    return layers


@contextlib.contextmanager
def _checkpointing(modules: list[torch.nn.Module]):
    """While it lasts, ``modules`` count as training for Hugging Face's checkpointing gate, when a graph is
    being built; a no-op otherwise."""
    if not modules or not torch.is_grad_enabled():
        yield
        return
    before = [m.training for m in modules]
    for m in modules:
        m.training = True  # this module only; .train() would switch dropout on in its children
    try:
        yield
    finally:
        for m, was in zip(modules, before, strict=True):
            m.training = was


def compute_in(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` (bf16 compute over fp32 master weights), or nothing when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class PolicyModule(torch.nn.Module):
    """A causal LM whose forward gives the logits of each response token, [B, R, V], divided by the
    sampling temperature (log-probs must be those of the distribution the tokens came from).
    A module of its own so that DDP and DeepSpeed see the forward that training runs."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.compute_dtype: torch.dtype | None = None  # set by a trainer that keeps fp32 master weights
        self.checkpointing: list[torch.nn.Module] = []  # set by enable_gradient_checkpointing

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int, temperature: float = 1.0) -> Tensor:
        """Logits [B, R, V] (float32) of the last ``response_len`` tokens of ``input_ids`` [B, P + R],
        each from the prefix before it, divided by ``temperature``."""
        with compute_in(self.compute_dtype, input_ids.device), _checkpointing(self.checkpointing):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                logits_to_keep=response_len + 1,
                use_cache=False,
            )
        logits = out.logits[:, :-1].float()
        return logits / temperature if temperature != 1.0 else logits


class ValueModule(torch.nn.Module):
    """A sequence-classification model used per token: V_t for each response token, [B, R],
    the value head on the prefix before the token."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.compute_dtype: torch.dtype | None = None  # set by a trainer that keeps fp32 master weights
        self.checkpointing: list[torch.nn.Module] = []  # set by enable_gradient_checkpointing

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
        """Values [B, R] (float32) of the last ``response_len`` tokens of ``input_ids`` [B, P + R], each
        from the hidden state of the prefix before it."""
        with compute_in(self.compute_dtype, input_ids.device), _checkpointing(self.checkpointing):
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
            ).last_hidden_state
        return head_scores(self.model.score, hidden[:, -response_len - 1 : -1])


class Fp32Head(torch.nn.Linear):
    """A linear value head that computes in float32 whatever its weights' dtype: a DeepSpeed bf16
    critic keeps them in bf16, and a value of a few units rounded to bf16 loses two digits.
    Gradients flow back to the weights in their own dtype."""

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden`` [..., H] -> [..., out] in float32."""
        bias = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def head_scores(score: torch.nn.Module, hidden: Tensor) -> Tensor:
    """The value head on hidden states [..., H] -> [...] in float32, outside any autocast. A linear
    head (every Hugging Face ``score``) computes in float32 even when its weights are bf16 or fp16;
    any other runs in its own dtype."""
    if type(score) is torch.nn.Linear:
        # Still called as a module, not as F.linear on its weights: ZeRO-3 gathers a partitioned head's
        # weights in hooks around that call. Only the forward changes; hooks and weights stay the module's.
        score.__class__ = Fp32Head
    with torch.autocast(hidden.device.type, enabled=False):
        if isinstance(score, Fp32Head):
            return score(hidden).squeeze(-1)
        return score(hidden.to(next(score.parameters()).dtype)).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The reward model's score of each whole sequence, [B], read at its last attended token."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head_scores(model.score, hidden[rows, last])
