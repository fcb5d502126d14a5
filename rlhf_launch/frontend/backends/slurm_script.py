"""The Slurm backend's sbatch script of a plan, rendered from ``templates/rlhf_job.sbatch.j2`` next to this module.

Values reach the script in two ways: ``#SBATCH`` lines, which no shell reads but a newline
would end, so every value there is checked against a strict pattern (schema or below); and
shell code, where every value is quoted with ``shlex.quote`` (the roles' trainer_config.envs too,
given to ``env`` in front of the worker command). Spec ``slurm.setup`` lines are
the one exception: they are the user's own shell code, one line each.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.plan import Plan

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# What Slurm's #SBATCH parser and filename patterns take literally.
_SBATCH_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@:,=-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STOP_GRACE_SECONDS = 10


class RenderError(ValueError):
    """A value that the sbatch script cannot carry safely (whitespace, a newline, characters #SBATCH takes literally)."""


@dataclass(frozen=True)
class JobFiles:
    """Where the job lives and what it runs."""

    run_dir: str
    python: str
    resume: str = ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = shlex.quote
    return env


def sbatch_options(spec: JobSpec, mem: str | None = None) -> list[str]:
    """Extra sbatch options as '--name=value': the slurm keys that are set (partition, account, qos, time,
    mem, constraint), then ``slurm.extra_sbatch`` as written. Memory: ``mem`` (a component's, from the plan),
    else slurm.mem, else 0, all of each node's (some clusters otherwise grant a small default per CPU)."""
    s = spec.slurm
    named = [
        ("partition", s.partition), ("account", s.account), ("qos", s.qos),
        ("time", s.time), ("mem", mem or s.mem or "0"), ("constraint", s.constraint),
    ]
    options = [f"--{key}={value}" for key, value in named if value]
    return options + list(s.extra_sbatch)


def render_sbatch(spec: JobSpec, plan: Plan, files: JobFiles) -> str:
    """The sbatch script of ``plan``; RenderError when a value could break an #SBATCH line or add a line to the script."""
    if not _SBATCH_SAFE_PATH.match(files.run_dir):
        raise RenderError(
            f"run directory {files.run_dir!r} has characters (spaces, quotes, %, ...) that an #SBATCH line "
            "cannot carry; choose a plainer --output-dir"
        )
    for line in spec.slurm.setup:  # the schema checks this too; a script must never gain lines
        if "\n" in line or "\r" in line:
            raise RenderError("slurm.setup: each item must be a single line")
    for comp in plan.components:  # the schema checks these too; a name is written unquoted
        for name in comp.envs:
            if not _ENV_NAME.match(name):
                raise RenderError(f"environment variable name {name!r} is not a shell variable name (letters, digits, _)")
    # Each component asks for the host memory the plan gives its nodes, so that one that half-fills a node leaves
    # the rest of the node's memory, and so its other GPUs, to other jobs.
    options = [sbatch_options(spec, comp.mem) for comp in plan.components]
    # the schema checks these too; an #SBATCH line must never break
    for value in [spec.run.name, *(option for per_component in options for option in per_component)]:
        if re.search(r"\s", value):
            raise RenderError(f"sbatch option {value!r} contains whitespace")
    template = _environment().get_template("rlhf_job.sbatch.j2")
    return template.render(
        name=spec.run.name,
        run_dir=files.run_dir,
        python=files.python,
        resume=files.resume,
        components=plan.components,
        total_gpus=plan.total_gpus,
        total_nodes=plan.total_nodes,
        world_size=plan.world_size,
        cpus_per_task=spec.slurm.cpus_per_gpu,
        signal_seconds=plan.signal_seconds,
        component_options=options,
        setup=spec.slurm.setup,
        stop_grace_seconds=STOP_GRACE_SECONDS,
    )
