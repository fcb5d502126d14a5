"""Loading the four models and the few forward passes PPO needs.

Token alignment, used everywhere: a sequence is a left-padded prompt of P columns followed by
a right-padded response of R columns. Response token t sits at column P + t; its log-prob
and the critic's value V_t both come from the hidden state at column P + t - 1, the prefix
before the action. So every per-token output here is [B, R], column t for response token t.
"""

from __future__ import annotations

import contextlib
import inspect
import json

import torch
from torch import Tensor
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf_launch.core.checkpoint_index import KNOWN_HEADS
from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.hub_cache import loadable_path, local_folder
from rlhf_launch.core.problems import InputError
from rlhf_launch.runtime.engine import InferenceEngine, inference_deepspeed_config
from rlhf_launch.runtime.value_head import install_value_head, set_value_head, value_head

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


class RemoteCodeError(InputError, ValueError):
    """A model whose loading needs its own Python code, which the spec does not allow to run."""


def _from_pretrained(auto_class, path: str, trust_remote_code: bool, role: str | None, device: torch.device,
                     attn_implementation: str, **kwargs):
    """``auto_class.from_pretrained`` as every model here is loaded: from the folder ``loadable_path`` resolves
    (a hub id's cached snapshot), offline when HF_HUB_OFFLINE is set, with the attention kernel
    (``attention_kernel``) and with ``trust_remote_code`` given explicitly (so never asked for). A model whose
    own code is needed but not allowed is refused in one line; a model of its own code without the attention
    kernel asked for is loaded with its default one, with a warning."""
    kernel = attention_kernel(attn_implementation, device)
    folder = loadable_path(path)
    try:
        return auto_class.from_pretrained(folder, local_files_only=_is_offline(), trust_remote_code=trust_remote_code,
                                          attn_implementation=kernel, **kwargs)
    except ValueError as exc:
        message = str(exc)
        where = f"model_configs.{role}.trust_remote_code" if role else "trust_remote_code"
        if "trust_remote_code" in message and not trust_remote_code:
            raise RemoteCodeError(
                f"{where}: {path} runs on its own code ({_code_names(path)}), which this spec does not allow to run; "
                f"set {where}: true if you trust that code"
            ) from None
        if not trust_remote_code or "does not support" not in message or "attention" not in message.lower():
            raise
    fallback = f"{path} does not support attn_implementation {kernel}; loading it with its default attention"
    if fallback not in _FELL_BACK:
        _FELL_BACK.add(fallback)
        print(f"rlhf: warning: {fallback}", flush=True)
    return auto_class.from_pretrained(folder, local_files_only=_is_offline(), trust_remote_code=True, **kwargs)


def _config_file(path: str) -> dict:
    """The model's config.json (its folder, or its snapshot in the hub cache), or {} when there is none to read."""
    folder = local_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _code_names(path: str) -> str:
    """What a message says about a model's own code: its model_type and the classes its auto_map names."""
    config = _config_file(path)
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    named = ", ".join(f"{k}: {v}" for k, v in auto_map.items()) or "no auto_map"
    return f"model_type {config.get('model_type')!r}; {named}"


def load_causal_lm(
    path: str, dtype: str, device: torch.device, zero3_config: dict | None = None, attn_implementation: str = "sdpa",
    trust_remote_code: bool = False, role: str | None = None,
) -> PreTrainedModel:
    """A causal LM (Hugging Face id or folder) in ``dtype`` on ``device``, in eval mode, with the given
    attention kernel (``attention_kernel``); from the local cache only when HF_HUB_OFFLINE is set. With
    ``zero3_config`` (a ZeRO-3 DeepSpeed config) it is loaded partitioned (``partitioned_loading``), to
    be handed to DeepSpeed with that config. ``trust_remote_code`` lets a model of its own code (its
    config.json's ``auto_map``) load; ``role`` names the model in messages."""
    with partitioned_loading(zero3_config):
        model = _from_pretrained(AutoModelForCausalLM, path, trust_remote_code, role, device, attn_implementation, dtype=_DTYPES[dtype])
    return _prepare(model, device)


def value_model_class(path: str, trust_remote_code: bool):
    """The auto class a critic or reward model loads through: a sequence classifier
    (AutoModelForSequenceClassification) unless the model's own code is allowed (``trust_remote_code``) and its
    config.json's ``auto_map`` has no sequence classifier; then its AutoModel entry (a reward model of its own
    class, InternLM2's, or a decoder), else its AutoModelForCausalLM entry."""
    auto_map = _config_file(path).get("auto_map")
    if not trust_remote_code or not isinstance(auto_map, dict) or "AutoModelForSequenceClassification" in auto_map:
        return AutoModelForSequenceClassification
    if "AutoModel" in auto_map:
        return AutoModel
    return AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else AutoModelForSequenceClassification


