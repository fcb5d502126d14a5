"""The optimizer side of a trained model behind one interface, whether it runs in this process
alone, under torch DDP or under DeepSpeed (ZeRO 0-3): forward through ``module``,
``backward(loss)`` per micro batch, ``step()`` per minibatch. And the inference side of a frozen
model (``InferenceEngine``): whole on every rank, or sharded over the role's ranks by ZeRO-3.

Losses arrive normalised by the whole minibatch (over every rank and micro batch), so the
sum of all ranks' gradients is the minibatch gradient; DDP and DeepSpeed average over ranks,
hence the loss is multiplied by the data-parallel size before backward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_launch.core.config import JobSpec, ModelConfig, TrainKwargs
from rlhf_launch.core.plan import micro_steps


def lr_factor(step: int, kwargs: TrainKwargs) -> float:
    """lr multiplier after ``step`` optimizer steps: linear from 1 to lr_decay_rate over total_steps."""
    progress = min(step, kwargs.total_steps) / kwargs.total_steps
    return 1.0 - (1.0 - kwargs.lr_decay_rate) * progress


def _optimizer(params, kwargs: TrainKwargs):
    # fused: one kernel for all parameters, and no per-parameter host syncs for the step count.
    optimizer = torch.optim.AdamW(params, lr=kwargs.lr, weight_decay=kwargs.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kwargs))
    return optimizer, scheduler


def keep_fp32_master_weights(module: torch.nn.Module) -> torch.dtype | None:
    """Make a bf16 model's parameters fp32 and have it compute in bf16 (autocast); returns bf16,
    or None for a model that is fp32 already.

    Adam moves a weight by about lr per step: 1e-6 against bf16's spacing of ~1e-4 at weights of
    ~0.02, so updates applied to bf16 weights round away and the model never changes. fp32
    master weights with bf16 compute are what DeepSpeed's bf16 mode keeps as well."""
    dtypes = {p.dtype for p in module.parameters()}
    if torch.float16 in dtypes:
        raise ValueError(
            "float16 training needs loss scaling, which only the deepspeed mode has: "
            "use torch_dtype bfloat16, or parallel.data.mode deepspeed with fp16.enabled"
        )
    if torch.bfloat16 not in dtypes:
        return None
    module.float()
    module.compute_dtype = torch.bfloat16
    return torch.bfloat16


class TorchTrainer:
    """A model trained by this process alone (or, with ``group``, under DDP), with fp32 master
    weights when it was loaded in bf16."""

    def __init__(self, module: torch.nn.Module, kwargs: TrainKwargs, group=None, device: torch.device | None = None):
        self.kwargs = kwargs
        self.inner = module
        self.weight_dtype = keep_fp32_master_weights(module) or next(module.parameters()).dtype
        self.generates_in_lockstep = False  # every rank holds the whole model
        self.dp_size = dist.get_world_size(group) if group is not None else 1
        if self.dp_size > 1:
            ids = [device.index] if device is not None and device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, process_group=group)
        else:
            self.module = module
        self.optimizer, self.scheduler = _optimizer([p for p in module.parameters() if p.requires_grad], kwargs)

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of ``loss``, scaled by the data-parallel size against DDP's averaging."""
        (loss * self.dp_size).backward()

    def step(self) -> float:
        """Apply the accumulated gradients; returns the gradient norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        limit = self.kwargs.max_grad_norm if self.kwargs.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.scheduler.get_last_lr()[0]

    def gathered(self, params: list[torch.nn.Parameter] | None = None):
        """A no-op context: the parameters are always whole on this rank."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """Model, optimizer and scheduler state."""
        return {"model": self.inner.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.inner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path, name: str, is_writer: bool) -> None:
        """Write ``state_dict()`` to ``directory/name.pt`` when ``is_writer`` (DDP replicas are identical)."""
        if is_writer:
            torch.save(self.state_dict(), directory / f"{name}.pt")

    def load(self, directory: Path, name: str) -> None:
        """Restore what ``save`` wrote."""
        self.load_state_dict(torch.load(directory / f"{name}.pt", map_location="cpu", weights_only=False))

    def full_state_dict(self) -> dict[str, Tensor]:
        """The model's weights, named as in the unwrapped module."""
        return self.inner.state_dict()


