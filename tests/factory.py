"""Job specs and process groups for tests, built in code.

Specs: the tests that exercise the math, the plan or a runtime piece build the small spec they
need here instead of reading the shipped files in specs/, so that editing a shipped spec cannot
change what they test. Every spec goes through ``rlhf_launch.frontend.spec.validate``: it is checked and
resolved exactly like a spec file, and a test asking for an invalid one gets the ``SpecError``.

- ``spec_dict`` / ``load`` / ``make_spec``: the tiny CPU models in build/tiny and the project's
  tiny prompt set (models that are not built yet only give warnings, as in a real spec);
- ``sized_spec_dict`` / ``load_sized`` / ``sized_spec``: model-free specs whose models are only a
  size (``num_params_b``), for plan and memory tests; no model files are read.

Overrides are dotted key paths, given as keywords (``make_spec(**{"train_config.ppo_minibatch": 8})``)
or as a dict (``make_spec({"model_configs.actor.trainer_config.parallel.data.size": 2})``); a value
replaces the whole key, ``REMOVE`` deletes it. ``layout``, ``vllm_generator``, ``reward_function`` and
``remote_code`` return such overrides for the usual layouts.

Process groups: ``run_on_ranks`` runs a function on N local processes that meet on one
``torch.distributed.TCPStore``, for tests of the exchanges between ranks.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import faulthandler
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rlhf_launch.core.config import JobSpec
from rlhf_launch.frontend.spec import LoadedSpec, set_path, validate

ROOT = Path(__file__).resolve().parents[1]
TINY_MODELS = ROOT / "build" / "tiny"
TINY_PROMPTS = ROOT / "data" / "prompts" / "tiny_prompts.jsonl"
SOURCE = "<tests.factory spec>"

REMOVE = object()  # an override value that deletes the key, to test its default


# --------------------------------------------------------------------------- specs
def _tiny_base() -> dict[str, Any]:
    """The tiny CPU spec: small batches whose sizes divide as the checks require."""
    models = {
        "actor": {"model_path": str(TINY_MODELS / "actor"), "torch_dtype": "float32",
                  "trainer_config": {"train_kwargs": {"lr": 1.0e-3, "loss_type": "per_token"}},
                  "generator_config": {"shared_with_trainer": True}},
        "reference": {"model_path": str(TINY_MODELS / "actor"), "torch_dtype": "float32"},
        "critic": {"model_path": str(TINY_MODELS / "critic"), "torch_dtype": "float32",
                   "trainer_config": {"train_kwargs": {"lr": 1.0e-3, "loss_type": "per_token"}}},
        "reward": {"model_path": str(TINY_MODELS / "reward"), "torch_dtype": "float32"},
    }
    return {
        "run": {"name": "test", "seed": 0, "device": "cpu"},
        "slurm": {"gpus_per_node": 2, "cpus_per_gpu": 1},
        "rollout_config": {
            "actor_micro_bs": 32, "reward_micro_bs": 32, "clip_reward_min": -1.5, "clip_reward_max": 1.5,
            "max_new_tokens": 24,
            "generate_kwargs": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 1},
        },
        "repeater_config": {"actor_micro_bs": 32, "ref_micro_bs": 32, "critic_micro_bs": 32, "kl_coeff": 0.02,
                            "gamma": 1.0, "gae_lambda": 0.95, "norm_adv": True},
        "train_config": {"ppo_minibatch": 16, "value_minibatch": 16, "actor_micro_bs": 8, "critic_micro_bs": 8,
                         "ppo_epochs": 2, "save_interval": 10, "max_train_step": 4},
        "model_configs": models,
        "dataset_config": {"num_samples_each_epoch": 32, "max_seq_len": 48, "random_seed": 1024,
                           "ppo_datas": [f"{TINY_PROMPTS}::1.0"]},
    }


def _sized_base(params_b: float) -> dict[str, Any]:
    """A GPU-cluster spec of models known only by size: hub-style names that are no local folder
    (so no config.json is read) and no size in the name (so ``num_params_b`` is the only one)."""
    def model(name: str, trained: bool) -> dict[str, Any]:
        config: dict[str, Any] = {"model_path": f"tests-factory/{name}", "torch_dtype": "bfloat16", "num_params_b": params_b}
        if trained:
            config["trainer_config"] = {"train_kwargs": {"lr": 1.0e-6}}
        return config

    return {
        "run": {"name": "sized"},
        "slurm": {"gpus_per_node": 8, "gpu_memory_gb": 80},
        "rollout_config": {"actor_micro_bs": 32, "reward_micro_bs": 32, "max_new_tokens": 1024},
        "repeater_config": {"actor_micro_bs": 8, "ref_micro_bs": 8, "critic_micro_bs": 32},
        "train_config": {"ppo_minibatch": 64, "value_minibatch": 64, "actor_micro_bs": 2, "critic_micro_bs": 2},
        "model_configs": {"actor": model("policy", True), "reference": model("policy", False),
                          "critic": model("value", True), "reward": model("reward", False)},
        "dataset_config": {"num_samples_each_epoch": 64, "max_seq_len": 1024, "ppo_datas": [f"{TINY_PROMPTS}::1.0"]},
    }


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set (or with ``REMOVE`` delete) the dotted ``key`` in nested dicts, creating sections on the way."""
    parts = key.split(".")
    if value is not REMOVE:
        set_path(data, parts, copy.deepcopy(value))  # the caller may reuse its value for another spec
        return
    node = data
    for part in parts[:-1]:
        node = node.get(part, {})
    node.pop(parts[-1], None)


