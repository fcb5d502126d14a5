"""The PPO loop on one machine: every role in this process.

Per step: prompts -> generate -> log-probs (actor, reference), values, scores -> experience
(rlhf/experience.py) -> critic and actor updates -> metrics, and a checkpoint every
save_interval steps. All randomness of step k derives from (run.seed, k), so a run resumed
from the checkpoint of step k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf.checkpoint import resolve_resume, save_checkpoint, supersede_later
from rlhf.config import JobSpec
from rlhf.data import PromptMix, load_tokenizer, render_prompts
from rlhf.experience import RewardMoments, make_experience
from rlhf.metrics import MetricsLogger, StepPrinter
from rlhf.models import quiet_transformers
from rlhf.roles.actor import ActorRole
from rlhf.roles.critic import CriticRole
from rlhf.roles.reference import ReferenceRole
from rlhf.roles.reward import RewardRole
from rlhf.rollout import SamplingSettings
from rlhf.timing import Timer


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 9_176 + salt) % (2**63)


def write_status(run_dir: Path, **fields) -> None:
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"time": time.time(), **fields}) + "\n")
    tmp.replace(run_dir / "status.json")


class LocalPPO:
    """All five roles in this process, wired by tensors only."""

    def __init__(self, spec: JobSpec, run_dir: Path):
        self.spec, self.run_dir = spec, run_dir
        self.device = pick_device(spec.run.device)
        quiet_transformers()
        torch.manual_seed(spec.run.seed)
        self.timer = Timer()
        self.tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
        self.sampling = SamplingSettings.from_spec(spec, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        self.prompts = PromptMix(spec.dataset_config)
        self.actor = ActorRole(spec, self.device, self.sampling, self.timer)
        self.reference = ReferenceRole(spec, self.device, self.sampling.temperature)
        self.critic = CriticRole(spec, self.device, self.tokenizer.pad_token_id, self.timer)
        self.reward = RewardRole(spec, self.device, self.tokenizer)
        self.moments = RewardMoments()
        self.step = 0
        # Models and libraries leave ~10^5 long-lived objects; freezing them keeps the garbage
        # collector's full passes from scanning them on every step.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------ one step
    def ppo_step(self, step: int) -> dict[str, float]:
        spec, timer = self.spec, self.timer
        started = time.perf_counter()
        torch.manual_seed(step_seed(spec.run.seed, step))
        messages = self.prompts.batch(step - 1)
        encoded = render_prompts(self.tokenizer, messages, spec.dataset_config.max_seq_len, spec.tokenizer_config.chat_template)
        prompts = {"prompt_ids": encoded["input_ids"].to(self.device), "prompt_mask": encoded["attention_mask"].to(self.device)}
        with timer("generate"):
            rollout = self.actor.generate(prompts)
        with timer("score"):
            old_logprobs = self.actor.logprobs(rollout)
            ref_logprobs = self.reference.logprobs(rollout)
            values = self.critic.values(rollout)
            scores = self.reward.scores(rollout)
        experience, metrics = make_experience(spec, rollout, old_logprobs, ref_logprobs, values, scores, self.moments)
        train_started = time.perf_counter()
        metrics.update(self.critic.train(experience, step_seed(spec.run.seed, step, 1)))
        if step > spec.train_config.pretrain_step:
            metrics.update(self.actor.train(experience, step_seed(spec.run.seed, step, 2)))
        train_time = time.perf_counter() - train_started
        sections = timer.pop()
        step_time = time.perf_counter() - started
        generated = int(rollout["response_mask"].sum())
        metrics.update(
            step_time_s=step_time,
            generate_time_s=sections.get("generate", 0.0),
            score_time_s=sections.get("score", 0.0),
            train_time_s=train_time,
            forward_time_s=sections.get("forward", 0.0),
            backward_time_s=sections.get("backward", 0.0),
            optimizer_time_s=sections.get("optimizer", 0.0),
            gen_tokens_per_s=generated / max(sections.get("generate", 0.0), 1e-9),
        )
        return metrics

    # ------------------------------------------------------------------ state
    def save(self, step: int) -> Path:
        def write(directory: Path) -> None:
            torch.save(self.actor.state_dict(), directory / "actor.pt")
            torch.save(self.critic.state_dict(), directory / "critic.pt")
            torch.save({"step": step, "reward_moments": asdict(self.moments)}, directory / "loop.pt")

        return save_checkpoint(self.run_dir, step, write)

    def load(self, checkpoint: Path) -> None:
        self.actor.load_state_dict(torch.load(checkpoint / "actor.pt", map_location=self.device, weights_only=False))
        self.critic.load_state_dict(torch.load(checkpoint / "critic.pt", map_location=self.device, weights_only=False))
        loop = torch.load(checkpoint / "loop.pt", weights_only=False)
        self.step = loop["step"]
        self.moments = RewardMoments(**loop["reward_moments"])

    def export(self) -> Path:
        final = self.run_dir / "final"
        self.actor.save_pretrained(final / "actor", self.tokenizer)
        self.critic.save_pretrained(final / "critic", self.tokenizer)
        return final


def run_local(spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False) -> list[dict]:
    """Train to train_config.max_train_step; returns the metrics of the steps run here."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resolve_resume(run_dir, resume)
    engine = LocalPPO(spec, run_dir)
    if checkpoint is not None:
        engine.load(checkpoint)
        for path in supersede_later(run_dir, engine.step):
            print(f"rlhf: resuming from step {engine.step}; set aside the later checkpoint {path.name}")
    total = spec.train_config.max_train_step
    write_status(run_dir, state="running", step=engine.step, max_train_step=total, pid=os.getpid())
    history = []
    printer = StepPrinter(total, start_step=engine.step) if not quiet else None
    try:
        with MetricsLogger(run_dir, resume_step=engine.step) as logger:
            for step in range(engine.step + 1, total + 1):
                metrics = engine.ppo_step(step)
                engine.step = step
                history.append(logger.log(step, metrics))
                if printer:
                    printer.update(step, metrics)
                interval = spec.train_config.save_interval
                if (interval and step % interval == 0) or step == total:
                    engine.save(step)
                write_status(run_dir, state="running", step=step, max_train_step=total, pid=os.getpid())
        engine.export()
    except BaseException as exc:
        write_status(run_dir, state="failed", step=engine.step, max_train_step=total, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if printer:
            printer.close()
    write_status(run_dir, state="completed", step=engine.step, max_train_step=total)
    return history
