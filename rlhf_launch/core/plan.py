"""The resource plan: roles -> GPUs -> node groups (Slurm hetjob components) -> ranks.

One process per GPU. Global ranks run over the components in order (trainer, inference,
generator) and, inside a component, over its roles in order; the runtime derives its role
from its global rank with this same plan, so launcher and workers cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlhf_launch.core import memory
from rlhf_launch.core.algorithms import estimator
from rlhf_launch.core.budget import SIGNAL_MARGIN_S, RunBudget, host_bytes_per_rank, node_mem_request, run_budget
from rlhf_launch.core.config import JobSpec, ModelConfig
from rlhf_launch.core.model_shape import ModelShape, model_shape
from rlhf_launch.core.problems import Problem, error, warning

COMPONENTS = (("trainer", ("actor", "critic")), ("inference", ("reference", "reward")), ("generator", ("generator",)))


def unplanned_roles(spec: JobSpec) -> dict[str, str]:
    """The model roles the spec's algorithm does not use, each with the reason (which key says so).

    The plan has no such role: no GPUs, no ranks, nothing loaded, saved or exported. The critic only serves
    gae's values; the reference only serves the KL term, which is identically 0 with kl_coeff 0. Their
    sections stay required by the schema (the spec's shape does not depend on other keys) but are ignored."""
    out = {}
    name = spec.repeater_config.advantage_estimator
    if not estimator(name).needs_critic:
        out["critic"] = f"repeater_config.advantage_estimator {name} uses no critic"
    if spec.repeater_config.kl_coeff == 0:
        out["reference"] = "repeater_config.kl_coeff is 0: the KL term, the reference's only use, is 0"
    return out


def planned_models(spec: JobSpec) -> dict[str, ModelConfig]:
    """The model configs of the roles the plan has, by role in ROLES order: ``model_configs.roles()`` without
    the ``unplanned_roles``. Checks and the pre-flight look at these only."""
    unused = unplanned_roles(spec)
    return {role: model for role, model in spec.model_configs.roles().items() if role not in unused}


def reward_host(spec: JobSpec) -> str:
    """The role on whose ranks a ``reward_function`` runs: the reference's when there is one (the inference
    component), else the actor's (rank 0 on), so that a job without a reference needs no inference component."""
    return "actor" if "reference" in unplanned_roles(spec) else "reference"


@dataclass
class RolePlan:
    """One role's layout: data x tensor x pipeline sizes, its GPUs (0 on another role's ranks), its
    component, first global rank and nodes, and its memory estimate."""

    name: str
    data: int
    tensor: int
    pipeline: int
    gpus: int
    component: int | None
    first_rank: int | None = None
    nodes: list[int] = field(default_factory=list)  # global node indexes
    shared_with: str | None = None  # a role that runs on another role's ranks
    memory: memory.MemoryEstimate | None = None
    size_source: str | None = None
    checkpoint_gib: float | None = None  # a trained role's part of each checkpoint (rlhf_launch/core/budget.py)
    phases: dict[str, memory.MemoryEstimate] = field(default_factory=dict)  # a trained role's estimate in each phase

    @property
    def ranks(self) -> range:
        """The role's global ranks; empty for a role without GPUs of its own."""
        return range(self.first_rank, self.first_rank + self.gpus) if self.first_rank is not None else range(0)

    def to_json(self) -> dict[str, Any]:
        """The role as plain data; ``ranks`` is [first, last], or [] without GPUs."""
        return {
            "name": self.name,
            "gpus": self.gpus,
            "data": self.data,
            "tensor": self.tensor,
            "pipeline": self.pipeline,
            "component": self.component,
            "ranks": [self.ranks.start, self.ranks.stop - 1] if self.gpus else [],
            "nodes": self.nodes,
            "shared_with": self.shared_with,
            "memory_gib": self.memory.to_json() if self.memory else None,
            "memory_phases_gib": {phase: round(m.total_gib, 2) for phase, m in self.phases.items()},
            "model_size_from": self.size_source,
            "checkpoint_gib": round(self.checkpoint_gib, 1) if self.checkpoint_gib is not None else None,
        }


@dataclass
class ComponentPlan:
    """One Slurm hetjob component: roles packed onto nodes, from global rank ``first_rank`` and node
    ``first_node`` on. ``ranks_per_node`` lists the ranks of each node in order: all equal when the
    GPUs split so, else full nodes of ``gpus_per_node`` and the rest on the last (e.g. 8 + 8 + 4).
    ``envs``: the environment variables of every role on the component's ranks. ``mem``: sbatch --mem for each of
    its nodes, from the host memory its fullest node needs (rlhf_launch/core/budget.py); None when a model's size is
    unknown."""

    index: int
    name: str
    roles: list[str]
    gpus: int
    nodes: int
    gpus_per_node: int
    first_rank: int
    first_node: int
    ranks_per_node: list[int] = field(default_factory=list)
    envs: dict[str, str] = field(default_factory=dict)
    mem: str | None = None

    @property
    def even(self) -> bool:
        """Whether every node of the component runs the same number of ranks."""
        return len(set(self.ranks_per_node)) <= 1

    def node_of(self, offset: int) -> int:
        """Global node index of the component's rank ``offset`` (0-based within the component)."""
        for i, count in enumerate(self.ranks_per_node):
            if offset < count:
                return self.first_node + i
            offset -= count
        raise ValueError(f"rank offset beyond the {self.gpus} ranks of component {self.index}")

    def to_json(self) -> dict[str, Any]:
        """The component as plain data."""
        return {
            "index": self.index,
            "name": self.name,
            "roles": self.roles,
            "gpus": self.gpus,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "ranks_per_node": self.ranks_per_node,
            "first_rank": self.first_rank,
            "envs": self.envs,
            "mem": self.mem,
        }


@dataclass
class Plan:
    """Every role's layout, the Slurm components they form, and the problems found laying them out;
    ``unplanned``: the model roles left out because the algorithm does not use them, with the reason;
    ``budget``: checkpoint, disk and step-time figures (None when a trained model's size is unknown)."""

    roles: list[RolePlan]
    components: list[ComponentPlan]
    problems: list[Problem]
    unplanned: dict[str, str] = field(default_factory=dict)
    budget: RunBudget | None = None
    signal_seconds: int = 2 * SIGNAL_MARGIN_S  # the preemption notice the job asks for: slurm.signal_seconds, else the budget's

    @property
    def total_gpus(self) -> int:
        """GPUs over all components."""
        return sum(c.gpus for c in self.components)

    @property
    def total_nodes(self) -> int:
        """Nodes over all components (components share no node)."""
        return sum(c.nodes for c in self.components)

    @property
    def world_size(self) -> int:
        """Processes in the job: one per GPU."""
        return self.total_gpus

    def has(self, name: str) -> bool:
        """Whether the plan has role ``name`` (the critic and the reference may be left out: ``unplanned_roles``)."""
        return any(r.name == name for r in self.roles)

    def role(self, name: str) -> RolePlan:
        """The plan of role ``name``: actor, reference, critic, reward or generator; KeyError for a role
        the plan does not have (``has``)."""
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"the plan has no {name} role (its roles: {', '.join(r.name for r in self.roles)})")

    def role_of_rank(self, rank: int) -> tuple[str, int]:
        """(role, rank within the role) of a global rank."""
        for r in self.roles:
            if rank in r.ranks:
                return r.name, rank - r.first_rank
        raise ValueError(f"rank {rank} is outside the plan's world of {self.world_size}")

    def to_json(self) -> dict[str, Any]:
        """The plan as plain data, with its warnings as 'key: message' strings."""
        return {
            "total_gpus": self.total_gpus,
            "total_nodes": self.total_nodes,
            "world_size": self.world_size,
            "roles": [r.to_json() for r in self.roles],
            "components": [c.to_json() for c in self.components],
            "unplanned": self.unplanned,
            **(self.budget.to_json() if self.budget else {}),
            "signal_seconds": self.signal_seconds,
            "warnings": [p.message if not p.path else f"{p.path}: {p.message}" for p in self.problems if p.severity == "warning"],
        }


