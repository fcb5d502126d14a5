"""``--resume``: the checkpoint is complete, holds the state of exactly the roles this spec trains (no critic for a
spec without one), and was written for the same models, layout, advantage estimator and reward (its run's
spec.yaml says which)."""

from __future__ import annotations

from pathlib import Path

from rlhf_launch.core.config import TRAINED, JobSpec
from rlhf_launch.core.model_shape import local_config, shape_from_config
from rlhf_launch.core.plan import planned_models, unplanned_roles
from rlhf_launch.core.problems import error, warning
from rlhf_launch.frontend.preflight.findings import Preflight
from rlhf_launch.runtime.reward_function import current_name


def check_resume(pf: Preflight) -> None:
    """The checkpoint ``--resume`` names is complete, holds the state of exactly the roles this spec trains, and
    was written for this spec's models, layout, advantage estimator and reward (its run's spec.yaml says which)."""
    if pf.resume is None:
        return
    pf.at("--resume", pf.resume)
    from rlhf_launch.runtime.checkpoint import CheckpointError, read_marker, resolve_resume

    try:
        checkpoint = resolve_resume(pf.run_dir, pf.resume)
    except CheckpointError as exc:
        pf.problems.append(error("--resume", str(exc)))
        return
    if checkpoint is None:
        return
    files = (read_marker(checkpoint) or {}).get("files", [])
    trained = [role for role in TRAINED if role in planned_models(pf.spec)]  # no critic state without a critic
    _check_trained_files(pf, checkpoint, files, trained)
    _check_untrained_files(pf, checkpoint, files)
    if "loop.pt" not in files:
        pf.problems.append(error("--resume", f"{checkpoint} has no loop.pt; expected a checkpoint written by rlhf-launch"))
    written_by = checkpoint.parent.parent / "spec.yaml"
    if not written_by.is_file():
        pf.problems.append(warning("--resume", f"{written_by} is missing: cannot tell which models wrote {checkpoint}"))
        return
    from rlhf_launch.core.resolved import ResolvedSpecError, load_resolved

    try:
        old = load_resolved(written_by).spec
    except ResolvedSpecError as exc:
        pf.problems.append(warning("--resume", f"cannot tell which models wrote {checkpoint}: {exc}"))
        return
    where = f"{checkpoint} was written by the run of {written_by}"
    for role in trained:
        _compare_role(pf, role, where, old.model_configs.roles()[role], pf.spec.model_configs.roles()[role])
    _compare_objective(pf, where, old, pf.spec)


def _check_trained_files(pf: Preflight, checkpoint: Path, files: list[str], trained: list[str]) -> None:
    """Each role this spec trains has its state in the checkpoint, saved as its data.mode saves it."""
    for role in trained:
        mode = pf.spec.model_configs.roles()[role].trainer_config.parallel.data.mode
        found = f"{role}.pt" in files if mode == "ddp" else any(f.startswith(f"{role}/") for f in files)
        if not found:
            wanted = f"{role}.pt" if mode == "ddp" else f"a DeepSpeed folder {role}/"
            pf.problems.append(error("--resume", (
                f"{checkpoint} has no {wanted} for the {role} (data.mode {mode!r} in this spec); expected a checkpoint "
                "written by a run of the same layout"
            )))


def _check_untrained_files(pf: Preflight, checkpoint: Path, files: list[str]) -> None:
    """No role this spec leaves out has state in the checkpoint: a critic's state means a run of another algorithm
    (a PPO checkpoint resumed by a GRPO spec would drop its critic and continue another objective)."""
    unused = unplanned_roles(pf.spec)
    for role in TRAINED:
        held = [f for f in files if f == f"{role}.pt" or f.startswith(f"{role}/")]
        if role in unused and held:
            what = f"{role}.pt" if f"{role}.pt" in held else f"a DeepSpeed folder {role}/"
            pf.problems.append(error("--resume", (
                f"{checkpoint} holds {what}, the state of a {role}, but this spec has no {role} ({unused[role]}); expected "
                f"a checkpoint of a run without a {role}: resume with that run's spec, or start a new run"
            )))


