"""The PPO loop, written once for one process or many (rlhf_launch/runtime/cluster.py places the roles).

A step (``PPOLoop.ppo_step``) is told in five stages:
  1. generate     the step's rollout, from the source chosen when the loop is built
                  (rlhf_launch/runtime/rollout_sources.py): sampled now, sampled during the step before, or
                  rounds of dynamic sampling (rlhf_launch/runtime/dynamic_sampling.py)
  2. score        actor and reference log-probs, critic values, reward scores: each role on its own shard,
                  gathered back in order on every process (rlhf_launch/runtime/scoring_exchange.py)
  3. experience   advantages and returns (rlhf_launch/runtime/experience.py), and the samples to rollouts.jsonl
  4. train        the critic's update, then the actor's
  5. publish      the actor's new weights to a separate generator, the trainers' statistics to every process
then its metrics, timing included (rlhf_launch/runtime/step_timing.py). The run around the steps (the run
folder's lock, resume, checkpoints, requeue, status) is rlhf_launch/runtime/training_run.py.

All randomness of step k derives from (run.seed, k) and, for sampling, from the global row of each generate
call's first prompt (rlhf_launch/runtime/seed_streams.py): a run resumed at step k continues exactly as the
uninterrupted run, and sharding the generator does not change the responses.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.model_tokenizers import policy_tokenizer_config, tokenizer_key
from rlhf_launch.core.plan import unplanned_roles
from rlhf_launch.runtime.checkpoint import save_checkpoint
from rlhf_launch.runtime.cluster import SingleProcess
from rlhf_launch.runtime.data import PretrainMix, PromptMix, load_tokenizer
from rlhf_launch.runtime.device import pick_device
from rlhf_launch.runtime.dynamic_sampling import DynamicSampling
from rlhf_launch.runtime.experience import ExperienceSettings, RewardMoments, make_experience
from rlhf_launch.runtime.models import quiet_transformers
from rlhf_launch.runtime.protocols import Cluster, Generator
from rlhf_launch.runtime.roles.actor import ActorRole
from rlhf_launch.runtime.roles.critic import CriticRole
from rlhf_launch.runtime.roles.generator import HFGeneratorRole
from rlhf_launch.runtime.roles.reference import ReferenceRole
from rlhf_launch.runtime.roles.reward import RewardRole
from rlhf_launch.runtime.rollout import Batch, SamplingSettings
from rlhf_launch.runtime.rollout_ahead import RolloutAhead
from rlhf_launch.runtime.rollout_log import RolloutLog
from rlhf_launch.runtime.rollout_sources import PlainRollouts, RolloutSampler, RolloutSource, SampledAhead
from rlhf_launch.runtime.scoring_exchange import SCORING, SEQUENTIAL_SCORING_ENV, Scorer
from rlhf_launch.runtime.seed_streams import Stream, step_seed
from rlhf_launch.runtime.step_timing import BUSY_ROLES, role_utilization, section_times
from rlhf_launch.runtime.timing import Timer, busy
from rlhf_launch.runtime.weight_sync import send_weights

AHEAD_FILE = "rollout_ahead.pt"  # in a checkpoint of an asynchronous run: the next step's rollout, already sampled
Stats = dict[str, float]


class PPOLoop:
    """The roles this process runs, and the step that connects them.

    ``step`` is the number of PPO steps done; ``ppo_step()`` runs the next one and advances it,
    and ``load`` sets it from a checkpoint."""

    def __init__(self, spec: JobSpec, run_dir: Path, cluster: Cluster | None = None, device: torch.device | None = None):
        self.spec, self.run_dir = spec, run_dir
        self.cluster: Cluster = cluster or SingleProcess()
        self.device = device or pick_device(spec.run.device)
        quiet_transformers()
        torch.manual_seed(spec.run.seed)
        self.timer = Timer.for_device(self.device)  # synchronises the step, not every micro step (rlhf_launch/runtime/timing.py)
        c = self.cluster
        self.tokenizer = load_tokenizer(policy_tokenizer_config(spec), spec.model_configs.actor.model_path, tokenizer_key(spec, "actor"))
        self.sampling = SamplingSettings.from_spec(spec, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        self.separate_generator = not spec.model_configs.actor.generator_config.shared_with_trainer
        self.prompts = PromptMix(spec.dataset_config) if c.runs("generator") else None
        # PPO-ptx: every actor rank draws the step's whole pretraining batch (cheap) and takes its shares of it.
        ptx = spec.train_config.pretrain_loss_weight > 0 and spec.pretrain_dataset_config is not None
        self.pretrain = PretrainMix(spec.pretrain_dataset_config, self.tokenizer) if ptx and c.runs("actor") else None
        self.actor = ActorRole(spec, self.device, self.sampling, self.timer, c) if c.runs("actor") else None
        self.generator: Generator | None
        if self.separate_generator:
            self.generator = make_generator(spec, self.device, self.sampling) if c.runs("generator") else None
        else:
            self.generator = self.actor
        # The roles the algorithm does not use are not in the plan (rlhf_launch/core/plan.py): neither loaded here, even in
        # one process (SingleProcess runs every role it is asked to), nor asked, trained, saved or exported.
        unused = unplanned_roles(spec)
        self.uses_reference, self.uses_critic = "reference" not in unused, "critic" not in unused
        self.busy_roles = [role for role in BUSY_ROLES if role not in unused]
        self.reference = (ReferenceRole(spec, self.device, self.sampling.temperature)
                          if self.uses_reference and c.runs("reference") else None)
        self.critic = (CriticRole(spec, self.device, self.tokenizer.pad_token_id, self.timer, c)
                       if self.uses_critic and c.runs("critic") else None)
        self.reward = RewardRole(spec, self.device, self.tokenizer) if c.runs("reward") else None
        computes = {
            "actor": self.actor.logprobs if self.actor else None,
            "reference": self.reference.logprobs if self.reference else None,
            "critic": self.critic.values if self.critic else None,
            "reward": self.reward.scores if self.reward else None,
        }
        self.scorer = Scorer(c, computes, self.device, self.timer, overlap=os.environ.get(SEQUENTIAL_SCORING_ENV, "") != "1")
        self.sampler = RolloutSampler(spec, c, self.prompts, self.tokenizer, self.generator, self.device, self.sampling.pad_id, self.timer)
        # rollout_config.max_staleness 1: the generator samples the next step's rollout while this one trains.
        self.ahead = (RolloutAhead(self.sampler.sample, self.sampler.gather, background=c.world_size > 1 and c.runs("generator"),
                                   device=self.device)
                      if spec.rollout_config.max_staleness else None)
        self.rollout_source = self._rollout_source()
        # Without a reference (kl_coeff 0) there is no KL term: the experience has no ref_logprobs; a source that
        # scores its rollouts (dynamic sampling) leaves no reward pass to the score stage.
        needed = {"actor": True, "reference": self.uses_reference, "critic": self.uses_critic,
                  "reward": not self.rollout_source.returns_scores}
        self.scoring_roles = [role for role, _ in SCORING if needed[role]]
        self.moments = RewardMoments()
        self.experience_settings = ExperienceSettings.from_spec(spec)
        # Set by the run (rlhf_launch/runtime/training_run.py) on global rank 0 when rollout_config.write_to_file
        # asks for the samples as text.
        self.rollout_log: RolloutLog | None = None
        self.step = 0
        # Models and libraries leave ~10^5 long-lived objects; freezing them keeps the garbage
        # collector's full passes from scanning them on every step.
        gc.collect()
        gc.freeze()

    def _rollout_source(self) -> RolloutSource:
        """Where each step's rollout comes from, chosen once from the spec."""
        if self.spec.rollout_config.dynamic_sampling:  # rounds of generate and score, each timed in its section
            return DynamicSampling(self.spec, self.sampler, self.scorer, self.timer)
        if self.ahead is not None:
            return SampledAhead(self.ahead, self.timer)
        return PlainRollouts(self.sampler, self.timer)

    # ------------------------------------------------------------------ one step
    def ppo_step(self) -> dict[str, float]:
        """Run PPO step ``self.step + 1`` on this process's roles and return its metrics
        (the same on every process): generate, score, experience, train, publish (the module's docstring)."""
        step = self.step + 1
        actor_trains = step > self.spec.train_config.pretrain_step
        torch.manual_seed(step_seed(self.spec.run.seed, step, Stream.STEP))
        with self.timer("step"):
            # 1. generate: the step's rollout, whole on every process (and its reward scores, where the source scored it)
            rollout, scores, sampling_metrics = self.rollout_source.next(step)
            # 2. score: every scoring pass the step still needs, run where its role lives and gathered in SCORING order
            with self.timer("score"):
                results = self.scorer.score(self.scoring_roles, rollout)
            # 3. experience: advantages and returns from the scores, values and log-probs
            experience, metrics = self._experience(step, rollout, results, results.get("scores", scores))
            # 4. train: the critic's update, then the actor's (from pretrain_step on)
            critic_stats, actor_stats = self._train(step, experience, actor_trains)
            # 5. publish: the new weights to a separate generator, then the trainers' statistics to every process
            self._publish_weights(actor_trains)
            metrics.update(self._shared_stats(critic_stats, actor_stats, actor_trains))
        self.step = step
        metrics.update(self._timing_metrics(sampling_metrics))
        return metrics

    def _experience(self, step: int, rollout: Batch, results: dict[str, Tensor], scores: Tensor | None) -> tuple[Batch, Stats]:
        """The step's experience and its metrics; its samples go to rollouts.jsonl where the run asks for them."""
        experience, metrics = make_experience(self.experience_settings, rollout, results["old_logprobs"],
                                              results.get("ref_logprobs"), results.get("values"), scores, self.moments)
        if self.rollout_log is not None:
            self.rollout_log.write(step, experience)
        return experience, metrics

    def _train(self, step: int, experience: Batch, actor_trains: bool) -> tuple[Stats | None, Stats | None]:
        """The critic's and the actor's updates on this process (each None where it does not run here)."""
        seed, timer = self.spec.run.seed, self.timer
        critic_stats = actor_stats = None
        with timer("train"):
            if self.critic is not None:
                with timer(busy("critic")):
                    critic_stats = self.critic.train(experience, step_seed(seed, step, Stream.CRITIC_ORDER))
            ptx = self.pretrain.batch(step - 1) if self.pretrain is not None and actor_trains else None
            if self.actor is not None and actor_trains:
                with timer(busy("actor")):
                    actor_stats = self.actor.train(experience, step_seed(seed, step, Stream.ACTOR_ORDER), ptx)
        return critic_stats, actor_stats

    def _publish_weights(self, actor_trains: bool) -> None:
        """The actor's new weights into a separate generator, once the rollout sampled ahead (if any) is done:
        it is sampled with the weights from before this update."""
        if self.ahead is not None:
            self.ahead.join(self.timer)
        with self.timer("weight_sync"):
            if self.separate_generator and actor_trains:
                self._sync_weights()

    def _sync_weights(self) -> None:
        """The actor's new weights into the separate generator."""
        c = self.cluster
        if c.world_size == 1:  # both roles in this process: handed over directly
            with torch.no_grad(), self.actor.trainer.gathered():
                self.generator.load(self.actor.model.named_parameters())
            return
        src = c.ranks_of("actor")[0]
        group = c.sync_group()
        if self.actor is not None:
            # Every actor rank walks the layers (under ZeRO-3 each is gathered by all of them in
            # turn, so no rank holds more than one beyond its shard); only the first one sends.
            trainer = self.actor.trainer
            send_weights(list(self.actor.model.named_parameters()), src, group if c.rank == src else None, self.device,
                         trainer.weight_dtype, gather=trainer.gathered)
        elif self.generator is not None:
            self.generator.receive(src, group)

    def _shared_stats(self, critic_stats: Stats | None, actor_stats: Stats | None, actor_trains: bool) -> Stats:
        """The trainers' statistics, from each role's first rank to every process."""
        shared: Stats = {}
        if self.uses_critic:
            shared.update(self.cluster.share(critic_stats, "critic"))
        if actor_trains:
            shared.update(self.cluster.share(actor_stats, "actor"))
        return shared

    def _timing_metrics(self, sampling_metrics: Stats) -> Stats:
        """The step's seconds per section, its roles' utilization and its sampling metrics, with gen_tokens turned
        into gen_tokens_per_s. After the step's clock stopped: the utilization's exchange is monitoring, not part of
        step_time_s."""
        sections = self.timer.pop()
        metrics = section_times(sections)
        metrics.update(role_utilization(self.cluster, self.busy_roles, sections))
        # Asynchronous: the trainers' generate section is only the wait for a rollout sampled during the step before, so
        # the rate is over the generator's own busy seconds (this step's, spent on the next step's rollout).
        seconds = metrics.get(mc.BUSY_S.key("generator"), 0.0) if self.ahead is not None else sections["generate"]
        metrics[mc.GEN_TOKENS_PER_S] = sampling_metrics.pop("gen_tokens") / max(seconds, 1e-9)
        metrics.update(sampling_metrics)
        return metrics

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """A checkpoint of every role at ``self.step``, written by all ranks into one folder that
        global rank 0 completes atomically (rlhf_launch/runtime/checkpoint.py)."""
        # Asynchronous: the next step's rollout, sampled with weights the checkpoint no longer holds, goes into it.
        ahead = self.ahead.for_checkpoint(self.step, self.timer) if self.ahead is not None else None
        if self.cluster.is_leader:
            save_checkpoint(self.run_dir, self.step, lambda tmp: self._write_checkpoint(tmp, ahead))
        else:
            self._write_checkpoint(None, ahead)

    def _write_checkpoint(self, tmp: Path | None, ahead: Batch | None) -> None:
        c = self.cluster
        directory = Path(c.share(str(tmp) if tmp is not None else None, "actor"))
        if self.actor is not None:
            self.actor.trainer.save(directory, "actor", is_writer=c.is_role_leader("actor"))
        if self.critic is not None:
            self.critic.trainer.save(directory, "critic", is_writer=c.is_role_leader("critic"))
        if c.is_leader:
            torch.save({"step": self.step, "reward_moments": asdict(self.moments)}, directory / "loop.pt")
            if ahead is not None:
                torch.save({key: value.cpu() for key, value in ahead.items()}, directory / AHEAD_FILE)
        c.barrier()

    def load(self, checkpoint: Path) -> None:
        """Continue from a checkpoint: every role's state, the step and the reward statistics, and in an
        asynchronous run the next step's rollout, sampled ahead before the checkpoint (rlhf_launch/runtime/rollout_ahead.py)."""
        if self.actor is not None:
            self.actor.trainer.load(checkpoint, "actor")
        if self.critic is not None:
            self.critic.trainer.load(checkpoint, "critic")
        loop = torch.load(checkpoint / "loop.pt", weights_only=False)
        self.step = loop["step"]
        self.moments = RewardMoments(**loop["reward_moments"])
        if self.separate_generator:
            self._sync_weights()
        if self.ahead is not None and (checkpoint / AHEAD_FILE).exists():  # without it, the next rollout is sampled anew
            self.ahead.restore(self.step + 1, torch.load(checkpoint / AHEAD_FILE, weights_only=True))

    def export(self) -> Path:
        """The trained actor and critic as Hugging Face folders under RUN_DIR/final (no final/critic without a critic)."""
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
        from rlhf_launch.runtime.roles.vllm_generator import VLLMGeneratorRole  # imports vLLM: only where it runs

        return VLLMGeneratorRole(spec, device, sampling)
    return HFGeneratorRole(spec, device, sampling)
