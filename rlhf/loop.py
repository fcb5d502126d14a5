"""The PPO loop, written once for one process or many (rlhf/cluster.py places the roles).

Per step: prompts -> generator -> sequences -> actor and reference log-probs, critic values,
reward scores (each role on its own shard, gathered back in order) -> experience
(rlhf/experience.py) -> critic and actor updates -> new weights to a separate generator ->
metrics, and a checkpoint every save_interval steps.

The scoring passes overlap: every rank first runs each scoring pass of the roles it hosts, then
all ranks exchange the results in one fixed order (``score_passes``), so that roles on different
ranks compute at the same time. ``RLHF_SEQUENTIAL_SCORING=1`` in a rank's environment restores
the old order (each pass, then its exchange, role after role); the results are the same, only
slower. It exists for bench/score_phase.py, which measures the difference.

All randomness of step k derives from (run.seed, k) and, for sampling, from the global row of
each generate call's first prompt: a run resumed at step k continues exactly as the
uninterrupted run, and sharding the generator does not change the responses.
"""

from __future__ import annotations

import enum
import gc
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from rlhf import ppo
from rlhf.checkpoint import checkpoint_step, request_requeue, resolve_resume, save_checkpoint, supersede_later
from rlhf.cluster import SingleProcess
from rlhf.core.config import JobSpec
from rlhf.core.model_tokenizers import policy_tokenizer_config, tokenizer_key
from rlhf.core.plan import unplanned_roles
from rlhf.data import PretrainMix, PromptMix, load_tokenizer, render_prompts
from rlhf.exchange import shard_bounds
from rlhf.experience import ExperienceSettings, RewardMoments, make_experience
from rlhf.metrics import MetricsLogger, StepPrinter
from rlhf.models import quiet_transformers
from rlhf.preemption import PreemptionNotice
from rlhf.protocols import Cluster, Generator
from rlhf.roles.actor import ActorRole
from rlhf.roles.critic import CriticRole
from rlhf.roles.generator import HFGeneratorRole
from rlhf.roles.reference import ReferenceRole
from rlhf.roles.reward import RewardRole
from rlhf.rollout import Batch, SamplingSettings
from rlhf.rollout_ahead import RolloutAhead
from rlhf.rollout_log import RolloutLog
from rlhf.timing import Timer
from rlhf.weight_sync import send_weights

