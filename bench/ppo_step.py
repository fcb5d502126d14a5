"""Speed of one PPO step: our PPOLoop against TRL 1.12.0's PPOTrainer, on the tiny CPU model.

    .venv/bin/python bench/ppo_step.py            # full run (20 timed steps each, ~2 min on 2 cores)
    .venv/bin/python bench/ppo_step.py --quick    # smoke run (3 timed steps each)
    .venv/bin/python bench/ppo_step.py --steps 50 --warmup 5

Everything runs in this one process, one system after the other, with the same torch thread count:

1. ours: ``PPOLoop.ppo_step`` on specs/tiny_cpu.yaml with the overrides in ``OUR_OVERRIDES`` (rollout
   of 8 prompts, 32 response tokens each, 4 PPO epochs of one minibatch of 8, TRL's kl_coef);
   per-step split from the engine's own timer (generate / score = every rollout inference forward /
   train forward / backward / optimizer) and the orchestration overhead = step - all of those.
2. TRL 1.12.0 ``trl.experimental.ppo.PPOTrainer`` on the same model files and prompt file; per-update
   time = the interval between consecutive ``on_step_end`` callbacks (so model loading, trainer
   construction and dataloader start-up are excluded), warm-up updates dropped. Once as shipped
   (TRL calls gc.collect() twice per update) and once with gc.collect(); gc.freeze() before train().

Response length: TRL's default ``stop_token=None`` generates exactly ``response_length`` tokens per
response; ours gets the same with ``min_new_tokens = max_new_tokens = 32`` (end-of-sequence cannot be
sampled before 32 tokens), so both systems process [8, P + 32] sequences in every forward.

3. ours, GRPO: the same step with ``GRPO_OVERRIDES`` on top: the same 8 sequences per rollout as 2 prompts x
   ``n_samples_per_prompt`` 4, ``advantage_estimator: grpo`` (no critic forward, no critic update), the KL as a k3
   term in the actor's loss (same kl_coef), clip-higher 0.28; printed next to our PPO step's split. Skip it with
   ``--no-grpo``. (Until the planner drops the unused critic, the GRPO job still loads one; it is never run.)

TRL is imported lazily (only for phase 2); install it with
    .venv/bin/pip install -c .ci/constraints-cpu.txt trl==1.12.0
This file lives in bench/, outside pytest's testpaths: it is a manual benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "ACCELERATE_USE_CPU": "true",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}.items():
    os.environ.setdefault(_key, _value)

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecation notes from TRL's config

SPEC = REPO / "specs" / "tiny_cpu.yaml"
TRL_VERSION = "1.12.0"
TRL_HINT = f".venv/bin/pip install -c .ci/constraints-cpu.txt trl=={TRL_VERSION}"
TARGET_OVERHEAD_PCT = 5.0
TARGET_RATIO = 0.6

# The shared setup, in the words of both systems.
BATCH = 8  # prompts per rollout = one minibatch = one micro batch
RESPONSE_LEN = 32
PPO_EPOCHS = 4
LR = 1.0e-3  # the tiny spec's lr, for actor and critic (TRL: one AdamW over policy + value)
KL_COEF = 0.05  # TRL's default kl_coef
TEMPERATURE = 1.0

OUR_OVERRIDES = [
    f"dataset_config.num_samples_each_epoch={BATCH}",
    f"rollout_config.actor_micro_bs={BATCH}",
    f"rollout_config.reward_micro_bs={BATCH}",
    f"rollout_config.max_new_tokens={RESPONSE_LEN}",
    f"rollout_config.generate_kwargs.min_new_tokens={RESPONSE_LEN}",
    f"rollout_config.generate_kwargs.temperature={TEMPERATURE}",
    f"repeater_config.actor_micro_bs={BATCH}",
    f"repeater_config.ref_micro_bs={BATCH}",
    f"repeater_config.critic_micro_bs={BATCH}",
    f"repeater_config.kl_coeff={KL_COEF}",
    "repeater_config.gamma=1.0",
    "repeater_config.gae_lambda=0.95",
    "repeater_config.norm_adv=true",
    f"train_config.ppo_minibatch={BATCH}",
    f"train_config.value_minibatch={BATCH}",
    f"train_config.actor_micro_bs={BATCH}",
    f"train_config.critic_micro_bs={BATCH}",
    f"train_config.ppo_epochs={PPO_EPOCHS}",
    "train_config.policy_clip=0.2",
    "train_config.value_clip=0.2",
    "train_config.pretrain_step=0",
    "train_config.max_train_step=100000",
    f"model_configs.actor.trainer_config.train_kwargs.lr={LR}",
    f"model_configs.critic.trainer_config.train_kwargs.lr={LR}",
    # TRL's PPO loop never clips gradients (it does not call clip_grad_norm_): do the same work.
    "model_configs.actor.trainer_config.train_kwargs.max_grad_norm=null",
    "model_configs.critic.trainer_config.train_kwargs.max_grad_norm=null",
]

# GRPO on the same sequences: BATCH rows = BATCH / GRPO_N prompts x GRPO_N samples, one group each.
GRPO_N = 4
GRPO_OVERRIDES = [o for o in OUR_OVERRIDES if not o.startswith("dataset_config.num_samples_each_epoch=")] + [
    f"dataset_config.num_samples_each_epoch={BATCH // GRPO_N}",
    f"rollout_config.n_samples_per_prompt={GRPO_N}",
    "repeater_config.advantage_estimator=grpo",
    "repeater_config.kl_in=loss",
    "repeater_config.kl_estimator=k3",
    "train_config.policy_clip_high=0.28",
]

SECTIONS = ("generate", "score", "forward", "backward", "optimizer")


# ------------------------------------------------------------------------------------------ helpers
def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_trl() -> str | None:
    """None when TRL's PPO can be imported later, else the reason (without importing trl now)."""
    if importlib.util.find_spec("trl") is None:
        return f"trl is not installed; install it with:\n    {TRL_HINT}"
    found = version("trl")
    if found != TRL_VERSION:
        return f"trl {found} is installed, but PPO exists only in trl=={TRL_VERSION}; install it with:\n    {TRL_HINT}"
    return None


