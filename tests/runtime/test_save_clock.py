"""The time-based checkpoint interval (train_config.save_interval_minutes, rlhf_launch/runtime/training_run.py):
global rank 0's clock decides, every rank gets its answer, and a run that checkpoints by time computes what one
that does not computes."""

from __future__ import annotations

import pytest

from rlhf_launch.runtime.cluster import SingleProcess
from rlhf_launch.runtime.training_run import SaveClock
from tests.factory import join_as_rank, layout, load, run_on_ranks


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_due_after_the_interval_since_the_start_or_the_last_checkpoint():
    clock = FakeClock()
    save = SaveClock(2, SingleProcess(), clock)
    clock.t += 119
    assert not save.due()
    clock.t += 1
    assert save.due() and save.due()  # until a checkpoint is written
    save.saved()
    clock.t += 60
    assert not save.due()
    assert not SaveClock(None, SingleProcess(), clock).due()  # off by default


class NoCollectives(SingleProcess):
    """A cluster whose collectives must not be used."""

    def any(self, flag: bool) -> bool:
        """Fails the test: without an interval no rank may join a collective the others do not."""
        raise AssertionError("a collective without save_interval_minutes")


def test_without_an_interval_no_collective_runs():
    assert not SaveClock(None, NoCollectives(), FakeClock()).due()


def _answers(rank: int, world: int, store, plan) -> list[bool]:
    """Rank 0's clock against the others': each rank's answer to three questions."""
    cluster = join_as_rank(rank, world, store, plan)
    clock = FakeClock()
    save = SaveClock(1, cluster, clock)
    answers = []
    clock.t += 0 if rank == 0 else 3600  # the others are long past the interval, rank 0 is not
    answers.append(save.due())
    clock.t += 60  # now rank 0 is past it too
    answers.append(save.due())
    save.saved()
    answers.append(save.due())
    return answers


def test_every_rank_follows_rank_zeros_clock():
    plan = load(layout(actor=2)).plan  # five ranks: actor x 2, critic, reference, reward
    answers = run_on_ranks(_answers, plan.world_size, plan)
    assert answers == [[False, True, False]] * plan.world_size


@pytest.mark.slow
def test_a_run_that_checkpoints_by_time_equals_one_that_does_not(tiny_models, tmp_path):
    """An interval shorter than any step checkpoints after every step (the last two kept); the metrics are those of
    a run without checkpoints, and a run resumed from the step-2 checkpoint ends as the straight one."""
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local
    from tests.factory import make_spec, without_timing

    steps = {"train_config.max_train_step": 3, "train_config.save_interval": 0}
    run_local(make_spec(steps), tmp_path / "plain", quiet=True)
    timed = {**steps, "train_config.save_interval_minutes": 1e-9}
    run_local(make_spec(timed), tmp_path / "timed", quiet=True)
    assert sorted(p.name for p in (tmp_path / "timed" / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    assert without_timing(read_metrics(tmp_path / "timed")) == without_timing(read_metrics(tmp_path / "plain"))
    resumed = tmp_path / "resumed"
    run_local(make_spec({**timed, "train_config.max_train_step": 2}), resumed, quiet=True)
    run_local(make_spec(timed), resumed, resume=str(resumed / "checkpoints" / "step-00000002"), quiet=True)
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(tmp_path / "plain"))