def shard_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``index`` of ``size`` rows cut into ``parts`` contiguous shards whose
    sizes differ by at most one, the first ones larger (512 over 3: 171, 171, 170)."""
    per, rest = divmod(size, parts)
    start = index * per + min(index, rest)
    return start, start + per + (index < rest)


def micro_steps(minibatch: int, parts: int, micro_bs: int) -> int:
    """Micro batches every rank runs per optimizer step: those of the largest (first) share, so that
    all ranks run the same number of forwards and backwards (their collectives must pair up)."""
    start, stop = shard_bounds(minibatch, parts, 0)
    return math.ceil((stop - start) / micro_bs)


def optimizer_steps(spec: JobSpec, role: str) -> int:
    """Optimizer steps of a trained role per PPO step: its epochs over the rollout, one per minibatch."""
    epochs = spec.train_config.ppo_epochs
    return epochs * math.ceil(spec.rollout_size() / spec.train_minibatch(role))


def ptx_micro_steps(spec: JobSpec) -> int:
    """Pretraining micro steps every actor rank runs per optimizer step under PPO-ptx (train_config.pretrain_loss_weight
    > 0), 0 without it: those of the largest part of the step's pretraining batch (cut over the optimizer steps by
    ``shard_bounds``) on the largest rank share (``micro_steps``). Every optimizer step runs that many, a smaller part's
    missing ones with the loss x 0, so that the micro steps to each update are the same number (DeepSpeed counts them
    to its accumulation boundary) and the ranks' collectives pair up."""
    pretrain = spec.pretrain_dataset_config
    if spec.train_config.pretrain_loss_weight <= 0 or pretrain is None:
        return 0
    dp = spec.model_configs.actor.trainer_config.parallel.data.size
    return part_micro_steps(pretrain.num_samples_each_epoch, optimizer_steps(spec, "actor"), dp, spec.train_micro_batch("actor"))