_HALF_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def deepspeed_config(model: ModelConfig, micro_bs: int, minibatch: int, extra_steps: int = 0) -> dict[str, Any]:
    """The spec's deepspeed_config with the batch keys derived from train_config (the launcher
    checks that given ones agree), gradient clipping from train_kwargs when not set, and for a bf16
    or fp16 model ``bf16.enabled`` / ``fp16.enabled`` when the config says nothing about precision.

    Precision: without it a trained model gets no fp32 master weights (DeepSpeed's Adam would move
    the bf16 weights themselves, where updates of ~lr round away), and zero.Init would load a frozen
    one in fp32; with it the weights stay in the dtype they were given in, as under DDP. A config
    that disables the model's precision is refused by the launcher's checks.

    ``extra_steps``: micro steps every update runs beyond the minibatch's (the actor's PPO-ptx micro steps,
    rlhf_launch.core.plan.ptx_micro_steps): DeepSpeed's accumulation boundary must fall after them."""
    config = copy.deepcopy(model.trainer_config.deepspeed_config or {})
    half = _HALF_PRECISION.get(model.load_dtype())
    if half is not None and "bf16" not in config and "fp16" not in config:
        config[half] = {"enabled": True}
    dp = model.trainer_config.parallel.data.size
    # Every rank runs the micro steps of the largest share (shares of a minibatch may differ by one):
    # DeepSpeed counts those to its accumulation boundary and wants batch = micro x steps x ranks.
    steps = micro_steps(minibatch, dp, micro_bs) + extra_steps
    config.setdefault("train_micro_batch_size_per_gpu", micro_bs)
    config.setdefault("gradient_accumulation_steps", steps)
    config.setdefault("train_batch_size", micro_bs * steps * dp)
    kwargs = model.trainer_config.train_kwargs
    if kwargs is not None and kwargs.max_grad_norm is not None:  # None: a frozen model (inference_deepspeed_config)
        config.setdefault("gradient_clipping", kwargs.max_grad_norm)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