ROLLOUT_KEYS = ["prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "gen_logprobs", "prompt_index"]
AHEAD_FILE = "rollout_ahead.pt"  # in a checkpoint of an asynchronous run: the next step's rollout, already sampled
# The scoring passes, (role, result key), in the order their results are exchanged: every rank gathers
# in this order, so it is part of what the ranks agree on.
SCORING = (("actor", "old_logprobs"), ("reference", "ref_logprobs"), ("critic", "values"), ("reward", "scores"))
# Roles whose busy seconds are reported (busy_<role>_s, util_<role>, score_<role>_time_s), in the order of
# the vector the ranks reduce: every rank builds it the same way from the spec.
BUSY_ROLES = ("generator", "actor", "reference", "critic", "reward")
SEQUENTIAL_SCORING_ENV = "RLHF_SEQUENTIAL_SCORING"
# Timer sections reported as <name>_time_s; forward/backward/optimizer are timed inside the trainers.
TIMED_SECTIONS = ("step", "generate", "score", "train", "weight_sync", "forward", "backward", "optimizer")


def pick_device(name: str, env: dict[str, str] | None = None) -> torch.device:
    """The device of this process: ``run.device``, with ``auto`` meaning CUDA when there is one.

    A task may see every GPU of its node (then its local rank picks one) or only its own (Slurm's
    --gpus-per-task or --gpu-bind set CUDA_VISIBLE_DEVICES per task: then it is device 0)."""
    if not (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local >= visible:
        raise RuntimeError(
            f"local rank {local} but this task sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}): more ranks on this node than GPUs"
        )
    return torch.device("cuda", local)


def busy(role: str) -> str:
    """The Timer section of ``role``'s own compute on this rank (generate, its scoring pass, its update)."""
    return f"busy/{role}"


def scoring(role: str) -> str:
    """The Timer section of ``role``'s scoring pass alone (also counted in ``busy(role)``)."""
    return f"score/{role}"


def score_passes(
    cluster: Cluster, passes: list[tuple[str, str, Callable[[Batch], Tensor] | None]], rollout: Batch, device: torch.device,
    timer: Timer, overlap: bool = True,
) -> dict[str, Tensor]:
    """Each ``(role, key, compute)`` pass's whole result, under ``key``, on every process.

    ``compute`` (None where this process does not run the role) runs over this process's shard of the rollout
    on the role's replica leaders. With ``overlap``, every pass this process runs is computed first, one after
    another, and only then are the results gathered, in the order of ``passes``: a gather waits for the role's
    ranks, so a rank that gathered the actor's log-probs before computing its own reference log-probs would
    hold the reference back until the actor is done. Without ``overlap``, each pass is computed and gathered
    in turn (the order before passes overlapped). Both give the same tensors: the same shards, micro batches
    and gathers, only issued at other times."""
    local: dict[str, Batch] = {}

    def run(role: str, key: str, compute: Callable[[Batch], Tensor] | None) -> None:
        if compute is not None and cluster.is_replica_leader(role):
            with timer(busy(role)), timer(scoring(role)):
                local[role] = {key: compute(cluster.shard(role, rollout)).to(device)}

    results: dict[str, Tensor] = {}
    if overlap:
        for role, key, compute in passes:
            run(role, key, compute)
    for role, key, compute in passes:
        if not overlap:
            run(role, key, compute)
        results[key] = cluster.gather(role, local.get(role), [key])[key]
    return results


def role_utilization(cluster: Cluster, roles: list[str], sections: dict[str, float]) -> dict[str, float]:
    """busy_<role>_s, util_<role> and (scoring roles) score_<role>_time_s of a step from this process's Timer ``sections``,
    each the maximum over the role's ranks, on every process: one all-reduce of a short vector.

    A rank's busy seconds of a role are its ``busy(role)`` sections, its utilization those seconds over its own
    step time (so at most 1: the sections lie inside the step); ranks that do not run a role add 0, which
    leaves the maximum to the ranks that do."""
    step = max(sections.get("step", 0.0), 1e-9)
    local = [sections.get(name(role), 0.0) for name in (busy, scoring) for role in roles]
    local += [sections.get(busy(role), 0.0) / step for role in roles]
    top = cluster.max_over_ranks(local)
    n = len(roles)
    scorers = {role for role, _ in SCORING}
    out = {}
    for i, role in enumerate(roles):
        out[f"busy_{role}_s"] = top[i]
        out[f"util_{role}"] = top[2 * n + i]
        if role in scorers:  # a generator has no scoring pass
            out[f"score_{role}_time_s"] = top[n + i]
    return out


class Stream(enum.IntEnum):
    """The independent random streams of one PPO step. Each draws from a seed of its own, so
    that what one consumes never shifts another (and a resumed step draws what it drew)."""

    STEP = 0  # torch's global generator at the start of the step
    CRITIC_ORDER = 1  # minibatch permutations of the critic update
    ACTOR_ORDER = 2  # minibatch permutations of the actor update
    SAMPLING = 3  # one generate call, keyed further by the global row of its first prompt


def step_seed(seed: int, step: int, stream: Stream, row: int = 0) -> int:
    """A 63-bit seed that is a pure function of (run seed, step, stream, row).

    A hash rather than a linear mix of the four: no two (step, row) pairs of any run size
    share a seed."""
    digest = hashlib.blake2b(f"{seed}/{step}/{int(stream)}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def write_status(run_dir: Path, **fields) -> None:
    """Replace RUN_DIR/status.json atomically (``rlhf-launch status`` reads it)."""
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"time": time.time(), **fields}) + "\n")
    tmp.replace(run_dir / "status.json")


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
        self.timer = Timer(torch.cuda.synchronize if self.device.type == "cuda" else None)
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
        # The roles the algorithm does not use are not in the plan (rlhf/core/plan.py): neither loaded here, even in
        # one process (SingleProcess runs every role it is asked to), nor asked, trained, saved or exported.
        unused = unplanned_roles(spec)
        self.uses_reference, self.uses_critic = "reference" not in unused, "critic" not in unused
        self.busy_roles = [role for role in BUSY_ROLES if role not in unused]
        self.overlap_scoring = os.environ.get(SEQUENTIAL_SCORING_ENV, "") != "1"
        self.reference = (ReferenceRole(spec, self.device, self.sampling.temperature)
                          if self.uses_reference and c.runs("reference") else None)
        self.critic = (CriticRole(spec, self.device, self.tokenizer.pad_token_id, self.timer, c)
                       if self.uses_critic and c.runs("critic") else None)
        self.reward = RewardRole(spec, self.device, self.tokenizer) if c.runs("reward") else None
        # rollout_config.max_staleness 1: the generator samples the next step's rollout while this one trains.
        self.ahead = (RolloutAhead(self._sample, self._gather_rollout, background=c.world_size > 1 and c.runs("generator"),
                                   device=self.device)
                      if spec.rollout_config.max_staleness else None)
        self.moments = RewardMoments()
        self.experience_settings = ExperienceSettings.from_spec(spec)
        # Set by run() on global rank 0 when rollout_config.write_to_file asks for the samples as text.
        self.rollout_log: RolloutLog | None = None
        self.step = 0
        # Models and libraries leave ~10^5 long-lived objects; freezing them keeps the garbage
        # collector's full passes from scanning them on every step.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------ one step
    def ppo_step(self) -> dict[str, float]:
        """Run PPO step ``self.step + 1`` on this process's roles and return its metrics
        (the same on every process)."""
        spec, timer, c = self.spec, self.timer, self.cluster
        step = self.step + 1
        seed = spec.run.seed
        torch.manual_seed(step_seed(seed, step, Stream.STEP))
        with timer("step"):
            scores = None
            if spec.rollout_config.dynamic_sampling:  # rounds of generate and score, each timed in its section
                rollout, scores, sampling_metrics = self._dynamic_rollout(step)
            else:
                with timer("generate"):
                    rollout = self.ahead.take(step, timer) if self.ahead is not None else self._rollout(step)
                sampling_metrics = {"gen_tokens": int(rollout["response_mask"].sum())}
            with timer("score"):
                # Without a reference (kl_coeff 0) there is no KL term: the experience has no ref_logprobs; dynamic
                # sampling scored its rounds already.
                skip = {"reference": not self.uses_reference, "critic": not self.uses_critic, "reward": scores is not None}
                results = self._score([role for role, _ in SCORING if not skip.get(role, False)], rollout)
            scores = results.get("scores", scores)
            experience, metrics = make_experience(self.experience_settings, rollout, results["old_logprobs"],
                                                  results.get("ref_logprobs"), results.get("values"), scores, self.moments)
            if self.rollout_log is not None:
                self.rollout_log.write(step, experience)
            actor_trains = step > spec.train_config.pretrain_step
            with timer("train"):
                critic_stats = actor_stats = None
                if self.critic is not None:
                    with timer(busy("critic")):
                        critic_stats = self.critic.train(experience, step_seed(seed, step, Stream.CRITIC_ORDER))
                ptx = self.pretrain.batch(step - 1) if self.pretrain is not None and actor_trains else None
                if self.actor is not None and actor_trains:
                    with timer(busy("actor")):
                        actor_stats = self.actor.train(experience, step_seed(seed, step, Stream.ACTOR_ORDER), ptx)
            if self.ahead is not None:  # the rollout ahead is sampled with the weights from before this update
                self.ahead.join(timer)
            with timer("weight_sync"):
                if self.separate_generator and actor_trains:
                    self._sync_weights()
            if self.uses_critic:
                metrics.update(c.share(critic_stats, "critic"))
            if actor_trains:
                metrics.update(c.share(actor_stats, "actor"))
        self.step = step
        sections = timer.pop()
        metrics.update({f"{name}_time_s": sections.get(name, 0.0) for name in TIMED_SECTIONS})
        # After the step's clock stopped: this exchange is monitoring, not part of step_time_s.
        metrics.update(role_utilization(c, self.busy_roles, sections))
        # Asynchronous: the trainers' generate section is only the wait for a rollout sampled during the step before, so
        # the rate is over the generator's own busy seconds (this step's, spent on the next step's rollout).
        seconds = metrics.get("busy_generator_s", 0.0) if self.ahead is not None else sections["generate"]
        metrics["gen_tokens_per_s"] = sampling_metrics.pop("gen_tokens") / max(seconds, 1e-9)
        metrics.update(sampling_metrics)
        return metrics

    def _dynamic_rollout(self, step: int) -> tuple[Batch, Tensor, dict[str, float]]:
        """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476): rounds of generate + reward until the
        batch holds num_samples_each_epoch informative groups (``ppo.informative_groups`` of the clipped scores,
        the scores the advantages see) or dynamic_sampling_max_draws rounds are done; ``select_groups`` picks
        the batch. Round 0 draws the step's usual prompts, round r >= 1 ``PromptMix.extra_indices(step, r)``,
        and its rows are seeded as global rows r x rollout size + row: all a pure function of (seed, step).

        Every process has each round's whole rollout and scores (gathered), so all make the same choices and
        run the same rounds. Returns the batch, its scores and the metrics filtered_frac (share of the groups
        generated that were dropped), sampling_rounds and dynamic_topped_up (dropped groups put back to fill
        the batch), reward_generated_mean (raw scores of every round's responses, kept or not) with gen_tokens
        (every round's response tokens)."""
        spec, timer = self.spec, self.timer
        ro = spec.rollout_config
        n, wanted = ro.n_samples_per_prompt, spec.dataset_config.num_samples_each_epoch
        rounds: list[tuple[Batch, Tensor]] = []
        flags: list[list[bool]] = []
        for round_ in range(ro.dynamic_sampling_max_draws):
            with timer("generate"):
                rollout = self._rollout(step, round_)
            with timer("score"):
                scores = self._score(["reward"], rollout)["scores"]
            rounds.append((rollout, scores))
            flags.append(ppo.informative_groups(scores.clamp(ro.clip_reward_min, ro.clip_reward_max), n).tolist())
            if sum(map(sum, flags)) >= wanted:
                break
        chosen, topped_up = select_groups(flags, wanted)
        rows = [(r, g * n + i) for r, g in chosen for i in range(n)]
        batch = concat_rows([rollout for rollout, _ in rounds], rows, self.sampling.pad_id)
        scores = torch.stack([rounds[r][1][row] for r, row in rows])
        generated = sum(len(f) for f in flags)
        return batch, scores, {
            "filtered_frac": 1.0 - sum(map(sum, flags)) / generated,
            "reward_generated_mean": float(torch.cat([round_scores for _, round_scores in rounds]).mean()),
            "sampling_rounds": float(len(rounds)),
            "dynamic_topped_up": float(topped_up),
            "gen_tokens": sum(int(rollout["response_mask"].sum()) for rollout, _ in rounds),
        }

    def _rollout(self, step: int, round_: int = 0) -> Batch:
        """Step ``step``'s prompts and sampled responses, whole, on every process; with dynamic sampling,
        those of its round ``round_`` (``_dynamic_rollout``)."""
        return self._gather_rollout(self._sample(step, self.timer, round_))

    def _gather_rollout(self, local: Batch | None) -> Batch:
        """The generator replica leaders' shards (``_sample``), whole, on every process."""
        return self.cluster.gather("generator", local, ROLLOUT_KEYS, pad={"response_ids": self.sampling.pad_id})

    def _sample(self, step: int, timer: Timer, round_: int = 0) -> Batch | None:
        """This generator replica's shard of step ``step``'s (round ``round_``'s) rollout on its leader, None on
        every other process; the sampling is timed in ``timer``'s busy(generator) section."""
        spec, c = self.spec, self.cluster
        local = None
        if c.runs("generator"):  # every rank of an engine takes part; its replica leader reports
            # n_samples_per_prompt: each drawn prompt as n contiguous rows, one group; every row is seeded by its own
            # global row (below), so the n responses differ and do not depend on how the rows are sharded.
            n = spec.rollout_config.n_samples_per_prompt
            drawn = (self.prompts.indices(step - 1) if round_ == 0
                     else self.prompts.extra_indices(step - 1, round_, spec.rollout_config.dynamic_sampling_max_draws))
            picks = [pick for pick in drawn for _ in range(n)]
            messages = [self.prompts.policy_prompt(source, index) for source, index in picks]
            # The tokenizer carries the policy's chat_template override (load_tokenizer).
            encoded = render_prompts(self.tokenizer, messages, spec.dataset_config.max_seq_len)
            index, parts = c.shard_of("generator")
            start, stop = shard_bounds(len(messages), parts, index)
            prompts = {
                "prompt_ids": encoded["input_ids"][start:stop].to(self.device),
                "prompt_mask": encoded["attention_mask"][start:stop].to(self.device),
            }
            # A further round's rows are seeded past the first round's, so that its responses are new draws.
            first = round_ * len(messages) + start
            with timer(busy("generator")):
                local = self.generator.generate(prompts, first, lambda row: step_seed(spec.run.seed, step, Stream.SAMPLING, row))
            # (source, record) of each row: a role that needs the prompt's messages rebuilds them from its own copy of the data.
            local["prompt_index"] = torch.tensor(picks[start:stop], dtype=torch.long, device=self.device).view(-1, 2)
            local = local if c.is_replica_leader("generator") else None
        return local

    def _score(self, roles: list[str], rollout: Batch) -> dict[str, Tensor]:
        """The scoring passes of ``roles`` (in ``SCORING`` order) over the rollout, whole, on every process, by
        result key; this process computes the shards of the roles it runs (``score_passes``)."""
        computes = {
            "actor": self.actor.logprobs if self.actor else None,
            "reference": self.reference.logprobs if self.reference else None,
            "critic": self.critic.values if self.critic else None,
            "reward": self.reward.scores if self.reward else None,
        }
        passes = [(role, key, computes[role]) for role, key in SCORING if role in roles]
        return score_passes(self.cluster, passes, rollout, self.device, self.timer, self.overlap_scoring)

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

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """A checkpoint of every role at ``self.step``, written by all ranks into one folder that
        global rank 0 completes atomically (rlhf/checkpoint.py)."""
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
        asynchronous run the next step's rollout, sampled ahead before the checkpoint (rlhf/rollout_ahead.py)."""
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


