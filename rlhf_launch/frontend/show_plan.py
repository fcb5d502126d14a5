"""The resource plan as a table for people."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from rlhf_launch.core.plan import Plan, RolePlan


def _ranges(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _memory(role: RolePlan) -> str:
    m = role.memory
    if m is None:
        return "unknown (set num_params_b)" if not role.shared_with else "-"
    parts = [
        ("weights", m.weights_gib), ("grads", m.gradients_gib), ("optim", m.optimizer_gib),
        ("act", m.activations_gib), ("kv", m.kv_cache_gib),
    ]
    detail = ", ".join(f"{name} {value:.1f}" for name, value in parts if value >= 0.05)
    return f"{m.total_gib:.1f} ({detail})" if detail else "< 0.1"


def plan_table(plan: Plan, gpu_memory_gb: float, width: int = 132) -> str:
    """The plan as plain text ``width`` columns wide: a row per role (ranks, nodes, layout, estimated peak
    GiB per GPU out of ``gpu_memory_gb``), then a line per Slurm component and one per role left out."""
    table = Table(title=f"Resource plan: {plan.total_gpus} GPUs on {plan.total_nodes} nodes, {plan.world_size} ranks", title_justify="left")
    for column in ("role", "component", "ranks", "nodes", "GPUs", "data x tensor x pipeline", f"est. peak GiB/GPU (of {gpu_memory_gb:g})"):
        table.add_column(column, overflow="fold")
    names = {c.index: c.name for c in plan.components}
    for role in plan.roles:
        ranks = f"on {role.shared_with}'s" if role.shared_with else _ranges(list(role.ranks))
        component = f"{role.component} {names.get(role.component, '')}".strip() if role.component is not None else "-"
        table.add_row(
            role.name, component, ranks, _ranges(role.nodes), str(role.gpus),
            f"{role.data} x {role.tensor} x {role.pipeline}", _memory(role),
        )
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    console.print(table)
    for c in plan.components:
        uneven = f"{' + '.join(map(str, c.ranks_per_node))} ranks on {c.nodes} nodes"
        layout = f"{c.nodes} node(s) x {c.gpus_per_node} GPUs" if c.even else uneven
        console.print(
            f"component {c.index} ({c.name}): {layout}, "
            f"ranks {c.first_rank}-{c.first_rank + c.gpus - 1}: {', '.join(c.roles)}"
        )
    for role, reason in plan.unplanned.items():
        console.print(f"no {role}: {reason} (model_configs.{role} is ignored)")
    return out.getvalue()