def _overridden(base: dict[str, Any], overrides: Mapping[str, Any] | None, dotted: Mapping[str, Any],
                run_dir: str | Path | None) -> dict[str, Any]:
    if run_dir is not None:
        # The run writes to output_dir/name: split the folder the test wants into the two keys.
        run_dir = Path(run_dir)
        set_key(base, "run.output_dir", str(run_dir.parent))
        set_key(base, "run.name", run_dir.name)
    for key, value in {**(overrides or {}), **dotted}.items():
        set_key(base, key, value)
    return base


def spec_dict(overrides: Mapping[str, Any] | None = None, /, *, run_dir: str | Path | None = None, **dotted: Any) -> dict[str, Any]:
    """The tiny CPU spec as plain data (absolute paths, so it may be written anywhere as YAML),
    with ``overrides`` and ``dotted`` keys applied and ``run_dir`` as the run folder."""
    return _overridden(_tiny_base(), overrides, dotted, run_dir)


def sized_spec_dict(overrides: Mapping[str, Any] | None = None, /, *, params_b: float = 7.0,
                    run_dir: str | Path | None = None, **dotted: Any) -> dict[str, Any]:
    """A model-free spec as plain data: four ``params_b``-billion models, one GPU each, on 8-GPU nodes."""
    return _overridden(_sized_base(params_b), overrides, dotted, run_dir)


def validated(data: dict[str, Any], base_dir: str | Path = ROOT) -> LoadedSpec:
    """``data`` checked and resolved like a spec file in ``base_dir``; raises ``SpecError`` on errors."""
    return validate(data, SOURCE, Path(base_dir))


def load(overrides: Mapping[str, Any] | None = None, /, *, run_dir: str | Path | None = None,
         base_dir: str | Path = ROOT, **dotted: Any) -> LoadedSpec:
    """The tiny CPU spec, validated: spec, plan and warnings."""
    return validated(spec_dict(overrides, run_dir=run_dir, **dotted), base_dir)


def make_spec(overrides: Mapping[str, Any] | None = None, /, *, run_dir: str | Path | None = None,
              base_dir: str | Path = ROOT, **dotted: Any) -> JobSpec:
    """The tiny CPU spec, validated and resolved."""
    return load(overrides, run_dir=run_dir, base_dir=base_dir, **dotted).spec


def load_sized(overrides: Mapping[str, Any] | None = None, /, *, params_b: float = 7.0, **dotted: Any) -> LoadedSpec:
    """A model-free spec, validated: spec, plan (with memory estimates from ``params_b``) and warnings."""
    return validated(sized_spec_dict(overrides, params_b=params_b, **dotted))