def check_models(spec) -> None:
    missing = [
        p
        for p in (spec.model_configs.actor.model_path, spec.model_configs.critic.model_path, spec.model_configs.reward.model_path)
        if not (Path(p) / "config.json").exists()
    ]
    if missing:
        sys.exit(f"tiny models missing ({', '.join(missing)}); build them with: .venv/bin/python -m rlhf_launch.demo.tiny_models")


def shown(path: str) -> str:
    """A path relative to the repository when it is inside it, else as given."""
    try:
        return Path(path).relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def tracked_objects() -> int:
    return len(gc.get_objects())


def load_our_spec(overrides: list[str] | None = None):
    """specs/tiny_cpu.yaml with ``overrides`` (default: ``OUR_OVERRIDES``, the PPO step compared with TRL)."""
    from rlhf_launch.frontend.spec import load_spec

    return load_spec(SPEC, OUR_OVERRIDES if overrides is None else overrides).spec


# ------------------------------------------------------------------------------------------ ours
def bench_ours(spec, warmup: int, steps: int) -> dict:
    from rlhf_launch.runtime.loop import PPOLoop

    with tempfile.TemporaryDirectory(prefix="bench-ppo-ours-") as tmp:
        setup_started = time.perf_counter()
        engine = PPOLoop(spec, Path(tmp))
        setup_s = time.perf_counter() - setup_started
        for _ in range(warmup):
            engine.ppo_step()
        rows = [engine.ppo_step() for _ in range(steps)]
        frozen = gc.get_freeze_count()
        del engine
    lengths = {row["response_len_mean"] for row in rows}
    if lengths != {float(RESPONSE_LEN)}:
        print(f"WARNING: our response lengths {sorted(lengths)} differ from {RESPONSE_LEN}: the systems do different work")
    step_times = [row["step_time_s"] for row in rows]
    split = {name: statistics.fmean(row[f"{name}_time_s"] for row in rows) for name in SECTIONS}
    mean_step = statistics.fmean(step_times)
    train = statistics.fmean(row["train_time_s"] for row in rows)
    overheads = [row["step_time_s"] - sum(row[f"{n}_time_s"] for n in SECTIONS) for row in rows]
    return {
        "times": stats(step_times),
        "split": split,
        "mean_step": mean_step,
        "overhead": statistics.fmean(overheads),
        "overhead_median": statistics.median(overheads),
        "overhead_train_loop": train - split["forward"] - split["backward"] - split["optimizer"],
        "overhead_outside_train": mean_step - split["generate"] - split["score"] - train,
        "setup_s": setup_s,
        "frozen_objects": frozen,
        "reward_mean": statistics.fmean(row["reward_mean"] for row in rows),
    }


