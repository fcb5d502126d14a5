"""The data: each ``ppo_datas`` source exists and its records have a prompt's shape (the first ``SAMPLE_RECORDS``
of a large file, plus a count: rlhf_launch/frontend/preflight/records.py); each ``pretrain_datas`` source of PPO-ptx
holds texts or chats; a Hugging Face dataset is in the local cache (a missing one is an error, unless a Slurm job
gives its nodes a cache of their own). The sampled prompts and their records' other fields are kept for the
checks that render and score them."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_launch.core.data_sources import LOCAL_SUFFIXES, looks_local, parse_source
from rlhf_launch.core.problems import error
from rlhf_launch.frontend.preflight.findings import Preflight
from rlhf_launch.frontend.preflight.hub_cache import cached_snapshot, hf_home, hub_cache
from rlhf_launch.frontend.preflight.records import file_records

RENDERED_PROMPTS = 2_000  # prompts rendered and tokenized to count those over max_seq_len
BAD_RECORDS_SHOWN = 3


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
    from rlhf_launch.runtime.data import PromptDataError, record_to_text

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
            for where, record, problem in file_records(file):
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
    from rlhf_launch.runtime.data import split_hub_name

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
    from rlhf_launch.runtime.data import PromptDataError, record_fields, record_to_prompt

    checked, total = 0, 0
    for where, record, problem in file_records(file):
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