def part_micro_steps(size: int, parts: int, ranks: int, micro_bs: int) -> int:
    """Micro steps of the largest of ``parts`` contiguous parts of ``size`` rows (``shard_bounds``), each shared by
    ``ranks`` ranks (``micro_steps``)."""
    start, stop = shard_bounds(size, parts, 0)
    return micro_steps(stop - start, ranks, micro_bs)


def _role_layouts(spec: JobSpec) -> list[RolePlan]:
    roles = []
    for name, model in planned_models(spec).items():
        p = model.trainer_config.parallel
        role = RolePlan(name, p.data.size, p.tensor.size, p.pipeline.size, p.data.size * p.tensor.size * p.pipeline.size, None)
        if name == "reward" and model.reward_function:
            # A Python reward runs on its host's ranks, in the host's layout: every host replica scores its own
            # shard (a layout of its own could ask for more replicas than the host has ranks).
            host = next(r for r in roles if r.name == reward_host(spec))
            role = RolePlan(name, host.data, host.tensor, host.pipeline, 0, None, shared_with=host.name)
        roles.append(role)
    gen = spec.model_configs.actor.generator_config
    if gen.shared_with_trainer:
        actor = roles[0]
        roles.append(RolePlan("generator", actor.data, actor.tensor, actor.pipeline, 0, None, shared_with="actor"))
    else:
        p = gen.parallel
        roles.append(
            RolePlan("generator", p.data.size, p.tensor.size, p.pipeline.size, p.data.size * p.tensor.size * p.pipeline.size, None)
        )
    return roles


