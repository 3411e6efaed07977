"""The adaptation LightningModule: test-time methods run inside ``predict_step``.

``Trainer(inference_mode=False).predict(module, datamodule)`` hands each batch of problems
to ``predict_step``, which runs the chosen method to the end and returns one plain record per
problem; the writer callback appends them to ``predictions.jsonl``.

LatentSeek (ALGORITHMS.md §1) is ``latent_seek`` below, top to bottom: greedy CoT with its
latents, then up to K rounds of reward -> policy-gradient step on the first L latents ->
decode them to a prefix -> let the model finish the answer. The model's weights are frozen;
the loss goes through ``lm_head`` only, never back through the transformer.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from typing import Any, Optional, Sequence

import lightning as L
import torch

from callbacks.rewards import RewardCallback, Scores, find_reward, majority_answer
from lit_latent.answers import extract_answer, is_equivalent
from lit_latent.config import AdaptConfig
from lit_latent.data import num_choices, user_message
from lit_latent.generation import (
    Generation,
    PromptState,
    ReservedLayer,
    chat_prompt,
    encode_prompts,
    eos_token_ids,
    extend_prompts,
    full_attention,
    generate,
    generate_branches,
    new_cache,
)
from lit_latent.latents import (
    baseline_value,
    decode_latents,
    keep_through_first_change,
    latent_count,
    momentum_init,
    policy_loss,
    sample_latents,
    token_log_probs,
)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


class LatentAdaptationModule(L.LightningModule):
    def __init__(self, model, tokenizer, cfg: AdaptConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.automatic_optimization = False
        self.model.requires_grad_(False)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._use_template = bool(getattr(tokenizer, "chat_template", None))
        self._truncated: set[str] = set()
        # LatentEvolve: the episodic memory (set by the entry point) and the latent weaver
        # (loaded from a checkpoint, or handed over by the night callback)
        self.memory = None
        self.weaver: Optional[torch.nn.Module] = None
        self._logged_batches = 0  # x axis of the reward curves in logs/metrics.csv
        # verification openings encoded in this batch: their KV cache serves later candidates
        # of the same problem (first 32 tokens -> (tokens, per-layer keys and values))
        self._openings: dict[tuple[int, ...], tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def setup(self, stage: str) -> None:
        if self.cfg.perf.compile and not getattr(self, "_compiled", False):
            # dynamic shapes: batch and cache lengths change at every step
            self.model.base_model.forward = torch.compile(self.model.base_model.forward, dynamic=True)
            self._compiled = True

    def configure_optimizers(self):
        return None  # latent optimizers are made per batch, inside predict_step

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    # --- text <-> tokens ----------------------------------------------------------------

    def encode_message(self, message: str) -> list[int]:
        return self.encode_messages([message])[0]

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
                if p["id"] not in self._truncated:
                    warnings.warn(f"problem {p['id']}: prompt of {len(ids)} tokens cut to data.max_prompt_tokens={limit}")
                self._truncated.add(p["id"])
                ids = ids[-limit:]
            out.append(ids)
        return out

    def decode(self, tokens: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def generator(self, problem_id: str, tag: str) -> torch.Generator:
        """A generator seeded by (seed, problem, purpose): samples do not depend on batching."""
        seed = zlib.crc32(f"{self.cfg.seed}:{problem_id}:{tag}".encode())
        return torch.Generator(device=self.device).manual_seed(seed)

    # --- generation services (also used by reward callbacks) -----------------------------

    @property
    def chunk(self) -> int:
        return 1 if self.cfg.perf.reference_mode else self.cfg.perf.chunk

    def prompt_state(self, prompts) -> Optional[PromptState]:
        """The prompts' KV cache, computed once per batch (none in reference mode)."""
        if self.cfg.perf.reference_mode:
            return None
        return encode_prompts(self.model, prompts, self.pad_id)

    def generate(self, prompts, *, prefixes=None, sample: bool = False, generators=None, return_hidden=False,
                 max_new_tokens=None, prompt_state: Optional[PromptState] = None) -> Generation:
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
            use_cache=not self.cfg.perf.reference_mode,
            prompt_state=prompt_state,
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
        if self.cfg.perf.reference_mode:
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
            if full_attention(state.cache):
                endings = [[ids[i][cut:] for i in members] for cut, members in chunk]
                tokens, new_tokens = generate_branches(self.model, state, endings, max_new_tokens=max_new_tokens,
                                                       eos_ids=self.eos_ids, pad_id=self.pad_id)
                for (_, members), group_tokens, group_counts in zip(chunk, tokens, new_tokens):
                    for i, t, n in zip(members, group_tokens, group_counts):
                        texts[i], counts[i] = self.decode([t])[0], n
                continue
            # sliding-window layers need transformers' own masks: one row per message, the opening's cache repeated
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
            cache = new_cache(self.model, room=256)
            reference = next(kv for n, kv in found if n)
            cache.layers = []
            for layer, (k0, v0) in enumerate(reference):
                keys = k0.new_zeros(len(heads), k0.shape[1], width, k0.shape[3])
                values = v0.new_zeros(len(heads), v0.shape[1], width, v0.shape[3])
                for g, (n, kv) in enumerate(found):
                    if n:
                        keys[g, :, width - n :], values[g, :, width - n :] = kv[layer][0][0, :, :n], kv[layer][1][0, :, :n]
                        mask[g, width - n :] = 1
                cache.layers.append(ReservedLayer.holding(keys, values))
            # every row has at least one token left to encode, so its last state comes from there
            known = PromptState(cache, mask, torch.empty(0, device=self.device))
            state, _ = extend_prompts(self.model, known, [h[n:] for h, (n, _) in zip(heads, found)], self.pad_id)
        if full_attention(state.cache):
            for g, head in enumerate(heads):
                real = state.mask[g].nonzero().squeeze(1)
                kv = [(layer.keys[g : g + 1, :, real], layer.values[g : g + 1, :, real]) for layer in state.cache.layers]
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

    # --- records ------------------------------------------------------------------------

    def judge(self, problem: dict, output: str) -> tuple[Optional[str], bool]:
        choices = num_choices(problem)
        answer = extract_answer(output, choices)
        return answer, is_equivalent(problem["answer"], answer, choices)

    def record(self, problem: dict, output: str, tokens: int) -> dict[str, Any]:
        answer, correct = self.judge(problem, output)
        rec = {
            "id": problem["id"],
            "method": self.cfg.method,
            "problem": problem["problem"],
            "gold": problem["answer"],
            "output": output,
            "final_answer": answer,
            "correct": correct,
            "tokens": tokens,
            "status": "ok",
        }
        if problem["id"] in self._truncated:
            rec["status"] = "prompt_truncated"
        return rec

    # --- predict --------------------------------------------------------------------------

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[dict[str, Any]]:
        start = time.perf_counter()
        method = {
            "cot": self.chain_of_thought,
            "latentseek": self.latent_seek,
            "resample": self.resample,
            "self_consistency": self.self_consistency,
            "best_of_n": self.best_of_n,
            "latentevolve": self.latent_evolve,
        }.get(self.cfg.method)
        if method is None:
            raise ValueError(f"method {self.cfg.method!r} is not run by {type(self).__name__}")
        self._openings.clear()  # a batch's verification openings do not outlive it
        # Lightning wraps predict in no_grad even with inference_mode=False
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.perf.autocast)
        with torch.enable_grad(), autocast:
            records = method(batch)
        seconds = (time.perf_counter() - start) / max(1, len(batch))
        for rec in records:
            rec["seconds"] = seconds
        return records

    def chain_of_thought(self, problems: list[dict]) -> list[dict]:
        out = self.generate(self.encode(problems))
        return [self.record(p, text, n) for p, text, n in zip(problems, self.decode(out.tokens), out.new_tokens)]

    def self_consistency(self, problems: list[dict]) -> list[dict]:
        """N sampled chains, majority vote on the extracted answers (ties: first seen)."""
        n = self.cfg.generation.num_samples
        texts, counts = self.sample_answers(problems, n, tag="sc")
        records = []
        for k, p in enumerate(problems):
            mine = texts[k * n : (k + 1) * n]
            answers = [extract_answer(t, num_choices(p)) for t in mine]
            vote = majority_answer(answers, num_choices(p))
            # the output shown is the first chain that voted for the winner
            chosen = next((t for t, a in zip(mine, answers) if vote is not None and a is not None and is_equivalent(vote, a, num_choices(p))), mine[0])
            rec = self.record(p, chosen, sum(counts[k * n : (k + 1) * n]))
            rec["samples"] = [{"answer": a} for a in answers]
            records.append(rec)
        return records

    def best_of_n(self, problems: list[dict]) -> list[dict]:
        """N sampled chains, the one the reward callback scores highest (ties: first)."""
        reward = find_reward(self.trainer)
        n = self.cfg.generation.num_samples
        texts, counts = self.sample_answers(problems, n, tag="bon")
        owners = [p for p in problems for _ in range(n)]
        scores = reward.score(self, owners, texts)
        records = []
        for k, p in enumerate(problems):
            rs = scores.rewards[k * n : (k + 1) * n]
            best = max(range(n), key=lambda j: (rs[j], -j))
            spent = sum(counts[k * n : (k + 1) * n]) + sum(scores.tokens[k * n : (k + 1) * n])
            rec = self.record(p, texts[k * n + best], spent)
            rec["samples"] = [{"answer": extract_answer(t, num_choices(p)), "reward": r} for t, r in zip(texts[k * n : (k + 1) * n], rs)]
            rec["reward_uses_labels"] = reward.uses_labels
            records.append(rec)
        return records

    def resample(self, problems: list[dict]) -> list[dict]:
        """Control for LatentSeek: the same reward and stopping rule, but each new candidate
        is a fresh sampled answer instead of one decoded from optimized latents."""
        cfg = self.cfg.latent
        reward = find_reward(self.trainer)
        prompts = self.encode(problems)
        state = self.prompt_state(prompts)
        first = self.generate(prompts, prompt_state=state)
        texts = self.decode(first.tokens)
        scores = reward.score(self, problems, texts)
        records = [self.start_adaptive_record(p, texts[i], first.new_tokens[i], scores, i, reward) for i, p in enumerate(problems)]
        active = [i for i in range(len(problems)) if scores.rewards[i] < cfg.stop_threshold]
        for step in range(cfg.max_iterations):
            if not active:
                break
            gens = [self.generator(problems[i]["id"], f"resample:{step}") for i in active]
            out = self.generate([prompts[i] for i in active], sample=True, generators=gens, prompt_state=state and state.select(active))
            texts = self.decode(out.tokens)
            scores = reward.score(self, [problems[i] for i in active], texts)
            for k, i in enumerate(active):
                self.add_candidate(records[i], problems[i], texts[k], out.new_tokens[k], scores, k)
            active = [i for k, i in enumerate(active) if scores.rewards[k] < cfg.stop_threshold]
        self.log_rewards(records)
        return records

    def latent_seek(self, problems: list[dict]) -> list[dict]:
        """ALGORITHMS.md §1, for a batch of problems, each with its own latents.

        At most ``perf.max_active`` problems adapt at once (0: the whole batch); when one
        stops, the next problem of the batch takes its slot, so long adaptations do not leave
        the batch half empty (continuous batching).
        """
        cfg = self.cfg.latent
        reward = find_reward(self.trainer)
        head = self.lm_head
        n = len(problems)
        width = self.cfg.perf.max_active or n
        prompts = self.encode(problems)
        state = self.prompt_state(prompts)  # the prompts' cache serves every candidate
        records: list[dict] = [{} for _ in range(n)]
        latents: list[Optional[torch.Tensor]] = [None] * n
        original: list[list[int]] = [[] for _ in range(n)]
        current, steps = [0.0] * n, [0] * n
        samplers = [self.generator(p["id"], "latent") for p in problems]
        optimizer: Optional[torch.optim.Optimizer] = None
        pending, active = list(range(n)), []
        # per problem, prefix tried -> (text, reward): with greedy continuations and a
        # deterministic reward, a prefix met again gives the same candidate, so it is reused
        # (the reference regenerates it; answers and rewards are the same either way)
        tried: list[dict[tuple[int, ...], tuple[str, float]]] = [{} for _ in range(n)]
        reuse = reward.deterministic and not self.cfg.perf.reference_mode
        while pending or active:
            # 1. newcomers: greedy chain of thought with its latents, and its reward
            new, pending = pending[: width - len(active)], pending[width - len(active) :]
            if new:
                first = self.generate([prompts[i] for i in new], return_hidden=True, prompt_state=state and state.select(new))
                texts = self.decode(first.tokens)
                scores = reward.score(self, [problems[i] for i in new], texts)
                for k, i in enumerate(new):
                    records[i] = self.start_adaptive_record(problems[i], texts[k], first.new_tokens[k], scores, k, reward)
                    current[i] = scores.rewards[k]
                    # 2. the latents to optimize: the first L = min(floor(rho T), L_max) of the answer
                    count = latent_count(len(first.tokens[k]), cfg.rho, cfg.max_latents)
                    latents[i] = first.hidden[k][:count].detach().clone().float().requires_grad_(True)
                    original[i] = first.tokens[k][:count]
                    if first.finished[k]:  # else a continuation of its prefix gets max_new_tokens more
                        tried[i][tuple(original[i])] = (texts[k], scores.rewards[k])
                    if count == 0 or current[i] >= cfg.stop_threshold:
                        continue
                    # one Adam over all problems: a finished problem's grad stays None, so Adam skips it
                    if optimizer is None:
                        optimizer = torch.optim.Adam([latents[i]], lr=cfg.lr)
                    else:
                        optimizer.add_param_group({"params": [latents[i]]})
                    active.append(i)
            if not active:
                continue
            stepped = list(active)
            for i in active:
                steps[i] += 1
            if cfg.samples == 1:
                # 3-5. REINFORCE on the tokens the latents decode to, then a new candidate
                losses = {}
                for i in active:
                    tokens = torch.tensor(decode_latents(head, latents[i]), device=self.device)
                    losses[i] = policy_loss(token_log_probs(head, latents[i], tokens).sum(), current[i] - 1.0)
                active = self.optimizer_step(optimizer, latents, losses, records)
                prefixes = {i: tuple(self.prefix(decode_latents(head, latents[i]), original[i])) for i in active}
                fresh = [i for i in active if not (reuse and prefixes[i] in tried[i])]
                if fresh:
                    out = self.generate([prompts[i] for i in fresh], prefixes=[list(prefixes[i]) for i in fresh],
                                        prompt_state=state and state.select(fresh))
                    texts = self.decode(out.tokens)
                    scores = reward.score(self, [problems[i] for i in fresh], texts)
                    for k, i in enumerate(fresh):
                        if self.numerical_error(records[i], "reward", scores.rewards[k]):
                            continue  # the problem keeps its last good candidate
                        current[i] = scores.rewards[k]
                        tried[i][prefixes[i]] = (texts[k], scores.rewards[k])
                        self.add_candidate(records[i], problems[i], texts[k], out.new_tokens[k], scores, k, latents[i])
                for i in set(active) - set(fresh):  # nothing generated, nothing scored
                    text, current[i] = tried[i][prefixes[i]]
                    self.add_candidate(records[i], problems[i], text, 0, Scores([current[i]], [0]), 0, latents[i])
            else:
                # M sampled prefixes per problem, Q compared with latent.baseline, the best sample is the candidate
                m = cfg.samples
                rows, texts, rewards, spent = self.sampled_candidates(
                    active, m, latents, cfg.sample_temperature, samplers, prompts, problems, state, reward,
                    cut=lambda i, x: self.prefix(x, original[i]), seen=tried if reuse else None)
                losses = {}
                for k, i in enumerate(active):
                    q = rewards[k * m : (k + 1) * m]
                    if self.numerical_error(records[i], "reward", sum(q)):
                        continue
                    base = baseline_value(cfg.baseline, q)
                    losses[i] = self.samples_loss(latents[i], [x for _, x in rows[k * m : (k + 1) * m]], q, base, cfg.sample_temperature)
                    best = max(range(m), key=lambda j: (q[j], -j))
                    current[i] = q[best]
                    self.add_candidate(records[i], problems[i], texts[k * m + best], sum(spent[k * m : (k + 1) * m]),
                                       Scores([q[best]], [0]), 0)
                active = self.optimizer_step(optimizer, latents, losses, records)
                for i in active:  # what the updated latents now decode to
                    self.note_latents(records[i]["candidates"][-1], latents[i])
            # 6. a problem stops once its reward passes the threshold, or after K iterations;
            # its latents and Adam state leave the optimizer (slots are refilled from `pending`)
            active = [i for i in active if current[i] < cfg.stop_threshold and steps[i] < cfg.max_iterations]
            stopped = [latents[i] for i in stepped if i not in active]
            for z in stopped:
                optimizer.state.pop(z, None)
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if not any(g["params"][0] is z for z in stopped)]
        if cfg.answer == "best":
            for rec in records:
                self.choose_best_candidate(rec)
        self.log_rewards(records)
        return records

    def latent_evolve(self, problems: list[dict]) -> list[dict]:
        """LatentEvolve's daytime (ALGORITHMS.md §2) for a batch of problems.

        z_base (first L' latents of the greedy CoT) -> weaver -> momentum transfer from the
        top-k remembered neighbours -> K steps of policy gradient with M sampled outputs ->
        greedy answer from z*. Each record carries ``_archive`` (e, z_base, z*, mean reward)
        for the memory callback, which archives it when the mean reward reaches tau.
        """
        cfg = self.cfg.evolve
        reward = find_reward(self.trainer)
        head = self.lm_head
        m = cfg.samples

        # 1. e (the prompt's final post-norm state) and z_base (first L' latents of the greedy CoT)
        prompts = self.encode(problems)
        state = encode_prompts(self.model, prompts, self.pad_id)
        first = self.generate(prompts, return_hidden=True, prompt_state=None if self.cfg.perf.reference_mode else state)
        texts = self.decode(first.tokens)
        records = []
        for i, p in enumerate(problems):
            rec = self.record(p, texts[i], first.new_tokens[i])
            rec.update(initial_output=texts[i], initial_answer=rec["final_answer"], initial_correct=rec["correct"],
                       iterations=0, rewards=[], candidates=[], reward_uses_labels=reward.uses_labels)
            records.append(rec)
        e = state.last.float()
        z_base = [h[: cfg.latent_count].detach().float() for h in first.hidden]
        # evolve.stop_threshold: a CoT the reward already passes is kept as it is (LatentSeek's rule)
        passed: set[int] = set()
        if cfg.stop_threshold is not None:
            cot = reward.score(self, problems, texts)
            for i, rec in enumerate(records):
                rec["tokens"] += cot.tokens[i]
                rec["cot_reward"] = cot.rewards[i]
            passed = {i for i, q in enumerate(cot.rewards) if q >= cfg.stop_threshold}
        # answers shorter than L' cannot be compared with the memory: they stay greedy CoT
        usable = [i for i, z in enumerate(z_base) if z.shape[0] == cfg.latent_count and i not in passed]

        # 2-4. weaver, retrieval, momentum transfer
        latents: list[Optional[torch.Tensor]] = [None] * len(problems)
        if usable:
            zb = torch.stack([z_base[i] for i in usable])
            with torch.no_grad():
                woven = self.weaver(e[usable], zb).float() if self.weaver is not None else zb
            found = self.memory.search(e[usable], cfg.top_k) if self.memory is not None and len(self.memory) else None
            for k, i in enumerate(usable):
                z0 = woven[k]
                if found is not None:
                    nb = found[k]
                    z0 = momentum_init(z0, nb.e, e[i], nb.z_star, nb.z_base)
                    records[i]["neighbours"] = list(nb.ids)
                # evolve.rho: the answer's later latents are refined too, from the CoT's own
                refined = latent_count(len(first.tokens[i]), cfg.rho, len(first.tokens[i])) if cfg.rho else 0
                tail = first.hidden[i][cfg.latent_count : refined].float()
                latents[i] = torch.cat([z0, tail]).detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z for z in latents if z is not None], lr=cfg.lr) if usable else None
        samplers = [self.generator(p["id"], "evolve") for p in problems]
        # evolve.regenerate_after_first_change: a prefix ends at its first token that differs from the CoT's
        original = [t[: len(z)] if z is not None else [] for t, z in zip(first.tokens, latents)]
        cut = (lambda i, x: keep_through_first_change(x, original[i])) if cfg.regenerate_after_first_change else None

        # 5. refine: M sampled outputs per step, Q compared with evolve.baseline, stop after `patience` steps without gain
        # (a deterministic reward scores each distinct prefix once per problem)
        seen = [{} for _ in problems] if reward.deterministic and not self.cfg.perf.reference_mode else None
        best = {i: float("-inf") for i in usable}
        stale = {i: 0 for i in usable}
        last_mean = {i: 0.0 for i in usable}
        # evolve.answer=best: the latents whose M samples scored the highest mean, and that mean
        best_latents = {i: latents[i].detach().clone() for i in usable}
        # evolve.answer=sample: the highest-reward output so far, (reward, text); the scored CoT starts it
        best_sample = {i: (records[i].get("cot_reward", float("-inf")), None) for i in usable}
        active = list(usable)
        for step in range(cfg.max_steps):
            if not active:
                break
            rows, outs, rewards, spent = self.sampled_candidates(
                active, m, latents, cfg.sample_temperature, samplers, prompts, problems,
                None if self.cfg.perf.reference_mode else state, reward, cut, seen=seen)
            losses = {}
            for k, i in enumerate(active):
                q = rewards[k * m : (k + 1) * m]
                if self.numerical_error(records[i], "reward", sum(q)):
                    continue
                mean = sum(q) / m
                base = baseline_value(cfg.baseline, q)
                losses[i] = self.samples_loss(latents[i], [x for _, x in rows[k * m : (k + 1) * m]], q, base, cfg.sample_temperature)
                top = max(range(m), key=lambda j: (q[j], -j))
                answer, correct = self.judge(problems[i], outs[k * m + top])
                rec = records[i]
                rec["rewards"].append(mean)
                rec["iterations"] += 1
                rec["tokens"] += sum(spent[k * m : (k + 1) * m])
                rec["candidates"].append({"reward": mean, "best_reward": q[top], "answer": answer, "correct": correct})
                last_mean[i] = mean
                if q[top] > best_sample[i][0]:
                    best_sample[i] = (q[top], outs[k * m + top])
                if mean > best[i]:
                    best[i], stale[i] = mean, 0
                    best_latents[i] = latents[i].detach().clone()
                else:
                    stale[i] += 1
            active = [i for i in self.optimizer_step(optimizer, latents, losses, records) if stale[i] < cfg.patience]

        # 6. answer greedily from z* (evolve.answer=sample: the best sampled output instead)
        if usable and cfg.answer in ("best", "sample"):
            for i in usable:
                if records[i]["rewards"]:
                    latents[i], last_mean[i] = best_latents[i], best[i]
        if usable:
            if cfg.answer == "sample":
                final_texts = [records[i]["output"] if best_sample[i][1] is None else best_sample[i][1] for i in usable]
                new_tokens = [0] * len(usable)
            else:
                prefixes = [decode_latents(head, latents[i]) for i in usable]
                if cut:
                    prefixes = [cut(i, x) for i, x in zip(usable, prefixes)]
                out = self.generate([prompts[i] for i in usable], prefixes=prefixes,
                                    prompt_state=None if self.cfg.perf.reference_mode else state.select(usable))
                final_texts, new_tokens = self.decode(out.tokens), out.new_tokens
            for k, i in enumerate(usable):
                answer, correct = self.judge(problems[i], final_texts[k])
                rec = records[i]
                rec.update(output=final_texts[k], final_answer=answer, correct=correct)
                rec["tokens"] += new_tokens[k]
                rec["final_mean_reward"] = last_mean[i]
                self.note_latents(rec, latents[i])
                # 7. what the memory callback archives (when final_mean_reward >= tau): the memory's L' latents
                z_star = latents[i][: cfg.latent_count].detach().cpu()
                rec["_archive"] = {"e": e[i].detach().cpu(), "z_base": z_base[i].cpu(), "z_star": z_star, "score": last_mean[i]}
        self.log_rewards([r for r in records if r["rewards"]] or records)
        return records

    def sampled_candidates(self, active, m, latents, temperature, samplers, prompts, problems, state, reward,
                           cut=None, seen=None) -> tuple[list, list[str], list[float], list[int]]:
        """M prefixes per active problem sampled from its latent policy, finished by the model
        and scored: ``[i1, i2] -> rows [i1 x M, i2 x M]``, with per row its text, reward and the
        tokens spent on it. ``cut`` may shorten each prefix.

        ``seen`` (per problem: prefix -> (text, reward)) is for a deterministic reward: the
        continuations are greedy, so a prefix met before (in this step or an earlier one) gives
        the same text and reward, and is neither generated nor scored again (0 tokens). Peaked
        latents make most of the M samples the same prefix.
        """
        rows = []
        for i in active:
            for _ in range(m):
                prefix = sample_latents(self.lm_head, latents[i], temperature, samplers[i])
                rows.append((i, tuple(cut(i, prefix) if cut else prefix)))
        fresh, picked = [], set()  # rows to generate: the first of each new (problem, prefix)
        for r, (i, x) in enumerate(rows):
            if seen is None or (x not in seen[i] and (i, x) not in picked):
                fresh.append(r)
                picked.add((i, x))
        texts, rewards, spent = [""] * len(rows), [0.0] * len(rows), [0] * len(rows)
        if fresh:
            out = self.generate([prompts[rows[r][0]] for r in fresh], prefixes=[list(rows[r][1]) for r in fresh],
                                prompt_state=state and state.select([rows[r][0] for r in fresh]))
            fresh_texts = self.decode(out.tokens)
            scores = reward.score(self, [problems[rows[r][0]] for r in fresh], fresh_texts)
            for k, r in enumerate(fresh):
                texts[r], rewards[r] = fresh_texts[k], scores.rewards[k]
                spent[r] = out.new_tokens[k] + scores.tokens[k]
                if seen is not None:
                    seen[rows[r][0]][rows[r][1]] = (texts[r], rewards[r])
        for r in set(range(len(rows))) - set(fresh):  # met before: the same text and reward, no cost
            i, x = rows[r]
            texts[r], rewards[r] = seen[i][x]
        return [(i, list(x)) for i, x in rows], texts, rewards, spent

    def samples_loss(self, latents: torch.Tensor, sampled: list[list[int]], rewards: list[float], base: float, temperature: float) -> torch.Tensor:
        """``-(1/M) sum_m (Q_m - base) log p(x^m | z)`` over M prefixes sampled from the latent policy."""
        m = len(sampled)
        terms = []
        for tokens, q in zip(sampled, rewards):
            lp = token_log_probs(self.lm_head, latents[: len(tokens)], torch.tensor(tokens, device=self.device), temperature)
            terms.append(policy_loss(lp.sum(), (q - base) / m))
        return torch.stack(terms).sum()

    def optimizer_step(self, optimizer, latents: list, losses: dict[int, torch.Tensor], records: list[dict]) -> list[int]:
        """One step on the latents of the problems in ``losses``; returns those still healthy.

        A non-finite loss, or latents that turn non-finite, end that problem's adaptation: its
        latents are restored, it keeps its last good candidate, its record says what happened.
        """
        healthy = {i: loss for i, loss in losses.items() if not self.numerical_error(records[i], "loss", loss)}
        if not healthy:
            return []
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(torch.stack(list(healthy.values())).sum())
        before = {i: latents[i].detach().clone() for i in healthy}
        optimizer.step()
        for i in healthy:
            if not bool(torch.isfinite(latents[i]).all()):
                with torch.no_grad():
                    latents[i].copy_(before[i])
                self.numerical_error(records[i], "latents", float("nan"))
        return [i for i in healthy if records[i]["status"] != "numerical_error"]

    @staticmethod
    def numerical_error(record: dict, what: str, value) -> bool:
        """Flag a NaN/inf ``value`` in the record; True when it was not finite."""
        value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if math.isfinite(value):
            return False
        record["status"] = "numerical_error"
        record["numerical_error"] = f"non-finite {what} at iteration {record.get('iterations', 0) + 1}"
        return True

    def prefix(self, decoded: list[int], original: list[int]) -> list[int]:
        if self.cfg.latent.regenerate_after_first_change:
            return keep_through_first_change(decoded, original)
        return decoded

    # --- adaptive records ---------------------------------------------------------------

    def start_adaptive_record(self, problem, output, new_tokens, scores: Scores, k: int, reward: RewardCallback) -> dict:
        rec = self.record(problem, output, new_tokens + scores.tokens[k])
        rec.update(
            initial_output=output,
            initial_answer=rec["final_answer"],
            initial_correct=rec["correct"],
            iterations=0,
            rewards=[scores.rewards[k]],
            candidates=[],
            reward_uses_labels=reward.uses_labels,
        )
        if scores.details:
            rec["initial_verdicts"] = scores.details[k]
        return rec

    def add_candidate(self, rec: dict, problem: dict, output: str, new_tokens: int, scores: Scores, k: int, latents=None) -> None:
        """The newest candidate becomes the answer (the paper returns the last candidate)."""
        answer, correct = self.judge(problem, output)
        candidate = {"reward": scores.rewards[k], "answer": answer, "correct": correct, "tokens": new_tokens + scores.tokens[k], "output": output}
        if latents is not None:
            self.note_latents(candidate, latents)
        rec["candidates"].append(candidate)
        rec["rewards"].append(scores.rewards[k])
        rec["iterations"] += 1
        rec["tokens"] += new_tokens + scores.tokens[k]
        rec.update(output=output, final_answer=answer, correct=correct)

    @staticmethod
    def choose_best_candidate(rec: dict) -> None:
        """Answer with the highest-reward candidate (the initial answer counts; earliest on ties)."""
        options = [(rec["rewards"][0], rec["initial_output"], rec["initial_answer"], rec["initial_correct"])]
        options += [(c["reward"], c["output"], c["answer"], c["correct"]) for c in rec["candidates"]]
        best = max(range(len(options)), key=lambda k: (options[k][0], -k))
        _, rec["output"], rec["final_answer"], rec["correct"] = options[best]
        rec["chosen_candidate"] = best

    def note_latents(self, candidate: dict, latents: torch.Tensor) -> None:
        ids = decode_latents(self.lm_head, latents)
        candidate["latent_tokens"] = ids
        candidate["latent_prefix"] = self.tokenizer.decode(ids)

    def log_rewards(self, records: list[dict]) -> None:
        """Mean reward by iteration for this batch, to the logger (CSV in the run folder)."""
        if self.logger is None or not any(r["rewards"] for r in records):
            return
        records = [r for r in records if r["rewards"]]
        depth = max(len(r["rewards"]) for r in records)
        metrics = {}
        for k in range(depth):
            # a problem that stopped early keeps its last reward for later iterations
            values = [r["rewards"][min(k, len(r["rewards"]) - 1)] for r in records]
            metrics[f"reward_iter{k}"] = sum(values) / len(values)
        self.logger.log_metrics(metrics, step=self._logged_batches)
        self._logged_batches += 1
