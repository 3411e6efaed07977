"""The generation services every method and reward uses, with no Lightning in them.

An ``Engine`` holds the frozen model and its tokenizer and turns problems into prompt ids,
ids into text, and prompts into greedy or sampled answers (``generate``), verification
answers (``complete``) and sampled answer sets (``sample_answers``). Random draws come from
generators seeded by (seed, problem, purpose), so a problem's samples do not depend on which
problems share its batch.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional, Sequence

import torch

from lit_latent.config import AdaptConfig
from lit_latent.data import user_message
from lit_latent.devices import input_device
from lit_latent.generation import Generation, chat_prompt, eos_token_ids, generate, generate_branches
from lit_latent.heads import LogitHead
from lit_latent.kvcache import (
    PromptState,
    accepts_4d_mask,
    cache_from_pieces,
    common_prefix,
    encode_prompts,
    extend_prompts,
    full_attention,
)
from lit_latent.latents import decode_latents
from lit_latent.records import adaptive_record, new_record


def shared_openings(rows: Sequence[Sequence[int]], min_shared: int = 16) -> list[tuple[int, list[int]]]:
    """Group token rows by a common opening: ``[(cut, members)]`` where every member starts
    with the same ``cut`` tokens and keeps at least one of its own.

    Rows are sorted, so rows with long shared openings are neighbours. The next row joins the
    current group when they share at least ``min_shared`` tokens and shortening the group's
    opening to that costs the members fewer re-encoded tokens than the row would save. A row
    alone keeps its last token.
    """

    groups: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(rows)), key=lambda i: list(rows[i])):
        if groups:
            cut, members = groups[-1]
            n = common_prefix(rows[members[0]], rows[i])
            if n >= min_shared and (len(members) == 1 or (cut - n) * len(members) < n):
                groups[-1] = (n if len(members) == 1 else min(cut, n), members + [i])
                continue
        groups.append((len(rows[i]), [i]))
    # every member keeps at least one token of its own to feed after the shared cache
    return [(min(cut, min(len(rows[m]) for m in members) - 1), members) for cut, members in groups]


class Engine:
    def __init__(self, model, tokenizer, cfg: AdaptConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._use_template = bool(getattr(tokenizer, "chat_template", None))
        self.truncated: set[str] = set()  # problems whose prompt was cut to data.max_prompt_tokens
        # verification openings encoded in this batch: their KV cache serves later candidates
        # of the same problem (first 32 tokens -> (tokens, per-layer keys and values))
        self._openings: dict[tuple[int, ...], tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    @property
    def device(self) -> torch.device:
        """Where token ids and masks go (the input embeddings' device; latents live on ``lm_head``'s,
        ``devices.output_device``, which differ only under a device map)."""
        return input_device(self.model)

    @property
    def lm_head(self) -> LogitHead:
        """Latents -> logits exactly as the model's forward makes them (lm_head, then any softcap or scale)."""
        return LogitHead(self.model)

    @property
    def reference_mode(self) -> bool:
        return self.cfg.perf.reference_mode

    @property
    def chunk(self) -> int:
        return 1 if self.reference_mode else self.cfg.perf.chunk

    def new_batch(self) -> None:
        self._openings.clear()  # a batch's verification openings do not outlive it

    # --- text <-> tokens ----------------------------------------------------------------

    def encode_messages(self, messages: Sequence[str]) -> list[list[int]]:
        """Token ids of user messages in the chat template, tokenized as one batch."""
        if not messages:
            return []
        texts = [chat_prompt(self.tokenizer, m) for m in messages]
        return self.tokenizer(texts, add_special_tokens=not self._use_template)["input_ids"]

    def encode(self, problems: Sequence[dict]) -> list[list[int]]:
        """Prompt ids of each problem, cut from the left to ``data.max_prompt_tokens``."""
        limit = self.cfg.data.max_prompt_tokens
        out = []
        for p, ids in zip(problems, self.encode_messages([user_message(p, self.cfg.data.prompt) for p in problems])):
            if len(ids) > limit:
                if p["id"] not in self.truncated:
                    warnings.warn(f"problem {p['id']}: prompt of {len(ids)} tokens cut to data.max_prompt_tokens={limit}")
                self.truncated.add(p["id"])
                ids = ids[-limit:]
            out.append(ids)
        return out

    def decode(self, tokens: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def token_at(self, tokens: Sequence[int], offset: int) -> int:
        """The index of the token that writes character ``offset`` of ``decode(tokens)`` (the
        first whose decoded prefix reaches past it; ``len(tokens)`` when none does)."""
        lo, hi = 0, len(tokens)
        while lo < hi:  # the decoded length grows with the prefix: bisect on it
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(tokens[: mid + 1], skip_special_tokens=True)) > offset:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def record(self, problem: dict, output: str, tokens: int) -> dict:
        """A method's record of ``problem`` (``lit_latent.records``); its status says if the prompt was cut."""
        return new_record(problem, self.cfg.method, output, tokens, problem["id"] in self.truncated)

    def adaptive_record(self, problem: dict, output: str, tokens: int, rewards: list[float], reward,
                        verdicts: Optional[dict] = None) -> dict:
        """A record whose initial answer ``output`` candidates may replace (``lit_latent.records``)."""
        return adaptive_record(problem, self.cfg.method, output, tokens, rewards, reward.uses_labels,
                               problem["id"] in self.truncated, verdicts)

    def describe_latents(self, latents: torch.Tensor) -> dict:
        """What latents decode to, for a record: token ids and text."""
        ids = decode_latents(self.lm_head, latents)
        return {"latent_tokens": ids, "latent_prefix": self.tokenizer.decode(ids)}

    def generator(self, problem_id: str, tag: str) -> torch.Generator:
        """A generator seeded by (seed, problem, purpose): samples do not depend on batching."""
        seed = zlib.crc32(f"{self.cfg.seed}:{problem_id}:{tag}".encode())
        return torch.Generator(device=self.device).manual_seed(seed)

    # --- generation -----------------------------------------------------------------------

    def prompt_state(self, prompts) -> Optional[PromptState]:
        """The prompts' KV cache, computed once per batch (none in reference mode)."""
        if self.reference_mode:
            return None
        return encode_prompts(self.model, prompts, self.pad_id)

    def generate(self, prompts, *, prefixes=None, sample: bool = False, generators=None, return_hidden=False,
                 max_new_tokens=None, prompt_state: Optional[PromptState] = None, lookup=None) -> Generation:
        """Greedy (or ``sample``d) answers to prompt ids (``generation.generate``). ``lookup``: per
        prompt, earlier answers to the same problem, in which drafts of the greedy answer's next
        tokens are looked up (``perf.draft_tokens``, ``drafts.py``)."""
        g = self.cfg.generation
        return generate(
            self.model,
            prompts,
            prefixes=prefixes,
            max_new_tokens=max_new_tokens or g.max_new_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            temperature=g.temperature if sample else 0.0,
            top_p=g.top_p,
            generators=generators,
            return_hidden=return_hidden,
            use_cache=not self.reference_mode,
            prompt_state=prompt_state,
            draft_tokens=self.cfg.perf.draft_tokens,
            draft_budget=self.cfg.perf.draft_budget,
            lookup=lookup,
        )

    def complete(self, messages: Sequence[str], max_new_tokens: int) -> tuple[list[str], list[int]]:
        """Greedy answers to user messages (verification prompts), batched in chunks.

        Messages that open with the same stretch of tokens (the checks of one candidate all
        restate its problem and solution) share one prefill of it on the fast path: each
        group's common opening is encoded once and its messages' own endings are packed after
        it in one sequence (``generate_branches``), each answered as if alone.
        """
        ids = self.encode_messages(messages)
        texts, counts = [""] * len(ids), [0] * len(ids)
        if self.reference_mode:
            for i, row in enumerate(ids):
                out = self.generate([row], max_new_tokens=max_new_tokens)
                texts[i], counts[i] = self.decode(out.tokens)[0], out.new_tokens[0]
            return texts, counts
        chunks: list[list[tuple[int, list[int]]]] = []
        # whole groups, at most perf.chunk messages where they allow; by opening length, so little padding
        for group in sorted(shared_openings(ids), key=lambda g: g[0]):
            if not chunks or sum(len(m) for _, m in chunks[-1]) + len(group[1]) > self.chunk:
                chunks.append([])
            chunks[-1].append(group)
        for chunk in chunks:
            heads = [ids[members[0]][:cut] for cut, members in chunk]
            state = self.encode_openings(heads)
            if full_attention(state.cache) and accepts_4d_mask(self.model):
                endings = [[ids[i][cut:] for i in members] for cut, members in chunk]
                tokens, new_tokens = generate_branches(self.model, state, endings, max_new_tokens=max_new_tokens,
                                                       eos_ids=self.eos_ids, pad_id=self.pad_id)
                for (_, members), group_tokens, group_counts in zip(chunk, tokens, new_tokens):
                    for i, t, n in zip(members, group_tokens, group_counts):
                        texts[i], counts[i] = self.decode([t])[0], n
                continue
            # sliding-window layers and ALiBi models need transformers' own masks: one row per message,
            # the opening's cache repeated
            rows = [(g, i, ids[i][cut:]) for g, (cut, members) in enumerate(chunk) for i in members]
            out = self.generate([heads[g] for g, _, _ in rows], prefixes=[tail for _, _, tail in rows],
                                max_new_tokens=max_new_tokens, prompt_state=state.select([g for g, _, _ in rows]))
            for k, (_, i, tail) in enumerate(rows):
                texts[i], counts[i] = self.decode([out.tokens[k][len(tail):]])[0], out.new_tokens[k]
        return texts, counts

    def encode_openings(self, heads: list[list[int]]) -> PromptState:
        """The KV cache of shared verification openings. An opening that starts like one
        encoded earlier in this batch (the same problem, another candidate solution: the
        problem and often the first lines match) continues from that one's cache."""
        found = []
        for head in heads:
            tokens, kv = self._openings.get(tuple(head[:32]), ([], None))
            n = min(common_prefix(tokens, head), len(head) - 1)  # the last token is encoded anew: it gives `last`
            found.append((n, kv) if n >= 16 else (0, None))
        if not any(n for n, _ in found):
            state = encode_prompts(self.model, heads, self.pad_id)
        else:
            # the known parts, right-aligned as a cache (a row with none is all padding), then the rest
            width = max(n for n, _ in found)
            mask = torch.zeros((len(heads), width), dtype=torch.long, device=self.device)
            for g, (n, _) in enumerate(found):
                mask[g, width - n :] = 1  # n = 0: nothing known, all padding
            pieces = [([g], width - n, [(k[:, :, :n], v[:, :, :n]) for k, v in kv]) for g, (n, kv) in enumerate(found) if n]
            cache = cache_from_pieces(self.model, len(heads), width, pieces)
            # every row has at least one token left to encode, so its last state comes from there
            known = PromptState(cache, mask, torch.empty(0, device=self.device))
            state, _ = extend_prompts(self.model, known, [h[n:] for h, (n, _) in zip(heads, found)], self.pad_id)
        if full_attention(state.cache):
            for g, head in enumerate(heads):
                real = state.mask[g].nonzero().squeeze(1)
                kv = []
                for layer in state.cache.layers:
                    at = real.to(layer.keys.device)  # under a device map each layer's cache sits on its own device
                    kv.append((layer.keys[g : g + 1, :, at], layer.values[g : g + 1, :, at]))
                self._openings[tuple(head[:32])] = (head, kv)
        return state

    def sample_answers(self, problems: Sequence[dict], n: int, tag: str) -> tuple[list[str], list[int]]:
        """n sampled answers per problem, as one batch: ``[p1, p2] -> [p1 x n, p2 x n]``."""
        prompts = self.encode(problems)
        rows = [(p, k) for p in problems for k in range(n)]
        gens = [self.generator(p["id"], f"{tag}:{k}") for p, k in rows]
        flat = [prompts[i] for i in range(len(problems)) for _ in range(n)]
        texts, counts = [], []
        for s in range(0, len(flat), self.chunk):
            out = self.generate(flat[s : s + self.chunk], sample=True, generators=gens[s : s + self.chunk])
            texts += self.decode(out.tokens)
            counts += out.new_tokens
        return texts, counts