def select_groups(informative: list[list[bool]], wanted: int) -> tuple[list[tuple[int, int]], int]:
    """The (round, group) pairs of a dynamic-sampling batch of ``wanted`` groups, and how many of them were
    dropped ones, from each round's ``informative`` flags per group.

    The informative groups in the order they were generated (round, then group), the first ``wanted`` of them;
    when there are fewer, the batch is topped up with dropped groups in the same order (deterministic, and the
    earliest: a resumed run picks the same)."""
    order = [(r, g) for r, flags in enumerate(informative) for g in range(len(flags))]
    kept = [(r, g) for r, g in order if informative[r][g]][:wanted]
    topped_up = [(r, g) for r, g in order if not informative[r][g]][: wanted - len(kept)]
    return kept + topped_up, len(topped_up)


def concat_rows(batches: list[Batch], rows: list[tuple[int, int]], pad_id: int) -> Batch:
    """The rows ``(batch index, row)`` of rollouts of different widths as one rollout: prompts left-padded and
    responses right-padded (pad_id, mask 0) to the widest; positions follow the masks, so no row's numbers change."""
    prompt_width = max(b["prompt_ids"].shape[1] for b in batches)
    response_width = max(b["response_ids"].shape[1] for b in batches)
    padded = []
    for b in batches:
        left, right = prompt_width - b["prompt_ids"].shape[1], response_width - b["response_ids"].shape[1]
        padded.append({
            **b,
            "prompt_ids": torch.nn.functional.pad(b["prompt_ids"], (left, 0), value=pad_id),
            "prompt_mask": torch.nn.functional.pad(b["prompt_mask"], (left, 0), value=0),
            "response_ids": torch.nn.functional.pad(b["response_ids"], (0, right), value=pad_id),
            "response_mask": torch.nn.functional.pad(b["response_mask"], (0, right), value=0),
            **({"gen_logprobs": torch.nn.functional.pad(b["gen_logprobs"], (0, right), value=0.0)} if "gen_logprobs" in b else {}),
        })
    return {key: torch.stack([padded[i][key][row] for i, row in rows]) for key in padded[0]}


