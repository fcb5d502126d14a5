"""`rlhf-launch`: run an RLHF-PPO job spec on Slurm or on this machine.

The command line's rules live here (the flags, the dry run, the checks before a run); the run itself
goes to a launch backend (rlhf_launch/frontend/backends/). Imports no torch: the launcher must answer
on login nodes, fast. Runtime pieces are imported only by the commands that run training.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_launch.core.problems import SpecError
from rlhf_launch.frontend.backends import BACKENDS, DEFAULT_BACKEND, Backend
from rlhf_launch.frontend.backends.start import EXIT_BAD_SPEC
from rlhf_launch.frontend.run_dir import run_dir_in_use, run_dir_of

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
    for name, backend in BACKENDS.items():
        if backend.flag:
            mode.add_argument(backend.flag, dest=name, action="store_true", help=backend.help)
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


def main_spec(argv: Sequence[str]) -> int:
    """``rlhf-launch SPEC ...``: validate the spec, then show the plan, or check it and hand the run to
    the backend its flags pick (rlhf_launch/frontend/backends/: this machine, or Slurm by default)."""
    from rlhf_launch.frontend.backends.slurm_script import JobFiles, RenderError, render_sbatch
    from rlhf_launch.frontend.spec import load_spec

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
    flagged = [name for name, backend in BACKENDS.items() if backend.flag and getattr(args, name)]
    if len(flagged) > 1:
        print(f"rlhf-launch: {BACKENDS[flagged[0]].flag} goes without {BACKENDS[flagged[1]].flag}", file=sys.stderr)
        return EXIT_BAD_SPEC
    backend = BACKENDS[flagged[0] if flagged else DEFAULT_BACKEND]
    if args.dry_run:
        if args.json:
            print(json.dumps({**loaded.plan.to_json(), "run_dir": files.run_dir, "sbatch": script}, indent=2))
        else:
            from rlhf_launch.frontend.show_plan import plan_table

            print(plan_table(loaded.plan, loaded.spec.slurm.gpu_memory_gb))
            print(script, end="")
        return 0
    in_use = None if args.check else run_dir_in_use(Path(files.run_dir))
    if in_use:  # first, and once: a folder another run trains in is the one thing worth saying
        print(f"rlhf-launch: {in_use}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if not args.no_check:
        status = run_preflight(loaded, Path(files.run_dir), args.resume, backend, args.check)
        if status is not None or args.check:
            return status or 0
    from rlhf_launch.runtime.provenance import LAUNCH_COMMAND_ENV

    # The ranks record it in RUN_DIR/provenance.json (on Slurm, sbatch passes this environment on).
    saved = os.environ.get(LAUNCH_COMMAND_ENV)
    os.environ[LAUNCH_COMMAND_ENV] = shlex.join(["rlhf-launch", *argv])
    try:
        return backend.launch(loaded, Path(files.run_dir), args.resume, processes=args.processes)
    finally:
        if saved is None:
            os.environ.pop(LAUNCH_COMMAND_ENV, None)
        else:
            os.environ[LAUNCH_COMMAND_ENV] = saved


def run_preflight(loaded, run_dir: Path, resume: str | None, backend: Backend, verbose: bool) -> int | None:
    """Check every input the run reads (``rlhf_launch.frontend.preflight``) where ``backend`` runs it, and report
    the problems, one line each. Returns EXIT_BAD_SPEC when any is an error, else None; ``verbose`` (--check) also
    says what was checked."""
    from rlhf_launch.frontend.preflight import preflight

    found = preflight(loaded.spec, run_dir, resume, backend.reads_here)
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
        print(f"{loaded.source}: ready for {backend.target}" + (f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""))
    return None


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
    from rlhf_launch.frontend.convert import ConvertError, convert_file, to_yaml
    from rlhf_launch.frontend.spec import validate

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
    from rlhf_launch.frontend import generated

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
    from rlhf_launch.frontend.backends.slurm_jobs import SlurmError, cancel, status_report

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
            from rlhf_launch.frontend.plot import main as main_plot

            return main_plot(argv[1:])
        if argv[0] in ("status", "cancel"):
            return main_job(argv[0], argv[1:])
        return {"convert": main_convert, "schema": main_schema}[argv[0]](argv[1:])
    return main_spec(argv)


if __name__ == "__main__":
    sys.exit(main())
