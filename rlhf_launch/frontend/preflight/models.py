"""The models: each model folder (or hub id in the local cache) has a config.json whose architecture fits its
role; a model type transformers does not know comes with its own code, allowed to run (remote_code.py); reward
and critic checkpoints have a value head the runtime will find (names from the index and the safetensors
headers, rlhf_launch/core/checkpoint_index.py); and the memory plan is recomputed from the configs of cached hub
models. A hub model missing from the cache is an error for ``--local`` and a warning for a Slurm submission, whose
nodes may have it. The model of a role the plan does not have is not looked at."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rlhf_launch.core.checkpoint_index import KNOWN_HEADS, find_value_head, head_like_tensors, tensor_shapes
from rlhf_launch.core.data_sources import looks_local
from rlhf_launch.core.model_shape import local_config
from rlhf_launch.core.plan import build_plan, planned_models
from rlhf_launch.core.problems import error, warning
from rlhf_launch.frontend.preflight.findings import Preflight
from rlhf_launch.frontend.preflight.hub_cache import hub_cache, local_folder
from rlhf_launch.frontend.preflight.remote_code import check_model_code

CAUSAL_LM = ("ForCausalLM", "LMHeadModel")
SCORER_ARCHS = ("ForSequenceClassification", *CAUSAL_LM)  # loaded by the critic and reward roles
# Task names (after "For") of models that cannot score text: vision, speech and audio heads.
NOT_TEXT_SCORERS = ("Image", "Vision", "Video", "ObjectDetection", "SemanticSegmentation", "InstanceSegmentation",
                    "UniversalSegmentation", "DepthEstimation", "MaskedImageModeling", "Audio", "Speech", "CTC", "XVector")


def model_folder(pf: Preflight, key: str, model_path: str) -> Path | None:
    """The local folder of a model: its own, or its snapshot in the hub cache; None (and a problem) if absent."""
    path = Path(model_path).expanduser()
    if path.is_absolute() or looks_local(model_path):
        if not path.is_dir():
            pf.problems.append(error(key, f"local folder {path} does not exist; expected a Hugging Face model folder"))
            return None
        return path
    snapshot = local_folder(model_path)  # the folder the ranks load (rlhf_launch/core/hub_cache.py)
    if snapshot is None or not (snapshot / "config.json").is_file():
        pf.absent_here(key, (
            f"hub model {model_path!r} is not in this machine's Hugging Face cache ({hub_cache()}) and runs never download: "
            f"get it with `hf download {model_path}`, or give a local folder"
        ))
        return None
    return snapshot


def check_models(pf: Preflight) -> None:
    """Each model's config fits its role, and reward and critic checkpoints have a value head; the model of a
    role the plan does not have (an ignored section: ``unplanned_roles``) is not looked at."""
    for role, model in planned_models(pf.spec).items():
        if not model.model_path:
            continue
        key = f"model_configs.{role}.model_path"
        pf.at(key, model.model_path)
        folder = model_folder(pf, key, model.model_path)
        if folder is None:
            continue
        pf.folders[role] = folder
        cfg = local_config(str(folder))
        if cfg is None:
            pf.problems.append(error(key, f"{folder} has no readable config.json; expected a Hugging Face model folder"))
            continue
        pf.configs[role] = cfg
        raw = _raw_config(folder)
        check_model_code(pf, role, key, folder, raw, model.trust_remote_code)
        archs = architectures(raw)
        if role in ("actor", "reference") and archs and not any(a.endswith(CAUSAL_LM) for a in archs):
            pf.problems.append(error(
                key, f"{folder} is a {', '.join(archs)}; the {role} generates or scores tokens, expected a causal LM (*ForCausalLM)",
            ))
        if role in ("critic", "reward"):
            _check_scorer_architecture(pf, role, key, folder, raw)
            _check_value_head(pf, role, key, folder, model.head_name)


def architectures(config: dict) -> list[str]:
    """The class names in a config's "architectures": a list of names, or one name written as a string."""
    value = config.get("architectures")
    if isinstance(value, str):
        return [value]
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


def _check_scorer_architecture(pf: Preflight, role: str, key: str, folder: Path, config: dict) -> None:
    """A critic or reward model is loaded as a sequence classifier (AutoModelForSequenceClassification) whose head
    scores the last token: an error for a model that clearly is none (encoder-decoder, vision or speech), a warning
    for an architecture that is neither a classifier, a reward or value model nor a causal LM."""
    archs = architectures(config)
    if config.get("is_encoder_decoder") or any(_task_of(a).startswith(NOT_TEXT_SCORERS) for a in archs):
        kind = f"an encoder-decoder model ({config.get('model_type')})" if config.get("is_encoder_decoder") else "not a text model"
        what = f"a {', '.join(archs)}, {kind}" if archs else kind
        pf.problems.append(error(key, (
            f"{folder} is {what}; the {role} scores a whole sequence with a one-output head on a decoder, expected a "
            f"*ForSequenceClassification, a reward model or a causal LM (whose value head head_name names)"
        )))
    elif archs and not any(a.endswith(SCORER_ARCHS) or "Reward" in a or "Value" in a for a in archs):
        pf.problems.append(warning(key, (
            f"{folder} is a {', '.join(archs)}, loaded for the {role} as AutoModelForSequenceClassification: expected a "
            "*ForSequenceClassification, a reward model or a causal LM; check that it is the model meant"
        )))


def _task_of(architecture: str) -> str:
    """The task part of an architecture's class name: 'ImageClassification' of 'ViTForImageClassification'."""
    return architecture.rpartition("For")[2] if "For" in architecture else ""


def _raw_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _check_value_head(pf: Preflight, role: str, key: str, folder: Path, head_name: str | None) -> None:
    try:
        shapes = tensor_shapes(folder)
    except (OSError, ValueError, KeyError) as exc:
        pf.problems.append(error(key, f"cannot read the tensor names of {folder}: {exc}; expected a Hugging Face checkpoint"))
        return
    if shapes is None:
        return  # a single pytorch_model.bin, or no weights cached yet: the runtime checks it when loading
    if find_value_head(shapes, head_name) is not None:
        return
    wanted = repr(head_name) if head_name else f"any of {', '.join(repr(h) for h in KNOWN_HEADS)}"
    if role == "critic" and head_name is None:
        pf.problems.append(warning(key, f"{folder} has no value head ({wanted}): the critic starts from a new head"))
        return
    listed = ", ".join(head_like_tensors(shapes)) or "none"
    pf.problems.append(error(
        f"model_configs.{role}.head_name" if head_name else key,
        f"{folder} has no value head named {wanted}, so the {role} would score at random; its tensors outside "
        f"the decoder layers: {listed}; set model_configs.{role}.head_name to the head's name",
    ))


def check_memory_plan(pf: Preflight) -> None:
    """The plan's memory estimate again, with the configs of hub models found in the cache instead of their names."""
    models = pf.spec.model_configs.roles()
    hub_roles = {r: f for r, f in pf.folders.items() if r in pf.configs and not Path(models[r].model_path).is_absolute()}
    if not hub_roles:
        return
    pf.at("model_configs", f"the cached configs of {', '.join(sorted(hub_roles))}")
    real = copy.deepcopy(pf.spec)
    for role, folder in hub_roles.items():
        real.model_configs.roles()[role].model_path = str(folder)
    before = {(p.path, p.message) for p in build_plan(pf.spec).problems}
    pf.problems.extend(p for p in build_plan(real).problems if (p.path, p.message) not in before)
    pf.notes.append(f"memory plan recomputed from the cached configs of {', '.join(sorted(hub_roles))}")