def sized_spec(overrides: Mapping[str, Any] | None = None, /, *, params_b: float = 7.0, **dotted: Any) -> JobSpec:
    """A model-free spec, validated and resolved."""
    return load_sized(overrides, params_b=params_b, **dotted).spec


def layout(actor: int = 1, critic: int = 1, reference: int = 1, reward: int = 1, mode: str = "ddp") -> dict[str, Any]:
    """Overrides giving each role its data-parallel size; ``mode`` applies to actor and critic
    (deepspeed also needs a deepspeed_config, see ``zero``)."""
    sizes = {"actor": actor, "critic": critic, "reference": reference, "reward": reward}
    out: dict[str, Any] = {f"model_configs.{role}.trainer_config.parallel.data.size": size for role, size in sizes.items()}
    for role in ("actor", "critic"):
        out[f"model_configs.{role}.trainer_config.parallel.data.mode"] = mode
    return out


def zero(stage: int, *roles: str) -> dict[str, Any]:
    """Overrides running ``roles`` (default actor and critic) under DeepSpeed ZeRO ``stage`` in bf16."""
    out: dict[str, Any] = {}
    for role in roles or ("actor", "critic"):
        out[f"model_configs.{role}.trainer_config.parallel.data.mode"] = "deepspeed"
        out[f"model_configs.{role}.trainer_config.deepspeed_config"] = {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
    return out


def vllm_generator(data: int = 1, tensor: int = 1) -> dict[str, Any]:
    """Overrides giving the actor a separate vLLM generator group of ``data`` engines x ``tensor`` ranks."""
    return {"model_configs.actor.generator_config": {
        "shared_with_trainer": False, "generator_type": "vllm",
        "parallel": {"data": {"size": data}, "tensor": {"size": tensor}},
    }}


def reward_function(name: str = "rlhf_launch.runtime.rewards:vowel_ratio") -> dict[str, Any]:
    """Overrides replacing the reward model by a Python function (which runs on the reference's ranks, or on the
    actor's when kl_coeff 0 leaves the job without a reference)."""
    return {"model_configs.reward.model_path": None, "model_configs.reward.num_params_b": None,
            "model_configs.reward.reward_function": name}


def remote_code(folder: str | Path, roles: tuple[str, ...] = ("actor", "reference", "critic", "reward"), trust: bool = True
                ) -> dict[str, Any]:
    """Overrides putting the models of their own code (``folder``: the remote_code_models fixture) in ``roles``: the
    causal LM as actor, reference and critic, the reward model of its own class as reward, each with its
    ``trust_remote_code`` (and the job's tokenizer_config's, for the actor's tokenizer of its own class) set to ``trust``."""
    folder = Path(folder)
    out: dict[str, Any] = {}
    for role in roles:
        name = "tiny_remote_reward" if role == "reward" else "tiny_remote_causal"
        out[f"model_configs.{role}.model_path"] = str(folder / name)
        out[f"model_configs.{role}.trust_remote_code"] = trust
    if "actor" in roles:
        out["tokenizer_config.trust_remote_code"] = trust
    return out


# --------------------------------------------------------------------------- process groups
def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, store, *args)`` in ``world_size`` processes; return what each
    returned, in rank order. ``store`` is a client of one TCPStore, served by a process of its own
    that outlives every rank, on which ``rlhf_launch.runtime.dist.PeerGroup``s can be built.

    The processes are forked: they start in milliseconds (spawned ones would import torch and
    transformers again, seconds each) and ``fn`` may be a closure. A rank that raises fails the
    call with its traceback; ranks still running after ``timeout_s`` are killed and named, with
    the stack each was in. The store is never served by this process (``served_store`` says why).
    """
    import multiprocessing

    import torch.distributed  # noqa: F401 - imported once here, not once in every forked rank

    timeout = datetime.timedelta(seconds=timeout_s)
    ctx = multiprocessing.get_context("fork")
    with served_store(timeout_s) as port, tempfile.TemporaryDirectory(prefix="ranks-") as out:
        procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, timeout, Path(out), args), daemon=True)
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        stacks = _stacks_of(hung, procs, Path(out))
        for rank in hung:
            procs[rank].kill()
            procs[rank].join()
        errors = [(Path(out) / f"{rank}.err").read_text() for rank in range(world_size) if (Path(out) / f"{rank}.err").exists()]
        if errors or hung:
            # A rank that failed usually leaves the others waiting in a collective: its traceback is the news.
            raise AssertionError("\n".join(errors) + (f"\nranks {hung} still running after {timeout_s:g} s\n{stacks}" if hung else ""))
        died = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
        assert not died, f"ranks exited without a result: {died} (rank, exit code)"
        return [pickle.loads((Path(out) / f"{rank}.pkl").read_bytes()) for rank in range(world_size)]


@contextlib.contextmanager
def served_store(timeout_s: float = 120.0) -> Iterator[int]:
    """The port of a TCPStore served by a forked process of its own for the duration, which outlives every rank
    (a rank that served it would take it down while others still shut their groups down).

    Never served by this process: the server's thread takes glibc's resolver lock while it names each connecting
    peer, so a process forked at that moment inherits the lock held and hangs in its first connect; and a server
    object kept alive here (by a failed test's traceback) would be destroyed in a later forked child, whose
    destructor then joins a thread the child does not have and hangs."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    to_host, host_end = ctx.Pipe()
    host = ctx.Process(target=_serve_store, args=(host_end, datetime.timedelta(seconds=timeout_s)), daemon=True)
    host.start()
    try:
        if not to_host.poll(timeout_s):
            raise AssertionError(f"the store process did not start in {timeout_s:g} s")
        yield to_host.recv()
    finally:
        host.kill()
        host.join()


def leave_rank() -> None:
    """End a test rank process whose results are written, without the interpreter's teardown: there the
    communication threads of DeepSpeed engines have aborted a finished process (std::terminate)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_store(conn, timeout: datetime.timedelta) -> None:
    """Serve a TCPStore: send its port, then keep it up until killed."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout, wait_for_workers=False)
    conn.send(server.port)
    while True:
        time.sleep(3600)


def _stacks_of(hung: list[int], procs: list, out: Path) -> str:
    """The Python stacks of the hung ranks, each dumped by the rank itself on SIGUSR1."""
    for rank in hung:
        os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(0.5)
    return "\n".join(f"rank {rank}:\n{(out / f'{rank}.stack').read_text()}" for rank in hung if (out / f"{rank}.stack").exists())


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, timeout: datetime.timedelta,
               out: Path, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    # As in DataLoader workers: a forked child must not use the parent's OpenMP thread pool.
    torch.set_num_threads(1)
    # A rank that hangs is asked (SIGUSR1) where it is before it is killed.
    faulthandler.register(signal.SIGUSR1, file=(out / f"{rank}.stack").open("w"), all_threads=True)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timeout)
        result = fn(rank, world_size, store, *args)
        (out / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException:  # noqa: BLE001 - any failure is reported to the parent with its traceback
        (out / f"{rank}.err").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        os._exit(1)


# --------------------------------------------------------------------------- a reward model with its own tokenizer
OTHER_SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[SYSTEM]", "[USER]", "[BOT]"]
# Another layout than the tiny actor's template: role tags in brackets, the eos after every turn.
OTHER_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '[' + {'system': 'SYSTEM', 'user': 'USER', 'assistant': 'BOT'}[message['role']] + '] ' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[BOT] ' }}{% endif %}"
)


