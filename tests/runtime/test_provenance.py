"""RUN_DIR/provenance.json: what each start of a run ran with, and the status note when a resume
ran under other versions than the first start."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from importlib import metadata

import pytest

from rlhf_launch.frontend.backends.slurm_jobs import status_report
from rlhf_launch.runtime import provenance
from tests.conftest import ROOT

TINY = ROOT / "specs" / "tiny_cpu.yaml"


def test_a_record_holds_versions_commands_hosts_and_the_spec_hash(tmp_path, monkeypatch):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("run: {name: x}\n")
    monkeypatch.setenv(provenance.LAUNCH_COMMAND_ENV, "rlhf-launch specs/x.yaml --partition gpu")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-3]")
    record = provenance.collect(spec_file, start_step=7, resumed_from="ckpt")
    assert record["spec"] == {"file": str(spec_file), "sha256": hashlib.sha256(spec_file.read_bytes()).hexdigest()}
    assert record["packages"]["torch"] == metadata.version("torch")
    assert record["packages"]["transformers"] == metadata.version("transformers")
    assert set(record["packages"]) == {"torch", "transformers", "deepspeed", "vllm", "datasets"}
    assert record["rlhf_launch"] == metadata.version("rlhf-launch")
    assert record["python"] == sys.version.split()[0]
    assert record["command"] == sys.argv and record["launch_command"] == "rlhf-launch specs/x.yaml --partition gpu"
    assert record["slurm"] == {"job_id": "4242", "restart_count": 2, "nodelist": "n[1-3]"}
    assert (record["start_step"], record["resumed_from"]) == (7, "ckpt")
    if (ROOT / ".git").exists():  # a checkout: the commit of this tree, and whether it has changes
        assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"]) and isinstance(record["git"]["dirty"], bool)
    assert provenance.package_version("no-such-package-here") is None
    assert provenance.git_state(tmp_path) is None  # not the top of a checkout: no commit recorded


def test_records_are_appended_not_replaced(tmp_path):
    first = provenance.append_record(tmp_path, {"start_step": 0})
    both = provenance.append_record(tmp_path, {"start_step": 2})
    assert first == [{"start_step": 0}] and both == [{"start_step": 0}, {"start_step": 2}]
    assert json.loads((tmp_path / provenance.PROVENANCE_FILE).read_text()) == both
    assert [p.name for p in tmp_path.iterdir()] == [provenance.PROVENANCE_FILE]  # no temporary file left


def test_a_run_and_its_resume_each_add_a_record(tiny_models, tmp_path):
    from rlhf_launch.frontend.spec import load_spec
    from rlhf_launch.runtime.training_run import run_local

    sets = ["train_config.save_interval=1"]
    run_local(load_spec(TINY, [*sets, "train_config.max_train_step=1"]).spec, tmp_path, quiet=True)
    run_local(load_spec(TINY, [*sets, "train_config.max_train_step=2"]).spec, tmp_path, resume="auto", quiet=True)
    first, resumed = provenance.read_records(tmp_path)
    assert (first["start_step"], first["resumed_from"]) == (0, None)
    assert resumed["start_step"] == 1 and resumed["resumed_from"].endswith("checkpoints/step-00000001")
    assert first["spec"]["file"] is None and len(first["spec"]["sha256"]) == 64  # no spec file: the resolved spec is hashed
    assert first["spec"]["sha256"] != resumed["spec"]["sha256"]  # max_train_step differs


def test_the_record_is_written_before_the_first_step(tiny_models, tmp_path, monkeypatch):
    """The first step finds this start's record on disk and no metrics yet: a run that fails in its
    first step (or hangs in it) still says what it ran with."""
    from rlhf_launch.frontend.spec import load_spec
    from rlhf_launch.runtime.loop import PPOLoop
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local

    class FirstStep(Exception):
        pass

    seen = {}

    def first_step(loop):
        seen["records"] = provenance.read_records(tmp_path)
        seen["metrics"] = read_metrics(tmp_path) if (tmp_path / "metrics.jsonl").exists() else []
        raise FirstStep  # nothing more to see: the step itself is not needed

    monkeypatch.setattr(PPOLoop, "ppo_step", first_step)
    with pytest.raises(FirstStep):
        run_local(load_spec(TINY, ["train_config.max_train_step=1"]).spec, tmp_path, quiet=True)
    (record,) = seen["records"]
    assert (record["start_step"], record["resumed_from"]) == (0, None)
    assert seen["metrics"] == []
    assert provenance.read_records(tmp_path) == seen["records"]  # the failed step added or changed nothing


def test_status_of_a_local_run_shows_versions_and_notes_a_resume_under_other_versions(tmp_path):
    (tmp_path / "spec.yaml").write_text("run: {name: x}\n")
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "step": 3, "max_train_step": 5}))
    now = provenance.collect(tmp_path / "spec.yaml", start_step=2)
    earlier = {**now, "start_step": 0, "packages": {**now["packages"], "torch": "2.0.0"}}
    provenance.append_record(tmp_path, earlier)
    provenance.append_record(tmp_path, now)
    report = status_report(str(tmp_path))
    assert "not submitted to Slurm" in report and "training: running at step 3/5" in report
    assert f"versions: rlhf-launch {now['rlhf_launch']}" in report and f"torch {now['packages']['torch']}" in report
    assert "note: the resume at step 2 (" in report and f"torch 2.0.0 -> {now['packages']['torch']}" in report
    provenance.append_record(tmp_path, {**now, "start_step": 4, "packages": earlier["packages"]})
    assert status_report(str(tmp_path)).count("note: the resume") == 1  # a resume under the first versions again: no note