def make_generator(spec: JobSpec, device: torch.device, sampling: SamplingSettings):
    """The engine of a separate generator group."""
    if spec.model_configs.actor.generator_config.generator_type == "vllm":
        from rlhf.roles.vllm_generator import VLLMGeneratorRole  # imports vLLM: only where it runs

        return VLLMGeneratorRole(spec, device, sampling)
    return HFGeneratorRole(spec, device, sampling)


class Reporter:
    """What global rank 0 writes as the run goes: status.json, metrics.jsonl and TensorBoard,
    the progress line, and with a ``tokenizer`` (rollout_config.write_to_file) rollouts.jsonl, whose
    log ``rollouts`` the loop writes each step's samples to. Other ranks get ``Reporter(None, ...)``,
    which writes nothing."""

    def __init__(self, run_dir: Path | None, total: int, start_step: int, quiet: bool, tokenizer=None):
        self.run_dir, self.total = run_dir, total
        self.printer = StepPrinter(total, start_step=start_step) if run_dir is not None and not quiet else None
        self.logger = MetricsLogger(run_dir, resume_step=start_step) if run_dir is not None else None
        self.rollouts = RolloutLog(run_dir, tokenizer, resume_step=start_step) if run_dir is not None and tokenizer is not None else None
        self.history: list[dict] = []

    def status(self, state: str, step: int, **extra) -> None:
        """Replace status.json: the run's state at ``step`` of the total (and any ``extra`` fields)."""
        if self.run_dir is not None:
            write_status(self.run_dir, state=state, step=step, max_train_step=self.total, **extra)

    def step_done(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of a finished step: metrics.jsonl, TensorBoard, the progress line."""
        if self.logger is not None:
            self.history.append(self.logger.log(step, metrics))
        if self.printer is not None:
            self.printer.update(step, metrics)

    def close(self) -> None:
        """Flush and close the metrics file, TensorBoard, the rollouts file and the progress line."""
        for sink in (self.printer, self.logger, self.rollouts):
            if sink is not None:
                sink.close()


def _due_for_checkpoint(spec: JobSpec, step: int) -> bool:
    interval = spec.train_config.save_interval
    return bool(interval and step % interval == 0) or step == spec.train_config.max_train_step


def _resume_point(run_dir: Path, resume: str | None, cluster: Cluster) -> Path | None:
    """The checkpoint to continue from, chosen by global rank 0 and told to every rank."""
    checkpoint = cluster.share(resolve_resume(run_dir, resume) if cluster.is_leader else None, "actor")
    if checkpoint is not None and cluster.is_leader:
        print(f"rlhf: resuming from {checkpoint} (step {checkpoint_step(checkpoint)})", file=sys.stderr, flush=True)
    return Path(checkpoint) if checkpoint is not None else None


def run(
    spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False,
    cluster: Cluster | None = None, device: torch.device | None = None, notice: PreemptionNotice | None = None,
) -> list[dict]:
    """Train to train_config.max_train_step; returns (on global rank 0) the metrics of the steps run here.

    With a PreemptionNotice that fires, the run stops after the current step with a checkpoint
    and a requeue request (rlhf/preemption.py).

    Global rank 0 holds the run folder's lock for the whole run (rlhf/run_lock.py: a second run in
    the folder raises RunLocked) and appends this start to RUN_DIR/provenance.json before the first step."""
    # Imported here: both are torch-free helpers of rank 0 only.
    from rlhf import provenance
    from rlhf.core import yaml_io
    from rlhf.run_lock import RunLock

    cluster = cluster or SingleProcess()
    leader = cluster.is_leader
    lock = None
    if leader:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(run_dir)
        if lock.taken_over is not None:
            print(
                f"rlhf: took over the lock of {run_dir} from the run of {lock.taken_over.describe()}, which is gone",
                file=sys.stderr,
                flush=True,
            )
        if lock.unsupported:
            print(f"rlhf: cannot lock {run_dir} ({lock.unsupported}); nothing keeps a second run out of it", file=sys.stderr, flush=True)
    try:
        checkpoint = _resume_point(run_dir, resume, cluster)
        if leader:
            start_step = checkpoint_step(checkpoint) if checkpoint is not None else 0
            record = provenance.collect(
                run_dir / "spec.yaml",
                yaml_io.dump(spec.to_dict()),
                start_step,
                str(checkpoint) if checkpoint else None,
            )
            provenance.append_record(run_dir, record)
        loop = PPOLoop(spec, run_dir, cluster, device)
        if checkpoint is not None:
            loop.load(checkpoint)
            if leader:
                for path in supersede_later(run_dir, loop.step):
                    print(f"rlhf: resuming from step {loop.step}; set aside the later checkpoint {path.name}", file=sys.stderr)
        total = spec.train_config.max_train_step
        report = Reporter(run_dir if leader else None, total, loop.step, quiet,
                          tokenizer=loop.tokenizer if spec.rollout_config.write_to_file else None)
        loop.rollout_log = report.rollouts
        try:
            report.status("running", loop.step)
            while loop.step < total:
                report.step_done(loop.step + 1, loop.ppo_step())
                saved = _due_for_checkpoint(spec, loop.step)
                if saved:
                    loop.save()
                if notice is not None and loop.step < total and cluster.any(notice.requested):
                    _stop_for_requeue(loop, saved, report)
                    return report.history
                report.status("running", loop.step)
            loop.export()
        except BaseException as exc:
            report.status("failed", loop.step, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            report.close()
        report.status("completed", loop.step)
        return report.history
    finally:
        if lock is not None:
            lock.release()


def _stop_for_requeue(loop: PPOLoop, saved: bool, report: Reporter) -> None:
    """A preemption notice reached some rank: every rank checkpoints this step, and rank 0
    asks the job to requeue itself (the sbatch script acts on that)."""
    if not saved:
        loop.save()
    if loop.cluster.is_leader:
        request_requeue(loop.run_dir)
    report.status("preempted", loop.step)


def run_local(spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False) -> list[dict]:
    """Every role in this one process."""
    return run(spec, run_dir, resume, quiet)