def build_other_reward_model(directory: Path, vocab_size: int = 384, seed: int = 7) -> Path:
    """A tiny reward model whose tokenizer differs from the tiny actor's (build/tiny): a byte-level BPE of
    ``vocab_size`` tokens with other special tokens and another chat template, and a randomly initialised
    sequence classifier of that vocabulary. Offline, deterministic, well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    from rlhf_launch.demo import tiny_models

    corpus = [m["content"] for messages in tiny_models.load_prompt_messages() for m in messages]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=OTHER_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        extra_special_tokens=OTHER_SPECIAL_TOKENS[3:], padding_side="left", chat_template=OTHER_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    config = tiny_models.llama_config(tokenizer, num_labels=1)
    model = tiny_models.init_model(LlamaForSequenceClassification, config, seed)
    tiny_models.save_with_tokenizer(model, tokenizer, directory)
    return directory


# --------------------------------------------------------------------------- exactness of a feature's runs
TIMING_SUFFIXES = ("_time_s", "gen_tokens_per_s")
TIMING_PREFIXES = ("busy_", "util_")  # per-role busy seconds and utilization (rlhf_launch/runtime/step_timing.py role_utilization)


def without_timing(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock figures, which differ between any two runs."""
    return [{k: v for k, v in row.items() if not (k.endswith(TIMING_SUFFIXES) or k.startswith(TIMING_PREFIXES))} for row in rows]


