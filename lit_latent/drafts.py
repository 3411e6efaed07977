"""Guesses of a greedy answer's next tokens, looked up in tokens seen before (prompt lookup).

When LatentSeek regenerates an answer from a slightly edited prefix, the model mostly writes
again what it wrote after the previous prefix. ``Drafts`` keeps, per row, a table from the
last few tokens seen to the tokens that followed them, in the row's own prompt and answer and
in earlier answers to the same problem. The decoding loop feeds the tokens that followed the
row's latest tokens as a draft after its next token, checks them all in one forward, and keeps
the ones the model would have chosen itself (``generation.generate``). The answer is the
model's greedy answer either way, up to the float rounding of a wider forward; a wrong guess
costs only its share of that forward, which on a small batch is little beside the forward's
fixed cost (reading the weights, dispatching the ops).
"""

from __future__ import annotations

from typing import Sequence

import torch

SEPARATOR = -1  # joins a row's sources: no match and no draft crosses it


class Drafts:
    def __init__(self, contexts: Sequence[Sequence[int]], sources: Sequence[Sequence[Sequence[int]]], longest: int = 3):
        """``contexts[i]``: row ``i``'s tokens so far (prompt and prefix); ``sources[i]``: other
        token sequences to look in (earlier answers to the same problem). The row's last
        ``longest`` tokens are looked up first, then fewer, down to its last token alone."""
        self.sizes = range(longest, 0, -1)
        self.tokens: list[list[int]] = []
        # (last tokens) -> where the tokens after their latest occurrence start in self.tokens[row]
        self.follows: list[dict[tuple[int, ...], int]] = []
        for row, (context, extra) in enumerate(zip(contexts, sources)):
            self.tokens.append([])
            self.follows.append({})
            # sources first, the row's own tokens last: a later occurrence replaces an earlier one
            for seq in extra:
                self.extend(row, [*seq, SEPARATOR])
            self.extend(row, context)

    def extend(self, row: int, new: Sequence[int]) -> None:
        """Tokens the row now has (its next token, accepted draft tokens)."""
        tokens, follows = self.tokens[row], self.follows[row]
        for t in new:
            for n in self.sizes:
                if len(tokens) >= n:
                    key = tuple(tokens[-n:])
                    if SEPARATOR not in key:
                        follows[key] = len(tokens)
            tokens.append(t)

    def guess(self, row: int, length: int) -> list[int]:
        """What followed the latest earlier occurrence of the row's last tokens (the longest
        match), at most ``length`` tokens, cut at a separator; [] when none occurred."""
        tokens, follows = self.tokens[row], self.follows[row]
        for n in self.sizes:
            at = follows.get(tuple(tokens[-n:]))
            if at is not None:
                out = tokens[at : at + length]
                return out[: out.index(SEPARATOR)] if SEPARATOR in out else out
        return []

    def select(self, rows: Sequence[int]) -> None:
        """Keep these rows only, in this order (rows leave the decoding batch)."""
        self.tokens = [self.tokens[r] for r in rows]
        self.follows = [self.follows[r] for r in rows]


# A forward costs a fixed part (dispatching its ops, reading the weights once) and a part per token
# fed. A drafted step feeds rows x (1 + draft) tokens, so drafts pay only while that stays within the
# tokens a forward feeds for about its fixed cost. On the 2-core CPU, a forward of the embedded model
# (2.8M parameters) feeds 25 tokens for 1.4x the cost of 5 and 5 for 1.3x the cost of 1, a Qwen2-0.5B
# shape (360M) 12 tokens for 3x the cost of 1: there the work per token dominates, about
# CPU_PARAMS_PER_FORWARD / parameters tokens ride along with the fixed part, and a few more while the
# weights are read. A GPU feeds a few hundred tokens for about the cost of one.
CPU_PARAMS_PER_FORWARD = 1e8
CPU_TOKENS = 4
GPU_TOKENS = 256


def block_budget(model, device: torch.device) -> int:
    """Tokens a drafted forward may feed (rows x block width) at about the cost of one token per row."""
    if device.type != "cpu":
        return GPU_TOKENS
    parameters = sum(p.numel() for p in model.parameters())
    return CPU_TOKENS + int(CPU_PARAMS_PER_FORWARD / parameters)
