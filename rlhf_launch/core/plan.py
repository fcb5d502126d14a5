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
from rlhf_launch.core.config import JobSpec, ModelConfig
from rlhf_launch.core.model_shape import model_shape
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
            "model_size_from": self.size_source,
        }


@dataclass
class ComponentPlan:
    """One Slurm hetjob component: roles packed onto nodes, from global rank ``first_rank`` and node
    ``first_node`` on. ``ranks_per_node`` lists the ranks of each node in order: all equal when the
    GPUs split so, else full nodes of ``gpus_per_node`` and the rest on the last (e.g. 8 + 8 + 4).
    ``envs``: the environment variables of every role on the component's ranks."""

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
        }


@dataclass
class Plan:
    """Every role's layout, the Slurm components they form, and the problems found laying them out;
    ``unplanned``: the model roles left out because the algorithm does not use them, with the reason."""

    roles: list[RolePlan]
    components: list[ComponentPlan]
    problems: list[Problem]
    unplanned: dict[str, str] = field(default_factory=dict)

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
    _estimate_memory(spec, roles, problems)
    return Plan(list(roles.values()), components, problems, unplanned_roles(spec))


def _estimate_memory(spec: JobSpec, roles: dict[str, RolePlan], problems: list[Problem]) -> None:
    models = spec.model_configs.roles()
    limit = spec.slurm.gpu_memory_gb
    for name, role in roles.items():
        model = models["actor" if name == "generator" else name]
        if role.gpus == 0 and name == "reward":
            continue
        shape = model_shape(model.model_path, model.num_params_b)
        if shape is None:
            continue
        role.size_source = shape.source
        if name in ("actor", "critic"):
            role.memory = memory.training(model, shape, spec, spec.train_micro_batch(name), logits=name == "actor")
        elif name == "reference":
            role.memory = memory.inference(model, shape, spec, spec.inference_micro_batch("reference"), logits=True)
        elif name == "reward":
            role.memory = memory.inference(model, shape, spec, spec.inference_micro_batch("reward"), logits=False)
        elif not role.shared_with:
            role.memory = memory.generator(model, shape, spec)
        vllm = name == "generator" and model.generator_config.generator_type == "vllm"
        budget = limit * (model.generator_config.gpu_memory_utilization if vllm else 1)
        if role.memory and role.memory.total_gib > budget:
            key = f"model_configs.{'actor' if name == 'generator' else name}"
            problems.append(warning(
                key,
                f"{name}: estimated peak {role.memory.total_gib:.1f} GiB per GPU exceeds the {budget:.0f} GiB available "
                "(slurm.gpu_memory_gb); consider ZeRO-3, more data-parallel ranks or smaller micro batches",
            ))