def _pack(gpus: int, gpus_per_node: int, multiple_of: int) -> list[int] | None:
    """Ranks on each node: the same count on every node when the GPUs split so (12 on 8-GPU nodes:
    6 + 6), else full nodes and the rest on the last (20: 8 + 8 + 4), each node holding whole groups
    of ``multiple_of`` (tensor-parallel engines never span nodes); None when no node holds one group."""
    nodes = math.ceil(gpus / gpus_per_node)
    per_node, rest = divmod(gpus, nodes)
    if not rest and not per_node % multiple_of:
        return [per_node] * nodes
    full = gpus_per_node // multiple_of * multiple_of
    if not full:
        return None
    counts = [full] * (gpus // full)
    return counts + [gpus % full] if gpus % full else counts


def _component_envs(spec: JobSpec, roles: list[RolePlan], comp_name: str, problems: list[Problem]) -> dict[str, str]:
    """The union of the envs of ``roles`` (those with ranks in one component, shared ones included);
    a variable that two of them set differently becomes a problem, as its ranks can have one value only."""
    models = spec.model_configs.roles()
    merged: dict[str, tuple[str, str]] = {}
    for role in roles:
        owner = "actor" if role.name == "generator" else role.name  # the generator's settings are the actor's
        for name, value in models[owner].trainer_config.envs.items():
            first = merged.setdefault(name, (owner, value))
            if first[1] != value:
                problems.append(error(
                    f"model_configs.{owner}.trainer_config.envs.{name}",
                    f"found {value!r}, but {first[0]} sets {first[1]!r} and both run in the {comp_name} component, "
                    "whose ranks get one environment; give both the same value or remove one",
                ))
    return {name: value for name, (_, value) in merged.items()}


def build_plan(spec: JobSpec) -> Plan:
    """Lay the spec's roles out on GPUs, nodes and global ranks, and estimate each one's memory.

    A group whose tensor-parallel engines fit on no node, variables that roles on the same ranks
    set differently, and an estimate above the GPU's memory become problems of the plan, not exceptions.
    """
    roles = {r.name: r for r in _role_layouts(spec)}
    problems: list[Problem] = []
    components: list[ComponentPlan] = []
    rank = node = 0
    gpn = spec.slurm.gpus_per_node
    for comp_name, members in COMPONENTS:
        own = [roles[m] for m in members if m in roles and roles[m].gpus > 0]  # a component without roles disappears
        gpus = sum(r.gpus for r in own)
        if not gpus:
            continue
        tp = roles["generator"].tensor if comp_name == "generator" else 1
        counts = _pack(gpus, gpn, tp)
        if counts is None:
            problems.append(error(
                "slurm.gpus_per_node",
                f"found {gpn}: the {comp_name} group ({', '.join(r.name for r in own)}) has tensor-parallel groups of {tp} GPUs, "
                f"which do not fit on one node; use nodes of at least {tp} GPUs or a smaller tensor size",
            ))
            counts = [min(gpus, gpn)] * math.ceil(gpus / gpn)
        index = len(components)
        comp = ComponentPlan(index, comp_name, [r.name for r in own], gpus, len(counts), max(counts), rank, node, counts)
        components.append(comp)
        for r in own:
            r.component, r.first_rank = index, rank
            r.nodes = sorted({comp.node_of(rank - comp.first_rank + i) for i in range(r.gpus)})
            rank += r.gpus
        node += comp.nodes
    for r in roles.values():
        if r.shared_with:
            host = roles[r.shared_with]
            r.component, r.nodes = host.component, host.nodes
    for comp in components:
        members = [r for r in roles.values() if r.component == comp.index]
        comp.envs = _component_envs(spec, members, comp.name, problems)
    shapes = _shapes(spec, roles)
    _estimate_memory(spec, roles, shapes, problems)
    figures = run_budget(spec, {r.name: r.gpus for r in roles.values() if r.gpus}, shapes)
    for name, role in roles.items():
        if figures is not None and name in figures.checkpoint_gib:
            role.checkpoint_gib = figures.checkpoint_gib[name]
    signal = _signal_seconds(spec, figures, problems)
    if spec.run.device != "cpu":  # on CPU the models live in host memory, which the plan does not estimate: --mem stays 0
        _host_memory(spec, roles, shapes, components)
    return Plan(list(roles.values()), components, problems, unplanned_roles(spec), figures, signal)


def _shapes(spec: JobSpec, roles: dict[str, RolePlan]) -> dict[str, ModelShape]:
    """The model shape of every role with a model of its own (the generator: the actor's), where it is known."""
    models = spec.model_configs.roles()
    shapes = {}
    for name, role in roles.items():
        model = models["actor" if name == "generator" else name]
        if role.gpus == 0 and name == "reward":
            continue
        shape = model_shape(model.model_path, model.num_params_b)
        if shape is not None:
            shapes[name] = shape
    return shapes


def _communicators(spec: JobSpec, name: str) -> int:
    """NCCL communicators a rank of role ``name`` warms up: its role's group and the global peer group; the actor
    and a separate generator also the weight-sync group; a generator also its engine's tensor-parallel group."""
    gen = spec.model_configs.actor.generator_config
    if name == "generator":
        return 3 + (gen.generator_type == "vllm" and gen.parallel.tensor.size > 1)
    return 2 + (name == "actor" and not gen.shared_with_trainer)


def _estimate_memory(spec: JobSpec, roles: dict[str, RolePlan], shapes: dict[str, ModelShape], problems: list[Problem]) -> None:
    models = spec.model_configs.roles()
    limit = spec.slurm.gpu_memory_gb
    for name, shape in shapes.items():
        role, model, comms = roles[name], models["actor" if name == "generator" else name], _communicators(spec, name)
        role.size_source = shape.source
        if name in ("actor", "critic"):
            phases = memory.training_phases(model, shape, spec, spec.train_micro_batch(name), name == "actor", comms)
            role.memory = max(phases, key=lambda m: m.total_gib)
            role.phases = {m.phase: m for m in phases}
        elif name == "reference":
            role.memory = memory.inference(model, shape, spec, spec.inference_micro_batch("reference"), True, comms)
        elif name == "reward":
            role.memory = memory.inference(model, shape, spec, spec.inference_micro_batch("reward"), False, comms)
        elif not role.shared_with:
            role.memory = memory.generator(model, shape, spec, comms)
        if name == "generator" and model.generator_config.generator_type == "vllm" and role.memory:
            _check_vllm(role.memory, shape, model, spec, limit, problems)
        elif role.memory and role.memory.total_gib > limit:
            key = f"model_configs.{'actor' if name == 'generator' else name}"
            problems.append(warning(
                key,
                f"{name}: estimated peak {role.memory.total_gib:.1f} GiB per GPU exceeds the {limit:.0f} GiB available "
                "(slurm.gpu_memory_gb); consider ZeRO-3, more data-parallel ranks, smaller micro batches or gradient checkpointing",
            ))


def _check_vllm(estimate: memory.MemoryEstimate, shape: ModelShape, actor: ModelConfig, spec: JobSpec, limit: float,
                problems: list[Problem]) -> None:
    """vLLM takes gpu_memory_utilization x the GPU whole, whatever the KV cache needs (a rollout share whose KV cache
    does not fit is generated in waves): the rest must hold what lives outside it, and the pool the weights and
    one sequence's KV cache."""
    util = actor.generator_config.gpu_memory_utilization
    key = "model_configs.actor.generator_config.gpu_memory_utilization"
    headroom = memory.vllm_headroom_gib(estimate)
    if (1 - util) * limit < headroom:
        problems.append(warning(
            key,
            f"found {util:g}: vLLM takes {util:g} x {limit:g} GiB whole, and the {(1 - util) * limit:.1f} GiB left must hold the "
            f"CUDA context, the warmed-up communicators, two weight-sync chunks and one layer being reloaded (about "
            f"{headroom:.1f} GiB); use at most {max(0.0, 1 - headroom / limit):.2f}",
        ))
    one_sequence = estimate.kv_cache_gib / max(1, spec.dataset_config.num_samples_each_epoch // actor.generator_config.parallel.data.size)
    if estimate.weights_gib + one_sequence > util * limit:
        problems.append(warning(
            key,
            f"found {util:g}: the {util * limit:.1f} GiB vLLM takes cannot hold the weights ({estimate.weights_gib:.1f} GiB per "
            "GPU) and one sequence's KV cache; raise it, or the generator's tensor size",
        ))


def _signal_seconds(spec: JobSpec, figures: RunBudget | None, problems: list[Problem]) -> int:
    """The preemption notice the job asks for: slurm.signal_seconds, else the budget's figure (twice the margin when a
    trained model's size is unknown); a given value shorter than the budget's is warned about."""
    given = spec.slurm.signal_seconds
    if figures is None:
        return given or 2 * SIGNAL_MARGIN_S
    needed = figures.signal_seconds
    if given is not None and given < needed:
        problems.append(warning(
            "slurm.signal_seconds",
            f"found {given}: a preemption notice must cover one step (about {figures.step_seconds:.0f} s) and a checkpoint "
            f"write ({figures.total_checkpoint_gib:.0f} GiB at {figures.write_gb_per_s:g} GB/s, about "
            f"{figures.write_seconds:.0f} s); use at least {needed}, or leave it unset",
        ))
    return given or needed


def _host_memory(spec: JobSpec, roles: dict[str, RolePlan], shapes: dict[str, ModelShape], components: list[ComponentPlan]) -> None:
    """Each component's sbatch --mem: slurm.mem when set, else its fullest node's host memory (rlhf_launch/core/budget.py)."""
    models = spec.model_configs.roles()
    for comp in components:
        if spec.slurm.mem is not None:
            comp.mem = spec.slurm.mem
            continue
        per_node = [0.0] * comp.nodes
        for role in roles.values():
            if role.component != comp.index or not role.gpus:
                continue
            if role.name not in shapes:
                break
            model = models["actor" if role.name == "generator" else role.name]
            per_rank = host_bytes_per_rank(role.name, model, shapes[role.name])
            for offset in range(role.first_rank - comp.first_rank, role.first_rank - comp.first_rank + role.gpus):
                per_node[comp.node_of(offset) - comp.first_node] += per_rank
        else:
            comp.mem = node_mem_request(per_node)
