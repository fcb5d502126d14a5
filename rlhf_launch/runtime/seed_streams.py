"""The random streams of a PPO step, each seeded from (run seed, step, stream, row) alone.

All randomness of step k derives from (run.seed, k) and, for sampling, from the global row of each generate
call's first prompt: a run resumed at step k continues exactly as the uninterrupted run, and sharding the
generator does not change the responses.
"""

from __future__ import annotations

import enum
import hashlib


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
