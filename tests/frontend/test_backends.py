"""The seam for launch backends: a backend is one module's ``launch`` plus one entry in the table, which
gives it its flag, its line in --help and its part in the flag rules."""

from __future__ import annotations

import os

import pytest

from rlhf_launch.frontend.backends import BACKENDS, DEFAULT_BACKEND, Backend, local, slurm
from rlhf_launch.frontend.backends.start import EXIT_BAD_SPEC, in_prepared_run_dir
from rlhf_launch.frontend.cli import main
from rlhf_launch.runtime.provenance import LAUNCH_COMMAND_ENV
from rlhf_launch.runtime.run_lock import holder
from tests.conftest import ROOT

TINY = ROOT / "specs" / "tiny_cpu.yaml"


def test_the_table_holds_slurm_as_the_default_and_local_behind_its_flag():
    assert DEFAULT_BACKEND == "slurm" and BACKENDS["slurm"].flag is None
    assert BACKENDS["slurm"].launch is slurm.launch and not BACKENDS["slurm"].reads_here
    assert BACKENDS["local"].launch is local.launch and BACKENDS["local"].flag == "--local" and BACKENDS["local"].reads_here


@pytest.fixture
def queue(monkeypatch) -> list[dict]:
    """A third backend, added as the package's checklist says: a ``launch`` and one table entry."""
    calls: list[dict] = []

    def launch(loaded, run_dir, resume, processes=False):
        def started(lock):
            calls.append({"run_dir": run_dir, "resume": resume, "held": holder(run_dir).pid == os.getpid(),
                          "spec": (run_dir / "spec.yaml").exists(), "command": os.environ.get(LAUNCH_COMMAND_ENV)})
            return 0

        return in_prepared_run_dir(run_dir, loaded.spec, resume, started)

    monkeypatch.setitem(BACKENDS, "queue", Backend(launch, "--queue", "send the run to the queue", "the queue", reads_here=False))
    return calls


def test_a_new_backend_gets_its_flag_and_its_help_line(queue, capsys):
    with pytest.raises(SystemExit):
        main([str(TINY), "--help"])
    assert "--queue" in capsys.readouterr().out.split("send the run to the queue")[0].splitlines()[-1]


def test_a_new_backend_is_called_with_the_run_folder_under_its_lock(queue, tmp_path):
    before = os.environ.get(LAUNCH_COMMAND_ENV)
    assert main([str(TINY), "--queue", "--no-check", "--output-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / "tiny_cpu"
    command = f"rlhf-launch {TINY} --queue --no-check --output-dir {tmp_path}"
    assert queue == [{"run_dir": run_dir, "resume": None, "held": True, "spec": True, "command": command}]
    assert holder(run_dir) is None and os.environ.get(LAUNCH_COMMAND_ENV) == before


def test_two_backend_flags_are_refused(queue, tmp_path, capsys):
    assert main([str(TINY), "--local", "--queue", "--no-check", "--output-dir", str(tmp_path)]) == EXIT_BAD_SPEC
    assert capsys.readouterr().err == "rlhf-launch: --local goes without --queue\n"
    assert queue == [] and not (tmp_path / "tiny_cpu").exists()
