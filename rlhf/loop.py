"""The PPO loop, written once for one process or many (rlhf/cluster.py places the roles).

Per step: prompts -> generator -> sequences -> actor and reference log-probs, critic values,
reward scores (each role on its own shard, gathered back in order) -> experience
(rlhf/experience.py) -> critic and actor updates -> new weights to a separate generator ->
metrics, and a checkpoint every save_interval steps.

All randomness of step k derives from (run.seed, k) and, for sampling, from the global row of
each generate call's first prompt: a run resumed at step k continues exactly as the
uninterrupted run, and sharding the generator does not change the responses.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf.checkpoint import request_requeue, resolve_resume, save_checkpoint, supersede_later
from rlhf.cluster import SingleProcess
from rlhf.config import JobSpec
from rlhf.data import PromptMix, load_tokenizer, render_prompts
from rlhf.exchange import shard_bounds
from rlhf.experience import RewardMoments, make_experience
from rlhf.metrics import MetricsLogger, StepPrinter
from rlhf.models import quiet_transformers
from rlhf.roles.actor import ActorRole
from rlhf.roles.critic import CriticRole
from rlhf.roles.generator import HFGeneratorRole
from rlhf.roles.reference import ReferenceRole
from rlhf.roles.reward import RewardRole
from rlhf.rollout import SamplingSettings
from rlhf.timing import Timer
from rlhf.weight_sync import send_weights

ROLLOUT_KEYS = ["prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished"]


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
    return torch.device("cpu")


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 9_176 + salt * 7_919) % (2**63)


def write_status(run_dir: Path, **fields) -> None:
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"time": time.time(), **fields}) + "\n")
    tmp.replace(run_dir / "status.json")


class PPOLoop:
    """The roles this process runs, and the step that connects them."""

    def __init__(self, spec: JobSpec, run_dir: Path, cluster=None, device: torch.device | None = None):
        self.spec, self.run_dir = spec, run_dir
        self.cluster = cluster or SingleProcess()
        self.device = device or pick_device(spec.run.device)
        quiet_transformers()
        torch.manual_seed(spec.run.seed)
        self.timer = Timer()
        c = self.cluster
        self.tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
        self.sampling = SamplingSettings.from_spec(spec, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        self.separate_generator = not spec.model_configs.actor.generator_config.shared_with_trainer
        self.prompts = PromptMix(spec.dataset_config) if c.runs("generator") else None
        self.actor = ActorRole(spec, self.device, self.sampling, self.timer, c) if c.runs("actor") else None
        if self.separate_generator:
            self.generator = make_generator(spec, self.device, self.sampling) if c.runs("generator") else None
        else:
            self.generator = self.actor
        self.reference = ReferenceRole(spec, self.device, self.sampling.temperature) if c.runs("reference") else None
        self.critic = CriticRole(spec, self.device, self.tokenizer.pad_token_id, self.timer, c) if c.runs("critic") else None
        self.reward = RewardRole(spec, self.device, self.tokenizer) if c.runs("reward") else None
        self.moments = RewardMoments()
        self.step = 0
        # Models and libraries leave ~10^5 long-lived objects; freezing them keeps the garbage
        # collector's full passes from scanning them on every step.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------ one step
    def _rollout(self, step: int):
        spec, c = self.spec, self.cluster
        local = None
        if c.runs("generator"):  # every rank of an engine takes part; its replica leader reports
            messages = self.prompts.batch(step - 1)
            encoded = render_prompts(self.tokenizer, messages, spec.dataset_config.max_seq_len, spec.tokenizer_config.chat_template)
            index, parts = c.shard_of("generator")
            start, stop = shard_bounds(len(messages), parts, index)
            prompts = {"prompt_ids": encoded["input_ids"][start:stop].to(self.device), "prompt_mask": encoded["attention_mask"][start:stop].to(self.device)}
            local = self.generator.generate(prompts, start, lambda row: step_seed(spec.run.seed, step, 1000 + row))
            local = local if c.is_replica_leader("generator") else None
        return c.gather("generator", local, ROLLOUT_KEYS, pad={"response_ids": self.sampling.pad_id})

    def _from_role(self, role: str, runner, fn, rollout, key: str):
        c = self.cluster
        local = {key: fn(c.shard(role, rollout))} if runner is not None and c.is_replica_leader(role) else None
        return c.gather(role, local, [key])[key]

    def ppo_step(self, step: int) -> dict[str, float]:
        spec, timer, c = self.spec, self.timer, self.cluster
        started = time.perf_counter()
        torch.manual_seed(step_seed(spec.run.seed, step))
        phase = {}
        t = time.perf_counter()
        rollout = self._rollout(step)
        phase["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        old_logprobs = self._from_role("actor", self.actor, lambda b: self.actor.logprobs(b), rollout, "old_logprobs")
        ref_logprobs = self._from_role("reference", self.reference, lambda b: self.reference.logprobs(b), rollout, "ref_logprobs")
        values = self._from_role("critic", self.critic, lambda b: self.critic.values(b), rollout, "values")
        scores = self._from_role("reward", self.reward, lambda b: self.reward.scores(b).to(self.device), rollout, "scores")
        phase["score"] = time.perf_counter() - t
        experience, metrics = make_experience(spec, rollout, old_logprobs, ref_logprobs, values, scores, self.moments)
        t = time.perf_counter()
        critic_stats = self.critic.train(experience, step_seed(spec.run.seed, step, 1)) if self.critic else None
        actor_trains = step > spec.train_config.pretrain_step
        actor_stats = self.actor.train(experience, step_seed(spec.run.seed, step, 2)) if self.actor and actor_trains else None
        phase["train"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.separate_generator and actor_trains:
            self._sync_weights()
        phase["sync"] = time.perf_counter() - t
        metrics.update(c.share(critic_stats, "critic"))
        if actor_trains:
            metrics.update(c.share(actor_stats, "actor"))
        sections = timer.pop()
        generated = int(rollout["response_mask"].sum())
        metrics.update(
            step_time_s=time.perf_counter() - started,
            generate_time_s=phase["generate"],
            score_time_s=phase["score"],
            train_time_s=phase["train"],
            weight_sync_time_s=phase["sync"],
            forward_time_s=sections.get("forward", 0.0),
            backward_time_s=sections.get("backward", 0.0),
            optimizer_time_s=sections.get("optimizer", 0.0),
            gen_tokens_per_s=generated / max(phase["generate"], 1e-9),
        )
        return metrics

    def _sync_weights(self) -> None:
        c = self.cluster
        if c.world_size == 1:  # both roles in this process: handed over directly
            with torch.no_grad(), self.actor.trainer.gathered():
                self.generator.load(self.actor.model.named_parameters())
            return
        src = c.ranks_of("actor")[0]
        group = c.sync_group()
        if self.actor is not None:
            with self.actor.trainer.gathered():
                if c.rank == src:
                    send_weights(list(self.actor.model.named_parameters()), src, group, self.device)
        elif self.generator is not None:
            self.generator.receive(src, group)

    # ------------------------------------------------------------------ state
    def save(self, step: int) -> None:
        """A checkpoint of every role, written by all ranks into one folder that global rank 0
        completes atomically (rlhf/checkpoint.py)."""
        if self.cluster.is_leader:
            save_checkpoint(self.run_dir, step, self._write_checkpoint)
        else:
            self._write_checkpoint(None)

    def _write_checkpoint(self, tmp: Path | None) -> None:
        c = self.cluster
        directory = Path(c.share(str(tmp) if tmp is not None else None, "actor"))
        if self.actor is not None:
            self.actor.trainer.save(directory, "actor", is_writer=c.is_role_leader("actor"))
        if self.critic is not None:
            self.critic.trainer.save(directory, "critic", is_writer=c.is_role_leader("critic"))
        if c.is_leader:
            torch.save({"step": self.step, "reward_moments": asdict(self.moments)}, directory / "loop.pt")
        c.barrier()

    def load(self, checkpoint: Path) -> None:
        if self.actor is not None:
            self.actor.trainer.load(checkpoint, "actor")
        if self.critic is not None:
            self.critic.trainer.load(checkpoint, "critic")
        loop = torch.load(checkpoint / "loop.pt", weights_only=False)
        self.step = loop["step"]
        self.moments = RewardMoments(**loop["reward_moments"])
        if self.separate_generator:
            self._sync_weights()

    def export(self) -> Path:
        final, c = self.run_dir / "final", self.cluster
        if self.actor is not None:
            self.actor.save_pretrained(final / "actor", self.tokenizer, is_writer=c.is_role_leader("actor"))
        if self.critic is not None:
            self.critic.save_pretrained(final / "critic", self.tokenizer, is_writer=c.is_role_leader("critic"))
        c.barrier()
        return final


def make_generator(spec: JobSpec, device: torch.device, sampling: SamplingSettings):
    """The engine of a separate generator group."""
    if spec.model_configs.actor.generator_config.generator_type == "vllm":
        from rlhf.roles.vllm_generator import VLLMGeneratorRole  # imports vLLM: only where it runs

        return VLLMGeneratorRole(spec, device, sampling)
    return HFGeneratorRole(spec, device, sampling)


def run(spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False, cluster=None, device=None, notice=None) -> list[dict]:
    """Train to train_config.max_train_step; returns (on global rank 0) the metrics of the steps run here.

    With a PreemptionNotice that fires, the run stops after the current step with a checkpoint
    and a requeue request (rlhf/preemption.py)."""
    cluster = cluster or SingleProcess()
    leader = cluster.is_leader
    if leader:
        run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cluster.share(resolve_resume(run_dir, resume) if leader else None, "actor")
    loop = PPOLoop(spec, run_dir, cluster, device)
    if checkpoint is not None:
        loop.load(Path(checkpoint))
        if leader:
            for path in supersede_later(run_dir, loop.step):
                print(f"rlhf: resuming from step {loop.step}; set aside the later checkpoint {path.name}")
    total = spec.train_config.max_train_step
    history: list[dict] = []
    printer = StepPrinter(total, start_step=loop.step) if leader and not quiet else None
    logger = MetricsLogger(run_dir, resume_step=loop.step) if leader else None
    try:
        if leader:
            write_status(run_dir, state="running", step=loop.step, max_train_step=total)
        for step in range(loop.step + 1, total + 1):
            metrics = loop.ppo_step(step)
            loop.step = step
            if leader:
                history.append(logger.log(step, metrics))
                if printer:
                    printer.update(step, metrics)
            interval = spec.train_config.save_interval
            saved = (interval and step % interval == 0) or step == total
            if saved:
                loop.save(step)
            if notice is not None and step < total and cluster.any(notice.requested):
                if not saved:
                    loop.save(step)
                if leader:
                    request_requeue(run_dir)
                    write_status(run_dir, state="preempted", step=step, max_train_step=total)
                return history
            if leader:
                write_status(run_dir, state="running", step=step, max_train_step=total)
        loop.export()
    except BaseException as exc:
        if leader:
            write_status(run_dir, state="failed", step=loop.step, max_train_step=total, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if printer:
            printer.close()
        if logger:
            logger.close()
    if leader:
        write_status(run_dir, state="completed", step=loop.step, max_train_step=total)
    return history


def run_local(spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False) -> list[dict]:
    """Every role in this one process."""
    return run(spec, run_dir, resume, quiet)
