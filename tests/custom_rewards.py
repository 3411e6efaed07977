"""Rewards that tests load by import path (reward.kind=custom reward.class_path=custom_rewards.X)."""

from lit_latent.rewards import Reward, Scores


class FirstCharReward(Reward):
    """1.0 if the answer starts with ``target``, ``keep`` if it starts with ``original``, else 0."""

    def __init__(self, target: str, original: str, keep: float = 0.5):
        self.target, self.original, self.keep = target, original, keep
        self.calls = 0

    def score(self, engine, problems, completions):
        self.calls += 1
        rewards = [1.0 if c.startswith(self.target) else self.keep if c.startswith(self.original) else 0.0 for c in completions]
        return Scores(rewards, [0] * len(completions))


class PassAfterReward(Reward):
    """Fails every candidate until a problem has been scored ``n`` times, then passes."""

    def __init__(self, n: int):
        self.n = n
        self.seen: dict[str, int] = {}

    def score(self, engine, problems, completions):
        rewards = []
        for p in problems:
            self.seen[p["id"]] = self.seen.get(p["id"], 0) + 1
            rewards.append(1.0 if self.seen[p["id"]] > self.n else 0.0)
        return Scores(rewards, [1] * len(problems))


class NaNReward(Reward):
    """Fails every candidate, and scores problem ``bad``'s second candidate as NaN."""

    def __init__(self, bad: str):
        self.bad = bad
        self.calls: dict[str, int] = {}

    def score(self, engine, problems, completions):
        rewards = []
        for p in problems:
            self.calls[p["id"]] = self.calls.get(p["id"], 0) + 1
            rewards.append(float("nan") if p["id"] == self.bad and self.calls[p["id"]] == 3 else 0.0)
        return Scores(rewards, [0] * len(problems))


class IdReward(Reward):
    """1.0 for every candidate of the problems in ``good``, 0.0 for the rest."""

    def __init__(self, good: list):
        self.good = set(good)

    def score(self, engine, problems, completions):
        return Scores([1.0 if p["id"] in self.good else 0.0 for p in problems], [0] * len(problems))


class RaisesOn(Reward):
    """Scores like the verifier, and raises while scoring problem ``bad`` (a reward with a bug)."""

    def __init__(self, bad: str):
        self.bad = bad

    def score(self, engine, problems, completions):
        if any(p["id"] == self.bad for p in problems):
            raise KeyError("answer_key")
        return Scores([0.0] * len(problems), [0] * len(problems))
