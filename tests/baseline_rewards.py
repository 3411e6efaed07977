"""A reward with a known rule, loaded by import path in tests/test_baselines.py."""

import zlib

from lit_latent.rewards import Reward, Scores


def hash_reward(completion: str, levels: int) -> float:
    """A fixed pseudo-random score in {0, 1/(levels-1), ..., 1}: few levels, many ties."""
    return (zlib.crc32(completion.encode()) % levels) / (levels - 1)


class HashReward(Reward):
    """Scores by ``hash_reward`` and keeps every (problem id, completion) it saw, in order."""

    seen: list[tuple[str, str]] = []  # class-level: the instance is built inside adapt.main

    def __init__(self, levels: int = 2):
        self.levels = levels

    def score(self, engine, problems, completions):
        HashReward.seen += [(p["id"], c) for p, c in zip(problems, completions)]
        return Scores([hash_reward(c, self.levels) for c in completions], [0] * len(completions))