def load_value_model(
    path: str, dtype: str, device: torch.device, pad_token_id: int, role: str = "reward", head_name: str | None = None,
    zero3_config: dict | None = None, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A model with a one-output value head, used per token (critic) or at the end (reward); the head is the
    checkpoint's under whatever name it was saved (rlhf_launch/runtime/value_head.py), read as ``value_head``.

    A sequence classifier (``value_model_class``) keeps its head as ``score``. A model of its own code is
    loaded through its ``auto_map``: a reward model that is its own class (a decoder and a one-output head
    such as InternLM2's ``v_head``) keeps its head, found by ``head_name`` or a known name; a causal LM or a
    bare decoder loses its language-model head and gets a ``score`` on top, filled from the checkpoint's
    value head when it has one. ``zero3_config``, ``attn_implementation``: as in ``load_causal_lm``."""
    auto_class = value_model_class(path, trust_remote_code)
    extra = {"num_labels": 1} if auto_class is AutoModelForSequenceClassification else {}
    with partitioned_loading(zero3_config):
        model, info = _from_pretrained(auto_class, path, trust_remote_code, role, device, attn_implementation,
                                       dtype=_DTYPES[dtype], output_loading_info=True, **extra)
    missing = list(info["missing_keys"])
    model.config.pad_token_id = pad_token_id
    if auto_class is AutoModelForSequenceClassification:
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise ValueError(f"{path}: {type(model).__name__} has no 'score' head; expected a decoder sequence-classification model")
    elif (own := _own_head(model, head_name)) is not None:
        set_value_head(model, model.get_submodule(own), own)
    else:
        _drop_output_embeddings(model)
        set_value_head(model, _new_head(model, zero3_config), "score")
        missing.append("score.weight")
    with _whole(value_head(model)) if is_partitioned(model) else contextlib.nullcontext():
        install_value_head(model, path, missing, head_name, role)
    if role == "reward" and not is_partitioned(model):  # load_frozen makes a partitioned one whole in fp32
        value_head(model).float()  # a frozen head: fp32 costs nothing and keeps the score's digits (head_scores)
    return _prepare(model, device)


def _own_head(model: PreTrainedModel, head_name: str | None) -> str | None:
    """The name of the model's own one-output head (``head_name``, else a known name), or None when it has none."""
    for name in [head_name] if head_name else KNOWN_HEADS:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Linear) and module.out_features == 1:
            return name
    return None


def _drop_output_embeddings(model: PreTrainedModel) -> None:
    """Remove a causal LM's language-model head: a value model never computes it, and a trained one would hold
    parameters that get no gradient (DDP refuses those)."""
    head = model.get_output_embeddings()
    for name, child in list(model.named_children()):
        if head is not None and child is head:
            setattr(model, name, None)


def _new_head(model: PreTrainedModel, zero3_config: dict | None) -> torch.nn.Linear:
    """A one-output linear head over the model's hidden states, initialised as Hugging Face initialises a
    classifier's; under ZeRO-3 partitioned like the rest of the model (the same on every rank)."""
    hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    dtype = next(model.parameters()).dtype
    if zero3_config is None:
        head = torch.nn.Linear(hidden, 1, bias=False, dtype=dtype)
    else:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=zero3_config):
            head = torch.nn.Linear(hidden, 1, bias=False, dtype=dtype)
    with _whole(head) if zero3_config is not None else contextlib.nullcontext(), torch.no_grad():
        head.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
    return head


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
        model = load_causal_lm(cfg.model_path, cfg.torch_dtype, device, config, cfg.attn_implementation, cfg.trust_remote_code,
                               role).requires_grad_(False)
        return model, InferenceEngine(model, config)
    model = load_value_model(cfg.model_path, cfg.torch_dtype, device, pad_token_id, role, cfg.head_name, config,
                             cfg.attn_implementation, cfg.trust_remote_code).requires_grad_(False)
    if config is None:
        return model, InferenceEngine(model)
    head = _unpartitioned_head(value_head(model))
    # DeepSpeed runs the base model; sequence_scores calls it, so ZeRO-3 sees the start of every forward.
    engine = InferenceEngine(model.base_model, config)
    set_value_head(model, head)  # after DeepSpeed has wrapped the model: it would partition the head again
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
    if layers == 0:  # a model of its own code may checkpoint its layers from the decoder's loop, as older transformers did
        layers = sum(len(m.layers) for m in module.checkpointing if isinstance(getattr(m, "layers", None), torch.nn.ModuleList))
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
        # Models of their own code may predate logits_to_keep: they compute every position's logits, cut below.
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int, temperature: float = 1.0) -> Tensor:
        """Logits [B, R, V] (float32) of the last ``response_len`` tokens of ``input_ids`` [B, P + R],
        each from the prefix before it, divided by ``temperature``."""
        keep = {"logits_to_keep": response_len + 1} if self.keeps_logits else {}
        with compute_in(self.compute_dtype, input_ids.device), _checkpointing(self.checkpointing):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
                **keep,
            )
        logits = out.logits[:, -response_len - 1 : -1].float()
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
        return head_scores(value_head(self.model), hidden[:, -response_len - 1 : -1])


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
    return head_scores(value_head(model), hidden[rows, last])
