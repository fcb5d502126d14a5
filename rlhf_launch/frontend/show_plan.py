"""The resource plan as a table for people."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from rlhf_launch.core.budget import SIGNAL_MARGIN_S
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
        ("weights", m.weights_gib), ("grads", m.gradients_gib), ("optim", m.optimizer_gib), ("act", m.activations_gib),
        ("logits", m.logits_gib), ("kv", m.kv_cache_gib), ("buffers", m.buffers_gib), ("cuda+nccl", m.overhead_gib),
    ]
    detail = ", ".join(f"{name} {value:.1f}" for name, value in parts if value >= 0.05)
    phase = f" {m.phase}" if m.phase else ""
    others = ", ".join(f"{name} {other.total_gib:.1f}" for name, other in role.phases.items() if name != m.phase)
    return (f"{m.total_gib:.1f}{phase} ({detail})" + (f"; {others}" if others else "")) if detail else "< 0.1"


def plan_table(plan: Plan, gpu_memory_gb: float, width: int = 132) -> str:
    """The plan as plain text ``width`` columns wide: a row per role (ranks, nodes, layout, estimated peak
    GiB per GPU out of ``gpu_memory_gb``, its part of a checkpoint), then a line per Slurm component (with its
    sbatch --mem), one for the checkpoints, the disk and the preemption notice, and one per role left out."""
    table = Table(title=f"Resource plan: {plan.total_gpus} GPUs on {plan.total_nodes} nodes, {plan.world_size} ranks", title_justify="left")
    columns = ("role", "component", "ranks", "nodes", "GPUs", "data x tensor x pipeline", f"est. peak GiB/GPU (of {gpu_memory_gb:g})",
               "checkpoint GiB")
    for column in columns:
        table.add_column(column, overflow="fold")
    names = {c.index: c.name for c in plan.components}
    for role in plan.roles:
        ranks = f"on {role.shared_with}'s" if role.shared_with else _ranges(list(role.ranks))
        component = f"{role.component} {names.get(role.component, '')}".strip() if role.component is not None else "-"
        table.add_row(
            role.name, component, ranks, _ranges(role.nodes), str(role.gpus),
            f"{role.data} x {role.tensor} x {role.pipeline}", _memory(role),
            f"{role.checkpoint_gib:.1f}" if role.checkpoint_gib is not None else "-",
        )
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    console.print(table)
    for c in plan.components:
        uneven = f"{' + '.join(map(str, c.ranks_per_node))} ranks on {c.nodes} nodes"
        layout = f"{c.nodes} node(s) x {c.gpus_per_node} GPUs" if c.even else uneven
        console.print(
            f"component {c.index} ({c.name}): {layout}, "
            f"ranks {c.first_rank}-{c.first_rank + c.gpus - 1}: {', '.join(c.roles)}; --mem={c.mem or 0} per node"
        )
    b = plan.budget
    if b is not None:
        console.print(f"checkpoint: {b.total_checkpoint_gib:.1f} GiB each; disk: {b.disk_gib:.1f} GiB (two kept, one being written, "
                      "the final models)")
        console.print(f"preemption notice: {plan.signal_seconds} s (slurm.signal_seconds; needs {b.signal_seconds} s: a step ~"
                      f"{b.step_seconds:.0f} s + a checkpoint write ~{b.write_seconds:.0f} s at {b.write_gb_per_s:g} GB/s + "
                      f"{SIGNAL_MARGIN_S} s)")
    for role, reason in plan.unplanned.items():
        console.print(f"no {role}: {reason} (model_configs.{role} is ignored)")
    return out.getvalue()