class GatherMeter:
    """Bytes of ZeRO-3 parameters this rank holds gathered (whole) right now, and the most at once
    since ``reset``: the memory a sync or a generate call costs beyond the rank's own shard."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def reset(self) -> None:
        """Start a new peak from what is held now."""
        self.peak = self.current

    @contextlib.contextmanager
    def holding(self, nbytes: int):
        """Count ``nbytes`` as held for the duration."""
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        try:
            yield
        finally:
            self.current -= nbytes


def with_model_precision(config: dict[str, Any], module: torch.nn.Module) -> dict[str, Any]:
    """``config``, or a copy with ``bf16.enabled`` / ``fp16.enabled`` when it names no precision and
    ``module``'s parameters are bf16 / fp16 (torch_dtype 'auto' may load a checkpoint in bf16, which
    ``deepspeed_config`` cannot know). ValueError when it disables the precision of such parameters:
    DeepSpeed would keep no fp32 master weights, and updates of ~lr would round away."""
    dtypes = {p.dtype for p in module.parameters()}
    half = next((_HALF_PRECISION[str(d).removeprefix("torch.")] for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    enabled = any(isinstance(config.get(s), dict) and config[s].get("enabled") for s in ("bf16", "fp16"))
    if half is None or enabled:
        return config
    if "bf16" in config or "fp16" in config:
        raise ValueError(f"the deepspeed_config disables bf16 and fp16 for a model of {half} weights: DeepSpeed would keep "
                         f"no fp32 master weights and small updates would round away; set {half}: {{enabled: true}}")
    return {**config, half: {"enabled": True}}


class DeepSpeedTrainer:
    """A model trained under DeepSpeed by the role's ranks (ZeRO stage from the spec)."""

    def __init__(self, module: torch.nn.Module, kwargs: TrainKwargs, config: dict[str, Any]):
        import deepspeed

        config = with_model_precision(config, module)
        self.kwargs = kwargs
        self.dp_size = dist.get_world_size()  # the default group is the role's ranks (rlhf_launch/runtime/dist.py)
        self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
        optimizer, scheduler = _optimizer([p for p in module.parameters() if p.requires_grad], kwargs)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.module = self.engine
        self.inner = self.engine.module
        self.weight_dtype = next(self.inner.parameters()).dtype  # DeepSpeed keeps its fp32 masters itself
        self.generates_in_lockstep = self.zero_stage == 3 and self.dp_size > 1
        self.gather_meter = GatherMeter()

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of ``loss``, scaled by the data-parallel size and not divided by the
        accumulation steps; at a minibatch boundary DeepSpeed also applies the update."""
        # DeepSpeed would divide by the accumulation steps; our loss is already normalised.
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        self.engine.step()  # a no-op until the accumulation boundary, where it updates

    def step(self) -> float:
        """The gradient norm of the update ``backward`` applied at the boundary; 0.0 when DeepSpeed gives none."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.scheduler.get_last_lr()[0]

    def gathered(self, params: list[torch.nn.Parameter] | None = None):
        """``params`` (default: all) materialised whole on every rank for the duration (ZeRO-3), e.g.
        to generate, or one layer at a time to send; a collective over the role's ranks.
        ``gather_meter`` counts the bytes it holds."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        return self._gather(list(self.inner.parameters()) if params is None else list(params))

    @contextlib.contextmanager
    def _gather(self, params: list[torch.nn.Parameter]):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Only partitioned parameters cost memory here: persistent ones (small, kept whole) already are.
        nbytes = sum(p.ds_numel * p.element_size() for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None), self.gather_meter.holding(nbytes):
            yield

    def save(self, directory: Path, name: str, is_writer: bool) -> None:
        """Write DeepSpeed's checkpoint, sharded as trained, into ``directory/name``; every rank of the role calls it."""
        self.engine.save_checkpoint(str(directory / name), tag="state")

    def load(self, directory: Path, name: str) -> None:
        """Restore what ``save`` wrote; every rank of the role calls it."""
        self.engine.load_checkpoint(str(directory / name), tag="state")

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights (collective under ZeRO-3; meaningful on the role's rank 0)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.inner.state_dict()


def inference_deepspeed_config(spec: JobSpec, role: str) -> dict[str, Any] | None:
    """The ZeRO-3 DeepSpeed config of a frozen ``role`` (reference, reward) on this rank, or None when
    its model runs whole: data.mode ddp, or no process group (one process runs every role).

    The batch keys DeepSpeed insists on even without an optimizer come from ``deepspeed_config``, with
    the role's inference micro batch as the micro batch and one accumulation step, and the model's
    precision (zero.Init casts the weights to the config's, fp32 when it names none)."""
    model = spec.model_configs.roles()[role]
    if model.trainer_config.parallel.data.mode != "deepspeed" or not dist.is_initialized():
        return None
    micro = spec.inference_micro_batch(role)
    return deepspeed_config(model, micro, micro * model.trainer_config.parallel.data.size)


class InferenceEngine:
    """A frozen module run by every rank of its role: whole in this process (one process, or DDP, which
    has nothing to synchronise without gradients), or with ``config`` under DeepSpeed ZeRO-3 without
    an optimizer, its parameters partitioned over the role's ranks and gathered layer by layer in
    each forward.

    ZeRO-3 gathers a layer's parameters with a collective in the layer's forward, so every rank of the
    role must run every forward: ``in_micro_batches`` has a rank with fewer micro batches than
    another run spare forwards until all are done (``lockstep``), as ``synced_gpus`` does for generate."""

    def __init__(self, module: torch.nn.Module, config: dict[str, Any] | None = None):
        self.module = module
        self.engine = None
        self.lockstep = False
        if config is None:
            return
        stage = config.get("zero_optimization", {}).get("stage")
        if stage != 3:
            raise ValueError(f"DeepSpeed inference needs ZeRO stage 3 (found {stage!r}): stages 0-2 shard nothing a frozen model holds")
        import deepspeed

        # No optimizer: DeepSpeed sets up ZeRO-3's parameter offload alone (gather/release hooks on every module).
        self.engine, *_ = deepspeed.initialize(model=module, config=config, dist_init_required=False)
        self.lockstep = dist.get_world_size() > 1  # the default group is the role's ranks (rlhf_launch/runtime/dist.py)

    @torch.no_grad()
    def in_micro_batches(self, fn: Callable[[dict[str, Tensor]], Tensor], batch: dict[str, Tensor], micro_bs: int) -> Tensor:
        """``fn`` over consecutive ``micro_bs``-row slices of ``batch``, without grad, concatenated along
        rows; in lockstep, spare forwards (results dropped) until every rank of the role has run as
        many as the rank with the most rows."""
        size = next(iter(batch.values())).shape[0]
        micros = [{k: v[s : s + micro_bs] for k, v in batch.items()} for s in range(0, size, micro_bs)]
        # Agreed before the first forward: a rank that asked after its own would wait in the all-reduce
        # while the others wait for it in a gather.
        spares = self._most_micro_batches(len(micros)) - len(micros)
        outputs = [fn(micro) for micro in micros]
        spare = None
        for _ in range(spares):
            spare = fn(_filler(batch))
        if not outputs:  # an empty shard: its result has no rows, and the spare forward gave its shape
            return spare[:0] if spare is not None else torch.empty(0)
        return torch.cat(outputs)

    def _most_micro_batches(self, mine: int) -> int:
        if not self.lockstep:
            return mine
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        count = torch.tensor([mine], dtype=torch.int64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())  # read back to the host: NCCL's wait() would not block it


def _filler(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """One row to run a spare forward on: the batch's first, or zeros of its width when it has none."""
    return {k: v[:1] if v.shape[0] else torch.zeros((1, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in batch.items()}