# ------------------------------------------------------------------------------------------ TRL
def trl_dataset(spec, tokenizer):
    """The project's prompt file rendered with the tokenizer's chat template, as TRL expects."""
    from datasets import Dataset

    from rlhf_launch.core.data_sources import parse_source
    from rlhf_launch.runtime.data import encode_prompt, load_prompt_source

    ids = []
    for entry in spec.dataset_config.ppo_datas:
        for messages in load_prompt_source(parse_source(entry).source):
            ids.append(encode_prompt(tokenizer, messages, spec.tokenizer_config.chat_template)[-spec.dataset_config.max_seq_len :])
    return Dataset.from_dict({"input_ids": ids})


def bench_trl(spec, warmup: int, steps: int, freeze: bool) -> dict:
    try:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as exc:
        sys.exit(f"cannot import TRL's PPO ({exc}); install it with:\n    {TRL_HINT}")
    import torch

    from rlhf_launch.runtime.data import load_tokenizer

    class UpdateClock(TrainerCallback):
        """perf_counter at each update's end: consecutive differences are whole updates (the
        two gc.collect() calls of an update included), setup excluded."""

        def __init__(self):
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    actor = spec.model_configs.actor.model_path
    tokenizer = load_tokenizer(spec.tokenizer_config, actor)
    dataset = trl_dataset(spec, tokenizer)
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(actor, dtype=dtype, local_files_only=True)
    ref = AutoModelForCausalLM.from_pretrained(actor, dtype=dtype, local_files_only=True)  # a copy
    value = AutoModelForSequenceClassification.from_pretrained(
        spec.model_configs.critic.model_path, num_labels=1, dtype=dtype, local_files_only=True
    )
    reward = AutoModelForSequenceClassification.from_pretrained(
        spec.model_configs.reward.model_path, num_labels=1, dtype=dtype, local_files_only=True
    )
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    clock = UpdateClock()
    with tempfile.TemporaryDirectory(prefix="bench-ppo-trl-") as tmp:
        config = PPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            num_ppo_epochs=PPO_EPOCHS,
            num_mini_batches=1,
            response_length=RESPONSE_LEN,
            stop_token=None,  # TRL's default: every response has response_length tokens
            learning_rate=LR,
            temperature=TEMPERATURE,
            kl_coef=KL_COEF,
            local_rollout_forward_batch_size=BATCH,
            total_episodes=BATCH * (warmup + steps),
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to="none",
            num_sample_generations=0,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=spec.run.seed,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            callbacks=[clock],
        )
        # The metrics dict printed every update is logging, not PPO work: keep it out of both runs.
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        torch.set_num_threads(THREADS)  # TrainingArguments must not have changed it; enforce
        objects = tracked_objects()  # what each of TRL's gc.collect() calls scans as shipped
        if freeze:
            gc.collect()
            gc.freeze()
        trainer.train()
        if freeze:
            gc.unfreeze()
        del trainer, policy, ref, value, reward
    gc.collect()
    intervals = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    if len(intervals) != warmup + steps:
        print(f"WARNING: TRL ran {len(intervals)} updates, expected {warmup + steps}")
    return {"times": stats(intervals[warmup:]), "tracked_objects": objects}


# ------------------------------------------------------------------------------------------ report
def print_environment(threads: int) -> None:
    import torch

    print("environment")
    print(f"  python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.2f}")
    print(
        f"  torch {torch.__version__} (threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}), "
        f"transformers {version('transformers')}, trl {version('trl')}, accelerate {version('accelerate')}, "
        f"datasets {version('datasets')}"
    )
    print(f"  requested torch.set_num_threads({threads}) for both systems")


