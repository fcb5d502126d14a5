"""What the pre-flight checks found, and what they share: the ``Preflight`` object every check writes its problems
and notes into (a check that crashes becomes one error naming it: ``Preflight.run``), and the sample prompt and
responses the checks render and score."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.problems import Problem, error, warning
from rlhf_launch.frontend.preflight.hub_cache import HF_CACHE_VARIABLES, nodes_hf_cache

Messages = list[dict[str, str]]
SAMPLE_PROMPT: Messages = [{"role": "user", "content": "Hello?"}]  # rendered and scored when the data gave no prompt
SAMPLE_RESPONSES = ["Sure.", "Here is a longer answer, with a few more words in it."]


@dataclass
class Preflight:
    """What the checks found: problems, and notes saying what was checked (printed by ``--check``)."""

    spec: JobSpec
    run_dir: Path
    resume: str | None
    local: bool  # --local: this machine must have everything; else Slurm nodes may have what it lacks
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prompts: list[Messages] = field(default_factory=list)
    fields: list[dict[str, Any]] = field(default_factory=list)  # each sampled prompt's other record fields (runtime.data.record_fields)
    folders: dict[str, Path] = field(default_factory=dict)  # role -> its local model folder (or cache snapshot)
    configs: dict[str, dict] = field(default_factory=dict)  # role -> its config.json
    bugs: list[BaseException] = field(default_factory=list)  # what checks raised unexpectedly: shown after the problems
    where: tuple[str, str] = ("", "the spec")  # (key, input) the running check is looking at, for the line of a crash

    def at(self, key: str, what: Any) -> None:
        """Say which input the running check now reads: a crash in it is reported against this key and input."""
        self.where = (key, str(what))

    def run(self, check, *args):
        """``check(self, *args)``: its result, or None when it raised. An ``InputError`` is one problem; anything
        else is a bug of the check: one line naming the check and the input, its exception kept in ``bugs``
        (for the traceback, printed after the problems)."""
        from rlhf_launch.core.problems import InputError

        self.where = ("", "the spec")
        try:
            return check(self, *args)
        except InputError as exc:
            self.problems.append(error(self.where[0], str(exc)))
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the findings of the others
            key, what = self.where
            self.problems.append(error(key, (
                f"the pre-flight check {check.__name__} failed on {what}: {one_line(exc)}; this is a bug of rlhf-launch "
                "(traceback below); skip the checks with --no-check"
            )))
            self.bugs.append(exc)
        return None

    def absent_from_cache(self, path: str, message: str) -> None:
        """A Hugging Face input missing from this machine's cache: an error, unless the input is for a Slurm job whose
        nodes read another cache (the job sets HF_HOME or the like for them); then a warning that names it."""
        other = None if self.local else nodes_hf_cache(self.spec)
        if other is not None:
            self.problems.append(warning(path, f"{message}; the job's nodes read another cache ({other}): they must have it there"))
        elif self.local:
            self.problems.append(error(path, message))
        else:
            self.problems.append(error(path, (
                f"{message}; the job's nodes read this same cache: the job sets no {', '.join(HF_CACHE_VARIABLES)} of "
                "their own (if theirs differs, set it in a role's trainer_config.envs or in slurm.setup)"
            )))

    def absent_here(self, path: str, message: str) -> None:
        """An input missing on this machine: an error for --local, a warning for Slurm, whose nodes may have it."""
        if self.local:
            self.problems.append(error(path, message))
        else:
            self.problems.append(warning(path, message + "; the compute nodes must have it, or the job fails there"))


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line of at most about ``limit`` characters, its type first."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= limit else text[:limit - 3] + '...'}"
