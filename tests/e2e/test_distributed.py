"""Roles in their own processes (rlhf-launch --local): same losses as one process, DDP and
ZeRO-3, a separate generator group; failures take every rank down, naming the culprit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from rlhf_launch.core.config import TrainKwargs
from rlhf_launch.frontend.backends.local import start_ranks
from rlhf_launch.frontend.spec import load_spec
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.checkpoint import checkpoint_name, checkpoints_dir
from rlhf_launch.runtime.engine import TorchTrainer
from rlhf_launch.runtime.metrics import read_metrics
from rlhf_launch.runtime.roles.common import minibatch_order, train_minibatches
from rlhf_launch.runtime.timing import Timer
from rlhf_launch.runtime.training_run import run_local
from tests.conftest import ROOT
from tests.factory import run_on_ranks

TINY = ROOT / "specs" / "tiny_cpu.yaml"
# Clip fractions are left out: they count ties (new value == old value exactly, as in the first
# minibatch) that rounding differences of 1e-7 between layouts break either way.
COMPARED = ["reward_mean", "kl", "policy_loss", "value_loss", "entropy", "actor_approx_kl", "actor_grad_norm", "critic_grad_norm"]
BASE = ["train_config.max_train_step=3", "train_config.save_interval=0"]
# Uneven shares everywhere: 34 prompts; the critic's values over 3 ranks (12, 11, 11), its minibatches
# of 17 over 3 (6, 6, 5 in micro batches of 2); the actor's over 2 (9 and 8 in micro batches of 1: the
# second rank runs one zero-weighted step per minibatch); the reward's over 2. Sampling is seeded per
# generate call: calls of 17 prompts cover the same prompts in one process as on the two actor ranks.
UNEVEN_DDP = [
    "dataset_config.num_samples_each_epoch=34",
    "train_config.ppo_minibatch=17",
    "train_config.value_minibatch=17",
    "train_config.actor_micro_bs=1",
    "train_config.critic_micro_bs=2",
    "rollout_config.actor_micro_bs=17",
    "model_configs.actor.trainer_config.parallel.data.size=2",
    "model_configs.critic.trainer_config.parallel.data.size=3",
    "model_configs.reward.trainer_config.parallel.data.size=2",
]
LAYOUTS = {
    "ddp-uneven": UNEVEN_DDP,
    "zero3-separate-generator": [
        "model_configs.actor.trainer_config.parallel.data={size: 2, mode: deepspeed}",
        "model_configs.critic.trainer_config.parallel.data={size: 2, mode: deepspeed}",
        "model_configs.actor.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
        "model_configs.critic.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
        "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}",
    ],
}


def launch(tmp_path, sets, name="run", resume=False, check=True):
    args = [
        sys.executable, "-m", "rlhf_launch", str(TINY), "--local", "--processes", *([] if check else ["--no-check"]),
        "--output-dir", str(tmp_path),
        "--set", f"run.name={name}",
    ]
    for s in sets:
        args += ["--set", s]
    if resume:  # True: the run's own latest checkpoint; a path: that checkpoint
        args += ["--resume"] if resume is True else ["--resume", str(resume)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _matches_one_process(tmp_path, sets: list[str]) -> None:
    """The tiny spec with ``sets`` run over its ranks (one process each) equals one process to 1e-5, step by step."""
    proc = launch(tmp_path, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = read_metrics(tmp_path / "run")
    single = run_local(load_spec(TINY, sets).spec, tmp_path / "single", quiet=True)
    assert [r["step"] for r in distributed] == [1, 2, 3]
    for a, b in zip(distributed, single, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    for row in distributed:  # every role's busiest rank, gathered to rank 0
        for role in ("generator", "actor", "reference", "critic", "reward"):
            assert 0.0 < row[f"util_{role}"] <= 1.05, (row["step"], role)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_distributed_run_matches_one_process(tiny_models, tmp_path, layout):
    _matches_one_process(tmp_path, BASE + LAYOUTS[layout])
    assert (tmp_path / "run" / "final" / "actor" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "COMPLETE").exists()


GREEDY = [*BASE, "rollout_config.generate_kwargs.do_sample=false"]
GENERATOR = (
    "model_configs.actor.generator_config={{shared_with_trainer: false, generator_type: {}, "
    "parallel: {{data: {{size: {}}}, tensor: {{size: {}}}}}}}"
)


@pytest.mark.slow
def test_vllm_generator_resumes_from_the_checkpoint_weights(tiny_models, tmp_path):
    """Greedy decoding makes the rollouts comparable with HF generate's: every step's responses come from engines
    that received the actor's weights in memory, so any missed or wrong update shows up, and after --resume the
    engines must generate from the checkpoint's policy, not the initial one. Two engines of one rank each (one engine
    over two tensor ranks: the Slurm test), asynchronous (max_staleness 1): each engine samples the next step's
    rollout in a thread while the trainers train, and the checkpoint carries that rollout."""
    sets = [*GREEDY, GENERATOR.format("vllm", 2, 1), "train_config.save_interval=2", "rollout_config.max_staleness=1"]
    keys = [*COMPARED, "response_len_mean", "gen_logprob_gap"]
    assert_resumed_equals_straight(tmp_path, sets, keys)
    with_hf = run_local(load_spec(TINY, [*GREEDY, GENERATOR.format("hf", 1, 1), "rollout_config.max_staleness=1",
                                         "train_config.max_train_step=4"]).spec, tmp_path / "hf", quiet=True)
    for a, b in zip(read_metrics(tmp_path / "straight"), with_hf, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert with_hf[-1]["gen_logprob_gap"] > 1e-3  # the rollouts lag one update behind the actor


def assert_resumed_equals_straight(tmp_path, sets, keys):
    """4 steps straight (``sets`` saves every 2), then a run resumed from the straight run's step-2 checkpoint: its
    steps 3 and 4 equal the straight run's. A checkpoint written mid-run holds what the last step's holds (the
    rollout sampled ahead included), so this is the stopped-and-resumed case, with one launch fewer."""
    straight = launch(tmp_path, [*sets, "train_config.max_train_step=4"], name="straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = checkpoints_dir(tmp_path / "straight") / checkpoint_name(2)
    resumed = launch(tmp_path, [*sets, "train_config.max_train_step=4"], name="resumed", resume=checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(tmp_path / "straight")[2:], read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3, 4]
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


@pytest.mark.slow
def test_a_killed_rank_takes_every_rank_down_naming_it(tiny_models, tmp_path):
    # 20 s of silence, not the default 120: global rank 0 names the dead rank to every rank within a minute.
    loaded = load_spec(TINY, ["train_config.max_train_step=500", f"run.output_dir={tmp_path}", "run.heartbeat_timeout_s=20"])
    run_dir = tmp_path / "tiny_cpu"
    run_dir.mkdir()
    from rlhf_launch.core import yaml_io

    (run_dir / "spec.yaml").write_text(yaml_io.dump(loaded.spec.to_dict()))
    procs = start_ranks(loaded.plan, run_dir / "spec.yaml", run_dir, None, rank0_to_terminal=False)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline, "training never started"
            assert all(p.process.poll() is None for p in procs)
            time.sleep(0.5)
        victim = next(p for p in procs if p.role == "reference")
        os.killpg(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for p in procs:
            if p is not victim:
                p.process.wait(timeout=max(1, 60 - (time.monotonic() - killed_at)))
        assert time.monotonic() - killed_at < 60
        others = [p for p in procs if p is not victim]
        assert all(p.process.returncode != 0 for p in others), [p.process.returncode for p in others]
        logs = "".join(p.log.read_text() for p in others)
        assert "reference rank 0 (global rank 2) stopped responding" in logs, logs[-3000:]
    finally:
        for p in procs:
            if p.process.poll() is None:
                os.killpg(p.process.pid, signal.SIGKILL)


def test_launcher_stops_every_rank_when_one_fails(tiny_models, tmp_path):
    (tmp_path / "not_a_model").mkdir()
    # --no-check: the pre-flight would refuse this folder before any rank starts
    proc = launch(tmp_path, ["train_config.max_train_step=2", f"model_configs.reward.model_path={tmp_path / 'not_a_model'}"],
                  check=False)
    assert proc.returncode != 0
    assert "reward rank 0 (global rank 3) exited with status" in proc.stderr
    assert "stopping the other ranks" in proc.stderr


def test_rendezvous_timeout_names_the_missing_ranks(tiny_models, tmp_path):
    loaded = load_spec(TINY, ["run.rendezvous_timeout_s=2"])
    from rlhf_launch.core import yaml_io
    from rlhf_launch.frontend.backends.local import free_port, rank_environments

    (tmp_path / "spec.yaml").write_text(yaml_io.dump(loaded.spec.to_dict()))
    env = {**os.environ, **rank_environments(loaded.plan, free_port(), 1)[0]}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_launch.runtime.worker", "--spec", str(tmp_path / "spec.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert "never arrived: critic rank 0 (global rank 1), reference rank 0 (global rank 2), reward rank 0 (global rank 3)" in proc.stderr


ZERO3_SHARED = [
    "slurm.gpus_per_node=4",
    "rollout_config.actor_micro_bs=16",
    "model_configs.actor.trainer_config.parallel.data={size: 2, mode: deepspeed}",
    "model_configs.critic.trainer_config.parallel.data={size: 2, mode: deepspeed}",
    "model_configs.actor.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
    "model_configs.critic.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
    "train_config.save_interval=2",
]


@pytest.mark.slow
def test_zero3_shared_generator_resumes_exactly(tiny_models, tmp_path):
    """Generation from gathered ZeRO-3 parameters, DeepSpeed checkpoints, and --resume."""
    assert_resumed_equals_straight(tmp_path, ZERO3_SHARED, COMPARED)


@pytest.mark.slow
def test_preemption_notice_checkpoints_and_resume_finishes(tiny_models, tmp_path):
    """SIGUSR1 (what the sbatch script forwards before a time limit) -> checkpoint after the
    current step, a requeue request, exit 0; --resume then finishes the run."""
    sets = ["train_config.max_train_step=200", "train_config.save_interval=0"]
    args = [sys.executable, "-m", "rlhf_launch", str(TINY), "--local", "--processes", "--output-dir", str(tmp_path)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    run_dir = tmp_path / "tiny_cpu"
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    import json

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] < 200
    assert (run_dir / "checkpoints" / "requeue").exists()
    assert (run_dir / "checkpoints" / f"step-{status['step']:08d}" / "COMPLETE").exists()
    args[args.index("train_config.max_train_step=200")] = f"train_config.max_train_step={status['step'] + 2}"
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, status["step"] + 3))


# --------------------------------------------------------------------------- uneven shares of a minibatch
UNEVEN_ROWS, UNEVEN_WIDTH, UNEVEN_DIM = 10, 4, 3  # two minibatches of 5: shares of 3 and 2 rows on 2 ranks


def _uneven_experience() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(UNEVEN_ROWS, UNEVEN_WIDTH, generator=gen) > 0.3).long()
    mask[:, 0] = 1  # every sequence has a token
    return {
        "x": torch.randn(UNEVEN_ROWS, UNEVEN_WIDTH, UNEVEN_DIM, generator=gen),
        "target": torch.randn(UNEVEN_ROWS, UNEVEN_WIDTH, generator=gen),
        "response_mask": mask,
    }


def _uneven_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Linear(UNEVEN_DIM, 1)


def _squared_error_loss(model, loss_type: str):
    def loss_fn(micro, num_seqs, num_tokens):
        token_losses = (model(micro["x"]).squeeze(-1) - micro["target"]) ** 2
        return ppo.aggregate_loss(token_losses, micro["response_mask"], loss_type, num_seqs, num_tokens), {"rows": torch.tensor(1.0)}
    return loss_fn


def _train_uneven(rank: int, world: int, store, loss_type: str, micro_bs: int) -> dict:
    """DDP over ``world`` ranks of a 5-row minibatch: shares of 3 and 2 rows."""
    dist.init_process_group("gloo", store=dist.PrefixStore("ddp", store), rank=rank, world_size=world)
    module = _uneven_model()
    trainer = TorchTrainer(module, TrainKwargs(lr=0.1), group=dist.group.WORLD, device=torch.device("cpu"))
    stats = train_minibatches(trainer, _uneven_experience(), _squared_error_loss(trainer.module, loss_type), 5, micro_bs, 2, 11,
                              Timer(), shard=(rank, world), group=dist.group.WORLD)
    # The group is left to the process's exit (run_on_ranks ends ranks with os._exit). Destroying it here would
    # leave DDP's reducer the last owner, and its destructor joins gloo's thread while holding the GIL, which
    # that thread may need to release a finished collective's tensors: a deadlock seen in about 1 run in 3.
    return {"params": [p.detach().clone() for p in module.parameters()], "stats": stats}


def _plain_loop(loss_type: str) -> list[torch.Tensor]:
    """The same epochs in one process: one backward of the whole minibatch's loss, written out by hand."""
    module = _uneven_model()
    trainer = TorchTrainer(module, TrainKwargs(lr=0.1))
    experience = _uneven_experience()
    for order in minibatch_order(UNEVEN_ROWS, 2, 11):
        for start in range(0, UNEVEN_ROWS, 5):
            rows = order[start : start + 5]
            errors = (module(experience["x"][rows]).squeeze(-1) - experience["target"][rows]) ** 2
            mask = experience["response_mask"][rows].float()
            if loss_type == "per_token":
                loss = (errors * mask).sum() / mask.sum()
            else:
                loss = sum((errors[i] * mask[i]).sum() / mask[i].sum() for i in range(len(rows))) / len(rows)
            loss.backward()
            trainer.step()
    return [p.detach() for p in module.parameters()]


@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_uneven_shares_of_a_minibatch_train_like_one_process(loss_type):
    """Shares of 3 and 2 rows in micro batches of 1: the second rank runs a third, zero-weighted micro
    step, so that DDP's all-reduces pair up (without it the first rank waits forever), and the
    update equals the whole minibatch's."""
    results = run_on_ranks(_train_uneven, 2, loss_type, 1, timeout_s=120)
    expected = _plain_loop(loss_type)
    for result in results:
        for got, want in zip(result["params"], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # A statistic of every micro batch, weighted by its rows: 1 over the minibatch, summed over the ranks.
    assert results[0]["stats"]["rows"] == pytest.approx(1.0) and results[1]["stats"] == results[0]["stats"]