def print_settings(spec, warmup: int, steps: int) -> None:
    print("settings (both systems)")
    print(
        f"  model: {shown(spec.model_configs.actor.model_path)} (policy, ref = a second load), "
        f"{shown(spec.model_configs.critic.model_path)} (value), "
        f"{shown(spec.model_configs.reward.model_path)} (reward); float32, CPU"
    )
    print(
        f"  prompts: {', '.join(shown(p.split('::')[0]) for p in spec.dataset_config.ppo_datas)} "
        f"(chat template, max {spec.dataset_config.max_seq_len} tokens, left-padded)"
    )
    print(
        f"  rollout {BATCH} prompts x {RESPONSE_LEN} response tokens (all responses full length), temperature {TEMPERATURE}, "
        f"top_k 0, top_p 1; {PPO_EPOCHS} PPO epochs x 1 minibatch of {BATCH} (micro {BATCH}); lr {LR:g}; "
        f"kl coef {KL_COEF}, gamma 1, lambda 0.95, clip 0.2 / value clip 0.2, advantages whitened, no grad clipping"
    )
    print(f"  {warmup} warm-up + {steps} timed steps per system")
    print("  ours: --set " + " ".join(OUR_OVERRIDES))
    print(
        "  TRL: PPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_ppo_epochs=4, "
        "num_mini_batches=1, response_length=32, stop_token=None, learning_rate=1e-3, temperature=1.0, "
        "kl_coef=0.05, local_rollout_forward_batch_size=8, bf16=False, report_to='none', "
        "num_sample_generations=0, save_strategy='no'); per-update time = on_step_end to on_step_end; "
        "the printing callback removed"
    )


def print_results(ours: dict, trl: dict[str, dict]) -> None:
    print()
    print(f"{'seconds per PPO step':<34}{'median':>9}{'mean':>9}{'min':>9}{'max':>9}{'n':>5}")
    rows = [("ours (PPOLoop.ppo_step)", ours["times"])] + [(name, r["times"]) for name, r in trl.items()]
    for name, t in rows:
        print(f"{name:<34}{t['median']:>9.4f}{t['mean']:>9.4f}{t['min']:>9.4f}{t['max']:>9.4f}{t['n']:>5}")
    for name, r in trl.items():
        ratio = ours["times"]["median"] / r["times"]["median"]
        mean_ratio = ours["times"]["mean"] / r["times"]["mean"]
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        print(f"ratio ours / {name:<22} {ratio:6.3f} (medians; means {mean_ratio:.3f})  target <= {TARGET_RATIO}: {verdict}")

    step = ours["mean_step"]
    print()
    print(f"our step split (means over the timed steps, step {step:.4f} s)")
    labels = {
        "generate": "generate (HF generate call)",
        "score": "score (actor/ref/critic/reward fwd)",
        "forward": "train forward",
        "backward": "train backward",
        "optimizer": "optimizer step",
    }
    for name in SECTIONS:
        value = ours["split"][name]
        print(f"  {labels[name]:<38}{value:>9.4f} s {100 * value / step:>6.1f} %")
    overhead = ours["overhead"]
    pct = 100 * overhead / step
    verdict = "meets" if pct <= TARGET_OVERHEAD_PCT else "misses"
    print(f"  {'orchestration overhead':<38}{overhead:>9.4f} s {pct:>6.1f} %   target <= {TARGET_OVERHEAD_PCT:g} %: {verdict}")
    print(f"    {'in the training loop':<36}{ours['overhead_train_loop']:>9.4f} s {100 * ours['overhead_train_loop'] / step:>6.1f} %")
    print(
        f"    {'outside it (prompts, experience)':<36}{ours['overhead_outside_train']:>9.4f} s"
        f" {100 * ours['overhead_outside_train'] / step:>6.1f} %"
    )
    print(
        f"  (median per-step overhead {ours['overhead_median']:.4f} s; engine setup {ours['setup_s']:.2f} s, not timed; "
        f"{ours['frozen_objects']} objects frozen by PPOLoop)"
    )
    if trl:
        print(
            "  gc-tracked objects when train() started: "
            + ", ".join(f"{name} {r['tracked_objects']}" for name, r in trl.items())
            + " (frozen ones are skipped by gc.collect())"
        )


