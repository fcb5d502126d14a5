"""Where the roles run (rlhf_launch/runtime/cluster.py): ``SingleProcess`` hands everything through, and
``Distributed`` shards a batch over a role's replicas and gathers the results back, in order,
on every rank.

``Distributed`` runs on real gloo groups of local processes, one per rank of a plan built by
the spec factory. GRPO with kl_coeff 0 and a reward function plans the actor alone (no critic, no
reference; the reward function and the generator share the actor's ranks): one rank, the world
that must behave as ``SingleProcess``, and two ranks, the smallest with two shards. The PPO world
gives every role ranks of its own (actor x 2, critic, reference; the reward function shares the
reference's): four ranks. The last adds a vLLM generator of two engines x two tensor-parallel
ranks (8 ranks), where both ranks of an engine share a shard and a weight-sync group exists.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist

from rlhf_launch.runtime.cluster import SingleProcess
from tests.factory import join_as_rank, layout, load, reward_function, run_on_ranks, vllm_generator

CPU = torch.device("cpu")
ROLES = ("actor", "critic", "reference", "reward", "generator")
ROWS = 8
KEYS = ["response_ids", "scores"]
PAD = {"response_ids": -1}

# Each world: spec overrides, and for every role its replicas, each a list of global ranks;
# a replica's index is its shard index. Written out by hand from the plan's documented order
# (trainer: actor then critic, inference: reference, generator), not computed from the plan.
GRPO_ALONE = {**reward_function(), "repeater_config.advantage_estimator": "grpo", "rollout_config.n_samples_per_prompt": 4,
              "repeater_config.kl_coeff": 0}
WORLDS = {
    "actor-alone-1": (
        {**layout(actor=1), **GRPO_ALONE},
        {"actor": [[0]], "reward": [[0]], "generator": [[0]]},
    ),
    "actor-alone-2": (
        {**layout(actor=2), **GRPO_ALONE},
        {"actor": [[0], [1]], "reward": [[0], [1]], "generator": [[0], [1]]},
    ),
    "shared-generator": (
        {**layout(actor=2), **reward_function(), "slurm.gpus_per_node": 4},
        {"actor": [[0], [1]], "critic": [[2]], "reference": [[3]], "reward": [[3]], "generator": [[0], [1]]},
    ),
    "vllm-generator": (
        {**layout(actor=2), **reward_function(), **vllm_generator(data=2, tensor=2), "slurm.gpus_per_node": 4},
        {"actor": [[0], [1]], "critic": [[2]], "reference": [[3]], "reward": [[3]], "generator": [[4, 5], [6, 7]]},
    ),
}


def rollout_batch() -> dict[str, torch.Tensor]:
    """A batch whose rows say which row they are."""
    return {"prompt_ids": torch.arange(ROWS * 3).reshape(ROWS, 3), "finished": torch.arange(ROWS) % 2 == 0}


def computed(rows: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """What a replica returns for its rows: responses of its own width (replicas differ), a score per row."""
    return {"response_ids": torch.stack([row * 10 + torch.arange(width) for row in rows]), "scores": rows.double() / 2}


def expected_gather(replicas: list[list[int]]) -> dict[str, torch.Tensor]:
    """Every row in its original order, responses right-padded with -1 to the widest replica's."""
    per = ROWS // len(replicas)
    widest = 1 + len(replicas)
    ids = [[10 * row + t for t in range(1 + row // per + 1)] for row in range(ROWS)]  # replica i answers with width i + 2
    return {"response_ids": torch.tensor([r + [-1] * (widest - len(r)) for r in ids]),
            "scores": torch.tensor([row / 2 for row in range(ROWS)], dtype=torch.float64)}


# --------------------------------------------------------------------------- SingleProcess
def test_single_process_passes_everything_through():
    c = SingleProcess()
    batch = {"a": torch.arange(4), "b": torch.ones(4, 2)}
    assert all(c.runs(role) for role in ROLES)
    assert c.shard_of("actor") == (0, 1) and c.ranks_of("critic") == [0]
    assert c.shard("actor", batch) is batch
    gathered = c.gather("critic", batch, ["b"], pad={"b": 9})
    assert list(gathered) == ["b"] and gathered["b"] is batch["b"]  # only the keys asked for, unpadded
    metrics = {"loss": 1.5}
    assert c.share(metrics, "reward") is metrics
    assert c.any(True) is True and c.any(False) is False
    assert c.is_role_leader("generator") and c.is_replica_leader("generator") and c.is_leader
    c.barrier()


# --------------------------------------------------------------------------- Distributed
def _rank_checks(rank: int, world: int, store, plan) -> dict:
    c = join_as_rank(rank, world, store, plan)
    batch = rollout_batch()
    planned = [r for r in ROLES if r in {role.name for role in plan.roles}]
    out: dict = {"runs": {r for r in ROLES if c.runs(r)}, "shard_of": {}, "rows": {}, "replica_leader": {}, "gather": {},
                 "role_leader": {r: c.is_role_leader(r) for r in ROLES}}
    for r in sorted(out["runs"]):
        out["shard_of"][r] = c.shard_of(r)
        out["rows"][r] = c.shard(r, batch)["prompt_ids"][:, 0] // 3
        out["replica_leader"][r] = c.is_replica_leader(r)
    for r in planned:  # every rank takes part in every gather, in the same order
        local = None
        if c.runs(r):
            index, _ = c.shard_of(r)
            local = computed(c.shard(r, batch)["prompt_ids"][:, 0] // 3, width=index + 2)
        out["gather"][r] = c.gather(r, local, KEYS, PAD)
    out["share"] = {r: c.share({"from": rank}, r)["from"] for r in planned}
    out["unplanned_refused"] = sorted(r for r in ROLES if r not in planned and _refused(c, r))
    out["any_one"] = c.any(rank == world - 1)
    out["any_none"] = c.any(False)
    out["max"] = c.max_over_ranks([float(rank), -float(rank), 0.5])
    sync = c.sync_group()
    out["sync"] = None if sync is None else sync.broadcast(torch.arange(3) if rank == 0 else torch.zeros(3, dtype=torch.int64), 0)
    # Arrive at the barrier one after another: past it, every rank must see every arrival.
    time.sleep(0.05 * rank)
    store.set(f"test/arrived/{rank}", "1")
    c.barrier()
    out["arrived_after_barrier"] = [store.check([f"test/arrived/{r}"]) for r in range(world)]
    c.close()
    dist.destroy_process_group()
    return out


def _refused(c, role: str) -> bool:
    """Whether gather and share both refuse a role the plan does not have (before any exchange, so
    that no rank waits for the others)."""
    refused = 0
    for call in (lambda: c.gather(role, None, KEYS, PAD), lambda: c.share(None, role)):
        try:
            call()
        except KeyError:
            refused += 1
    return refused == 2


@functools.cache
def _run_world(name: str) -> tuple[dict, list[dict]]:
    """(replicas per role, what each rank saw) for one world, run once for the tests below."""
    overrides, replicas = WORLDS[name]
    plan = load(overrides).plan
    assert plan.world_size == 1 + max(rank for reps in replicas.values() for rep in reps for rank in rep)
    return replicas, run_on_ranks(_rank_checks, plan.world_size, plan)


@pytest.fixture(scope="module", params=sorted(WORLDS))
def world(request):
    """(replicas per role, what each rank saw) for each world in turn."""
    return _run_world(request.param)


def test_each_rank_runs_its_roles_and_knows_its_shard(world):
    replicas, results = world
    for rank, seen in enumerate(results):
        mine = {role: (i, reps) for role, reps in replicas.items() for i, rep in enumerate(reps) if rank in rep}
        assert seen["runs"] == set(mine), f"rank {rank}"
        for role, (index, reps) in mine.items():
            assert seen["shard_of"][role] == (index, len(reps)), f"rank {rank} {role}"
            assert seen["replica_leader"][role] == (rank == reps[index][0]), f"rank {rank} {role}"
        leads = {role for role, reps in replicas.items() if reps[0][0] == rank}
        assert {role for role, yes in seen["role_leader"].items() if yes} == leads, f"rank {rank}"


def test_roles_the_plan_lacks_are_refused_by_gather_and_share(world):
    replicas, results = world
    for seen in results:
        assert seen["unplanned_refused"] == sorted(set(ROLES) - set(replicas))


def test_one_rank_behaves_as_single_process():
    replicas, (seen,) = _run_world("actor-alone-1")
    single, batch = SingleProcess(), rollout_batch()
    for role in replicas:
        assert seen["shard_of"][role] == single.shard_of(role) and seen["replica_leader"][role] == single.is_replica_leader(role)
        assert seen["rows"][role].tolist() == (single.shard(role, batch)["prompt_ids"][:, 0] // 3).tolist()
        alone = single.gather(role, computed(torch.arange(ROWS), width=2), KEYS, PAD)
        for key in KEYS:
            torch.testing.assert_close(seen["gather"][role][key], alone[key], rtol=0, atol=0)
        assert seen["share"][role] == 0 and seen["role_leader"][role] == single.is_role_leader(role)
    assert (seen["any_one"], seen["any_none"]) == (single.any(True), single.any(False))
    assert seen["max"] == single.max_over_ranks([0.0, -0.0, 0.5])


def test_shards_are_contiguous_rows_in_replica_order(world):
    replicas, results = world
    for rank, seen in enumerate(results):
        for role, rows in seen["rows"].items():
            index, parts = seen["shard_of"][role]
            per = ROWS // parts
            assert rows.tolist() == list(range(index * per, (index + 1) * per)), f"rank {rank} {role}"


def test_gather_gives_every_rank_all_rows_in_order_padded(world):
    replicas, results = world
    for rank, seen in enumerate(results):
        for role in replicas:  # the roles the plan has
            expected = expected_gather(replicas[role])
            for key in KEYS:
                torch.testing.assert_close(seen["gather"][role][key], expected[key], rtol=0, atol=0, msg=f"rank {rank} {role} {key}")


def test_share_sends_the_roles_first_rank_object_to_every_rank(world):
    replicas, results = world
    for seen in results:
        assert seen["share"] == {role: reps[0][0] for role, reps in replicas.items()}


def test_any_is_true_everywhere_when_one_rank_says_so(world):
    _, results = world
    assert [seen["any_one"] for seen in results] == [True] * len(results)
    assert [seen["any_none"] for seen in results] == [False] * len(results)


def test_max_over_ranks_is_the_element_wise_maximum_everywhere(world):
    _, results = world
    world_size = len(results)
    assert [seen["max"] for seen in results] == [[world_size - 1.0, 0.0, 0.5]] * world_size


def test_barrier_waits_for_every_rank(world):
    _, results = world
    for rank, seen in enumerate(results):
        assert all(seen["arrived_after_barrier"]), f"rank {rank} passed the barrier before {seen['arrived_after_barrier']}"


def test_weight_sync_group_is_actor_rank_0_and_a_separate_generator(world):
    replicas, results = world
    members = set() if replicas["generator"] == replicas["actor"] else {0, *(r for rep in replicas["generator"] for r in rep)}
    for rank, seen in enumerate(results):
        if rank in members:
            assert seen["sync"].tolist() == [0, 1, 2], f"rank {rank}"
        else:
            assert seen["sync"] is None, f"rank {rank}"
