"""Overlapping scoring passes and per-role utilization (rlhf_launch/runtime/scoring_exchange.py ``score_passes``,
rlhf_launch/runtime/step_timing.py ``role_utilization``).

Every rank runs the scoring passes of the roles it hosts before the first gather, so roles on different ranks
compute at the same time; the gathered tensors are those of the old order (each pass, then its gather). Each
role's busy seconds and utilization reach every rank as the maximum over the role's ranks.

The gloo world has four ranks, one per scoring role's rank: actor x 2, critic, and the reference with a reward
function on the same rank (a rank that hosts two scoring roles).
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from rlhf_launch.runtime.cluster import SingleProcess
from rlhf_launch.runtime.metrics import describe_utilization, read_metrics
from rlhf_launch.runtime.scoring_exchange import SCORING, score_passes
from rlhf_launch.runtime.step_timing import role_utilization
from rlhf_launch.runtime.timing import Timer, busy, scoring
from tests.factory import join_as_rank, layout, load, reward_function, run_on_ranks

CPU = torch.device("cpu")
ROWS = 6
WORLD = {**layout(actor=2), **reward_function(), "slurm.gpus_per_node": 4}
SCORING_RANKS = {"actor": [0, 1], "critic": [2], "reference": [3], "reward": [3]}
ROLES = ["generator", "actor", "reference", "critic", "reward"]


def rollout() -> dict[str, torch.Tensor]:
    """Rows that say which row they are."""
    return {"row": torch.arange(ROWS)}


def answer(role: str, shard: dict[str, torch.Tensor]) -> torch.Tensor:
    """A role's result for its rows: per-token values of a width that depends on the shard (so gathers pad) for
    the actor, reference and critic, one float per row for the reward."""
    rows = shard["row"].double()
    if role == "reward":
        return rows / 4
    offset = {"actor": 0.0, "reference": 100.0, "critic": 200.0}[role]
    width = 2 + int(shard["row"][0]) % 3
    return offset + rows[:, None] * 10 + torch.arange(width, dtype=torch.float64)


class RecordingCluster(SingleProcess):
    """One process that runs ``roles`` only, recording when each pass is computed and each result gathered."""

    def __init__(self, roles: set[str], events: list[str]):
        self.roles, self.events = roles, events

    def runs(self, role: str) -> bool:
        return role in self.roles

    def gather(self, role, local, keys, pad=None):
        self.events.append(f"gather {role}")
        return super().gather(role, local if local is not None else {keys[0]: torch.zeros(ROWS)}, keys, pad)


def recorded_passes(roles: set[str], events: list[str]):
    def compute(role):
        def fn(shard):
            events.append(f"compute {role}")
            return answer(role, shard)
        return fn
    return [(role, key, compute(role) if role in roles else None) for role, key in SCORING]


@pytest.mark.parametrize("overlap,expected", [
    (True, ["compute reference", "compute reward", "gather actor", "gather reference", "gather critic", "gather reward"]),
    (False, ["gather actor", "compute reference", "gather reference", "gather critic", "compute reward", "gather reward"]),
], ids=["overlap", "sequential"])
def test_every_local_pass_runs_before_the_first_gather(overlap, expected):
    """A rank hosting the reference and a reward function computes both before it gathers anything; gathers keep
    the fixed order actor, reference, critic, reward. The sequential order is the one before passes overlapped."""
    events: list[str] = []
    roles = {"reference", "reward"}
    timer = Timer()
    out = score_passes(RecordingCluster(roles, events), recorded_passes(roles, events), rollout(), CPU, timer, overlap=overlap)
    assert events == expected
    assert list(out) == ["old_logprobs", "ref_logprobs", "values", "scores"]
    torch.testing.assert_close(out["ref_logprobs"], answer("reference", rollout()), rtol=0, atol=0)
    sections = timer.pop()
    assert set(sections) == {busy("reference"), busy("reward"), scoring("reference"), scoring("reward")}


# --------------------------------------------------------------------------- four gloo ranks
def _ranks(rank: int, world: int, store, plan) -> dict:
    c = join_as_rank(rank, world, store, plan)
    everyone = [f"test/started/{r}" for r in range(world)]

    def meeting(role):
        # Each rank's first pass waits until every rank has started one: it returns only when all four ranks
        # compute at once. In the sequential order it could not: the reference's rank is still in the actor's gather.
        def fn(shard):
            store.set(f"test/started/{rank}", "1")
            store.wait(everyone, datetime.timedelta(seconds=20))
            return answer(role, shard)
        return fn

    def plain(role):
        return lambda shard: answer(role, shard)

    out = {}
    timer = Timer()
    out["overlap"] = score_passes(c, [(r, k, meeting(r) if c.runs(r) else None) for r, k in SCORING], rollout(), CPU, timer)
    out["sections"] = timer.pop()
    out["sequential"] = score_passes(c, [(r, k, plain(r) if c.runs(r) else None) for r, k in SCORING], rollout(), CPU, Timer(),
                                     overlap=False)
    # Made-up busy seconds that say whose they are: rank r is busy 0.1 x (r + 1) s in each role it runs (the
    # generator is shared: it runs on the actor's ranks), over a step of 1 + r s.
    synthetic = {"step": 1.0 + rank}
    for r in ROLES:
        if c.runs(r):
            synthetic[busy(r)] = 0.1 * (rank + 1)
            synthetic[scoring(r)] = 0.01 * (rank + 1)
    out["utilization"] = role_utilization(c, ROLES, synthetic)
    c.close()
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def world():
    plan = load(WORLD).plan
    assert plan.world_size == 4
    return run_on_ranks(_ranks, plan.world_size, plan)


def test_overlapping_passes_gather_what_the_sequential_order_gathers(world):
    for rank, seen in enumerate(world):
        assert list(seen["overlap"]) == [key for _, key in SCORING]
        for key, tensor in seen["overlap"].items():
            torch.testing.assert_close(tensor, seen["sequential"][key], rtol=0, atol=0, msg=f"rank {rank} {key}")
        torch.testing.assert_close(seen["overlap"]["scores"], answer("reward", rollout()), rtol=0, atol=0)
        # Row order survives: row i of the actor's log-probs starts at 10 i (and is right-padded with 0 past its width).
        assert seen["overlap"]["old_logprobs"][:, 0].tolist() == [10.0 * i for i in range(ROWS)]
        assert seen["overlap"]["ref_logprobs"][:, 0].tolist() == [100.0 + 10.0 * i for i in range(ROWS)]


def test_each_rank_times_the_passes_of_its_own_roles(world):
    for rank, seen in enumerate(world):
        mine = {role for role, ranks in SCORING_RANKS.items() if rank in ranks}
        timed = set(seen["sections"])
        assert timed == {busy(r) for r in mine} | {scoring(r) for r in mine}, f"rank {rank}"
        assert all(seconds >= 0 for seconds in seen["sections"].values())


def test_utilization_is_the_busiest_rank_of_each_role_on_every_rank(world):
    ranks = {**SCORING_RANKS, "generator": [0, 1]}
    expected = {}
    for role, on in ranks.items():
        expected[f"busy_{role}_s"] = max(0.1 * (r + 1) for r in on)
        expected[f"util_{role}"] = max(0.1 * (r + 1) / (1.0 + r) for r in on)
        if role != "generator":
            expected[f"score_{role}_time_s"] = max(0.01 * (r + 1) for r in on)
    for rank, seen in enumerate(world):
        assert seen["utilization"] == pytest.approx(expected, rel=1e-12), f"rank {rank}"
        assert set(seen["utilization"]) == set(expected)


def test_one_process_reports_its_own_figures():
    sections = {"step": 2.0, busy("actor"): 0.5, scoring("actor"): 0.25, busy("generator"): 1.0}
    got = role_utilization(SingleProcess(), ["generator", "actor", "reward"], sections)
    assert got == {"busy_generator_s": 1.0, "util_generator": 0.5, "busy_actor_s": 0.5, "util_actor": 0.25,
                   "score_actor_time_s": 0.25, "busy_reward_s": 0.0, "util_reward": 0.0, "score_reward_time_s": 0.0}


def test_describe_utilization():
    record = {"step": 3, "util_generator": 0.404, "util_actor": 0.62, "reward_mean": 0.5, "util_reward": 0.091}
    assert describe_utilization(record) == "generator 40%  actor 62%  reward 9%"
    assert describe_utilization({"step": 1, "kl": 0.1}) is None


# --------------------------------------------------------------------------- a real step
def test_a_step_logs_every_planned_roles_utilization_and_status_shows_it(tiny_models, tmp_path):
    from rlhf_launch.frontend.backends.slurm_jobs import status_report
    from rlhf_launch.runtime.training_run import run_local
    from tests.factory import make_spec

    run_local(make_spec({"train_config.max_train_step": 1, "dataset_config.num_samples_each_epoch": 8,
                         "train_config.ppo_minibatch": 8, "train_config.value_minibatch": 8}), tmp_path / "run", quiet=True)
    (row,) = read_metrics(tmp_path / "run")
    for role in ROLES:
        assert 0.0 < row[f"util_{role}"] <= 1.05, role
        assert row[f"busy_{role}_s"] <= row["step_time_s"] * 1.05, role
    for role in ("actor", "reference", "critic", "reward"):
        # The scoring pass is part of the role's busy time; the actor and critic also train.
        assert 0.0 < row[f"score_{role}_time_s"] <= row[f"busy_{role}_s"], role
    assert row["busy_actor_s"] > row["score_actor_time_s"] and row["busy_critic_s"] > row["score_critic_time_s"]
    report = status_report(str(tmp_path / "run"))
    (line,) = [line for line in report.splitlines() if "utilization" in line]
    assert all(f"{role} " in line for role in ROLES), line