def check_resume_and_ranks(tmp_path: Path, single: Mapping[str, Any], keys: tuple[str, ...], steps: int = 3) -> list[dict]:
    """The two exactness properties of the tiny spec with overrides ``single`` (which must checkpoint every step):
    a run stopped after ``steps - 1`` steps and resumed equals the uninterrupted ``steps``-step run (timings aside),
    and the same spec with two actor ranks, each in a process of its own (``--local --processes``), matches the
    first ``steps - 1`` steps to 1e-5 on ``keys``. Returns the uninterrupted run's metrics."""

    import pytest

    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local

    full = {**single, "train_config.max_train_step": steps}
    run_local(make_spec(full), tmp_path / "straight", quiet=True)
    straight = read_metrics(tmp_path / "straight")
    assert len(straight) == steps
    run_local(make_spec({**full, "train_config.max_train_step": steps - 1}), tmp_path / "resumed", quiet=True)
    run_local(make_spec(full), tmp_path / "resumed", resume="auto", quiet=True)
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(straight)

    got = run_processes(tmp_path, {**full, **layout(actor=2), "train_config.max_train_step": steps - 1}, "ranks")
    assert len(got) == steps - 1
    for a, b in zip(got, straight, strict=False):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    return straight


def run_processes(tmp_path: Path, overrides: Mapping[str, Any], name: str) -> list[dict]:
    """The tiny spec with ``overrides`` run by ``rlhf-launch --local --processes`` (one process per rank) into
    ``tmp_path / name``; its metrics rows (the run must succeed)."""
    import subprocess
    import sys

    from rlhf_launch.core import yaml_io
    from rlhf_launch.runtime.metrics import read_metrics

    spec_file = tmp_path / f"{name}.yaml"
    spec_file.write_text(yaml_io.dump(spec_dict(overrides, run_dir=tmp_path / name)))
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", str(spec_file), "--local", "--processes"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(tmp_path / name)


def assert_runs_agree(tmp_path: Path, changed: Mapping[str, Any], keys: tuple[str, ...], steps: int = 2, tol: float = 1e-5) -> None:
    """The tiny spec run ``steps`` steps in one process with and without the overrides ``changed`` gives the
    same metrics on ``keys`` to ``tol``: for settings that must change how a run computes, not what."""
    import pytest

    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local

    base = {"train_config.max_train_step": steps}
    run_local(make_spec(base), tmp_path / "reference", quiet=True)
    run_local(make_spec({**base, **changed}), tmp_path / "changed", quiet=True)
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "changed")
    assert len(got) == len(expected) == steps
    for a, b in zip(got, expected, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=tol), (a["step"], key)


def join_as_rank(rank: int, world: int, store, plan):
    """In a ``run_on_ranks`` rank: this rank's ``rlhf_launch.runtime.cluster.Distributed`` for ``plan``, with torch's default group
    being the rank's role (or engine) on the job's store, as ``rlhf_launch.runtime.dist.rendezvous`` makes it."""
    import torch
    import torch.distributed as dist

    from rlhf_launch.runtime.cluster import Distributed
    from rlhf_launch.runtime.dist import Topology

    role, role_rank = plan.role_of_rank(rank)
    topo = Topology(rank, world, role, role_rank, 0, plan)
    ranks = topo.default_group_ranks()
    dist.init_process_group("gloo", store=dist.PrefixStore(f"rlhf_launch/runtime/role/{role}/{ranks[0]}", store), rank=ranks.index(rank),
                            world_size=len(ranks), timeout=datetime.timedelta(seconds=30))
    return Distributed(topo, torch.device("cpu"), store)
