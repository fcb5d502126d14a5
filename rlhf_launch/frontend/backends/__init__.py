"""Launch backends: where ``rlhf-launch SPEC`` sends a run once the spec, the flags and the run's
inputs have passed (``rlhf_launch/frontend/cli.py`` applies those rules, then calls one backend).

Every backend is one module with one function::

    launch(loaded, run_dir, resume, processes=False) -> exit status

``loaded`` is the validated spec and its plan (``rlhf_launch.frontend.spec.LoadedSpec``), ``run_dir``
the absolute run folder, ``resume`` the --resume value (None, "auto" or a checkpoint path) and
``processes`` the local backend's --processes. The launcher has already checked that no live run holds
the folder, run the pre-flight and set ``LAUNCH_COMMAND_ENV`` (the ranks record the command). A backend
starts its run in ``start.in_prepared_run_dir`` (the folder's lock, spec.yaml), says in one line what is
about to happen (``start.start_line``), and reports anything that stops it as one ``rlhf-launch: ...``
line on stderr with ``start.EXIT_BAD_SPEC`` when the user can fix it.

- ``local``: the job on this machine, in this process or one process per rank (``--local``).
- ``slurm``: one heterogeneous Slurm job (the default); ``slurm_script`` renders its sbatch script
  (also what --dry-run prints) and ``slurm_jobs`` submits it and follows it (status, cancel).

Adding a backend (another scheduler, a cloud queue):

1. Write ``rlhf_launch/frontend/backends/NAME.py`` with ``launch`` as above. Keep its heavy imports
   inside functions: the launcher answers on login nodes without torch (tests/test_layout.py checks).
2. Add one entry to ``BACKENDS`` below: its flag (``--NAME``, which the command line then offers in
   its "what to do" group), that flag's help line, what ``--check`` says the spec is ready for, and
   whether the run reads its inputs on this machine (else the pre-flight checks them as a cluster's
   nodes would).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlhf_launch.frontend.backends import local, slurm


@dataclass(frozen=True)
class Backend:
    """One place a run can go: its ``launch`` and what the command line says about it."""

    launch: Callable[..., int]
    flag: str | None  # the flag of ``rlhf-launch SPEC`` that picks it; None for the default
    help: str  # that flag's help line
    target: str  # what ``--check`` says the spec is ready for
    reads_here: bool  # the run reads its data and models on this machine (not on a cluster's nodes)


DEFAULT_BACKEND = "slurm"
BACKENDS: dict[str, Backend] = {
    "slurm": Backend(slurm.launch, None, "", "a Slurm job", reads_here=False),
    "local": Backend(
        local.launch, "--local", "train on this machine, no Slurm (CPU or the local GPUs)", "a run on this machine", reads_here=True
    ),
}