def _compare_role(pf: Preflight, role: str, where: str, old, new) -> None:
    """The checkpoint's run trained ``role`` from the same model (an architecture match at another path is
    warned about) with the same layout."""
    where = f"{where}, whose {role}"
    advice = "resume with that run's spec, or start a new run"
    if old.model_path != new.model_path:
        old_shape, new_shape = _architecture(old.model_path), _architecture(new.model_path)
        if old_shape is None or old_shape != new_shape:
            pf.problems.append(error("--resume", (
                f"{where} is {old.model_path} ({_describe(old_shape)}), but this spec's {role} is {new.model_path} "
                f"({_describe(new_shape)}); expected the same model; {advice}"
            )))
            return
        pf.problems.append(warning(f"model_configs.{role}.model_path", (
            f"the --resume checkpoint {where} was {old.model_path}; {new.model_path} has the same architecture, and the "
            "checkpoint's weights replace its own"
        )))
    old_tc, new_tc = old.trainer_config, new.trainer_config
    old_layout = (old_tc.parallel.data.mode, _zero(old_tc), old_tc.parallel.data.size if old_tc.parallel.data.mode == "deepspeed" else None)
    new_layout = (new_tc.parallel.data.mode, _zero(new_tc), new_tc.parallel.data.size if new_tc.parallel.data.mode == "deepspeed" else None)
    if old_layout != new_layout:
        pf.problems.append(error("--resume", (
            f"{where} ran {_describe_layout(old_layout)}, but this spec's runs {_describe_layout(new_layout)}; expected "
            f"the same layout, since the optimizer state is saved as it was sharded; {advice}"
        )))


def _compare_objective(pf: Preflight, where: str, old: JobSpec, new: JobSpec) -> None:
    """The checkpoint's run optimised the same thing: the same advantage estimator and the same reward (its
    policy and the reward statistics in loop.pt were fitted to them)."""
    advice = "resume with that run's spec, or start a new run (model_path can name that run's final/ models)"
    old_est, new_est = old.repeater_config.advantage_estimator, new.repeater_config.advantage_estimator
    if old_est != new_est:
        pf.problems.append(error("--resume", (
            f"{where}, whose repeater_config.advantage_estimator is {old_est!r}, but this spec's is {new_est!r}; "
            f"expected the same estimator; {advice}"
        )))
    old_reward, new_reward = _reward_of(old), _reward_of(new)
    if old_reward == new_reward:
        return
    if old_reward[0] == new_reward[0] == "the reward model":
        old_shape, new_shape = _architecture(old_reward[1]), _architecture(new_reward[1])
        if old_shape is not None and old_shape == new_shape:
            pf.problems.append(warning("model_configs.reward.model_path", (
                f"the --resume checkpoint {where}, whose reward model was {old_reward[1]}; {new_reward[1]} has the same "
                "architecture: the run continues with its scores"
            )))
            return
    pf.problems.append(error("--resume", (
        f"{where}, whose reward is {old_reward[0]} {old_reward[1]}, but this spec's is {new_reward[0]} {new_reward[1]}; "
        f"expected the same reward, to which the checkpoint's reward statistics (loop.pt) were fitted; {advice}"
    )))


def _reward_of(spec: JobSpec) -> tuple[str, str | None]:
    """What scores the responses of a spec's run: ('the function', 'module:name') or ('the reward model', path). A
    function is named as it is loaded (``current_name``): an older run's name of a built-in one is the same function."""
    reward = spec.model_configs.reward
    if reward.reward_function:
        return "the function", current_name(reward.reward_function)
    return "the reward model", reward.model_path


def _zero(tc) -> int | None:
    if tc.parallel.data.mode != "deepspeed":
        return None
    return (tc.deepspeed_config or {}).get("zero_optimization", {}).get("stage")


def _describe_layout(layout: tuple) -> str:
    mode, stage, size = layout
    return "with ddp" if mode == "ddp" else f"with DeepSpeed ZeRO-{stage} on {size} ranks"


def _architecture(model_path: str | None) -> tuple | None:
    cfg = local_config(model_path)
    if cfg is None:
        return None
    try:
        shape = shape_from_config(cfg, "config.json")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return (cfg.get("model_type"), shape.layers, shape.hidden, shape.kv_dim, shape.vocab, int(shape.params))


def _describe(arch: tuple | None) -> str:
    if arch is None:
        return "architecture unknown here"
    model_type, layers, hidden, _, vocab, params = arch
    return f"{model_type}, {layers} layers of width {hidden}, vocabulary {vocab}, {params / 1e6:.1f}M parameters"