def print_grpo(ppo: dict, grpo: dict) -> None:
    """Our GRPO step (n = GRPO_N, no critic) next to our PPO step: medians, and the mean split per section."""
    print()
    print(f"GRPO step (n_samples_per_prompt {GRPO_N}, advantage_estimator grpo, k3 KL in the loss, no critic) vs our PPO step,")
    print(f"same {BATCH} sequences x {RESPONSE_LEN} response tokens, same reward model, {PPO_EPOCHS} epochs of one minibatch")
    print(f"{'seconds (means over the timed steps)':<40}{'PPO':>9}{'GRPO':>9}{'GRPO/PPO':>10}")
    rows = [("step (median)", ppo["times"]["median"], grpo["times"]["median"]), ("step (mean)", ppo["mean_step"], grpo["mean_step"])]
    rows += [(name, ppo["split"][name], grpo["split"][name]) for name in SECTIONS]
    rows.append(("orchestration overhead", ppo["overhead"], grpo["overhead"]))
    for name, a, b in rows:
        ratio = f"{b / a:>10.3f}" if a > 0 else f"{'-':>10}"
        print(f"  {name:<38}{a:>9.4f}{b:>9.4f}{ratio}")
    print("  GRPO step split: " + ", ".join(f"{name} {100 * grpo['split'][name] / grpo['mean_step']:.1f} %" for name in SECTIONS)
          + f", overhead {100 * grpo['overhead'] / grpo['mean_step']:.1f} %")
    print("  (score = every rollout inference forward: PPO runs actor, reference, critic and reward; GRPO no critic;"
          " train = actor only for GRPO, actor + critic for PPO)")
    print("  ours, GRPO: --set " + " ".join(GRPO_OVERRIDES[len(OUR_OVERRIDES) - 1:]))


# ------------------------------------------------------------------------------------------ main
THREADS = 2


def main(argv: list[str] | None = None) -> int:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per system (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per system (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 3 timed steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both systems (default 2)")
    parser.add_argument("--no-trl", action="store_true", help="measure ours only")
    parser.add_argument("--no-grpo", action="store_true", help="skip our GRPO step (n=4, no critic)")
    args = parser.parse_args(argv)
    warmup, steps = (1, 3) if args.quick else (args.warmup, args.steps)
    if steps < 1 or warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    THREADS = args.threads

    problem = None if args.no_trl else check_trl()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(THREADS)
    spec = load_our_spec()
    check_models(spec)
    print_environment(THREADS)
    print_settings(spec, warmup, steps)
    print(flush=True)

    started = time.perf_counter()
    print(f"[1/3] ours: {warmup} warm-up + {steps} timed steps ...", flush=True)
    ours = bench_ours(spec, warmup, steps)
    gc.unfreeze()  # PPOLoop froze the heap; TRL "as shipped" must start from an unfrozen one
    gc.collect()
    grpo = None
    if not args.no_grpo:
        print(f"[GRPO] ours, GRPO n={GRPO_N}: {warmup} warm-up + {steps} timed steps ...", flush=True)
        grpo = bench_ours(load_our_spec(GRPO_OVERRIDES), warmup, steps)
        gc.unfreeze()
        gc.collect()
    trl: dict[str, dict] = {}
    if not args.no_trl:
        print(f"[2/3] TRL {TRL_VERSION} as shipped ...", flush=True)
        trl["TRL as shipped"] = bench_trl(spec, warmup, steps, freeze=False)
        print(f"[3/3] TRL {TRL_VERSION} with gc.freeze() ...", flush=True)
        trl["TRL with gc.freeze"] = bench_trl(spec, warmup, steps, freeze=True)
    if torch.get_num_threads() != THREADS:
        print(f"WARNING: torch threads changed to {torch.get_num_threads()} during the run")
    print_results(ours, trl)
    if grpo is not None:
        print_grpo(ours, grpo)
    print(
        f"\ntotal {time.perf_counter() - started:.1f} s; load avg now {os.getloadavg()[0]:.2f} "
        "(the machine is shared: compare runs only at similar load)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
