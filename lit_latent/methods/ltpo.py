"""LTPO (docs/algorithms.md §5): per problem, K "thought" vectors placed in the prompt are tuned
for the frozen model's confidence at them; then the model answers once, greedily, with the best.

For each problem: the prompt is the problem, a sentence saying that K special tokens follow that
hold compressed reasoning the model may use or ignore, K placeholder tokens, then the assistant
turn; the thoughts H start as the placeholders' input embeddings. Each step samples noisy
thoughts A = H + sigma eps, runs the model on the prompt's embeddings with A in place (nothing
is generated), scores the confidence at the thought positions (the mean over positions of the
mean -log p of the top-k tokens, ``rewards.top_k_confidence``), moves H by Adam to raise it, and
shrinks sigma. The thoughts of the best-scored step answer. All problems of a batch step together
in one forward pass; each draws its noise from its own generator.
"""

from __future__ import annotations

import math
import warnings

import torch

from lit_latent.config import LtpoConfig, UserError
from lit_latent.data import user_message
from lit_latent.engine import Engine
from lit_latent.generation import chat_prompt
from lit_latent.kvcache import _left_pad, _positions, encode_prompt_embeddings, holds_kv_cache
from lit_latent.records import numerical_error
from lit_latent.rerun import generate_from_embeddings
from lit_latent.rewards import confidence_reward, top_k_confidence

THOUGHTS_SENTENCE = ("The {k} special tokens at the end of this message hold compressed reasoning about the problem. "
                     "Use them if they help; if not, ignore them and solve the problem yourself. The {k} tokens:")
MARK = "\u0000THOUGHTS\u0000"  # where the placeholders go in the chat prompt's text


def ltpo(engine: Engine, problems: list[dict], cfg: LtpoConfig, top_k: int) -> list[dict]:
    n, K, model = len(problems), cfg.thoughts, engine.model
    placeholders = placeholder_ids(engine, cfg.placeholder, K)
    # 1. prompts with K placeholders; H0: their input embeddings
    rows, starts = thought_prompts(engine, problems, placeholders)
    ids, mask = _left_pad(rows, engine.pad_id, engine.device)
    embeds = model.get_input_embeddings()(ids).detach()  # [n, S, d]; the model's weights stay frozen
    at = torch.tensor([ids.shape[1] - len(r) + s for r, s in zip(rows, starts)], device=ids.device)[:, None] \
        + torch.arange(K, device=ids.device)  # [n, K]: the thought positions in the padded rows
    row_of = torch.arange(n, device=ids.device)[:, None].expand(n, K)
    thoughts = embeds[row_of, at].clone().requires_grad_(True)  # H: [n, K, d]
    optimizer = torch.optim.Adam([thoughts], lr=cfg.lr, maximize=True)
    generators = [engine.generator(p["id"], "ltpo") for p in problems]
    threshold = math.inf if cfg.stop_threshold is None else cfg.stop_threshold

    searches = [thought_search(K, engine.tokenizer.decode(placeholders[:1])) for _ in problems]
    best_score = [-math.inf] * n
    best = thoughts.detach().clone()  # a problem whose every step fails numerically answers with H0
    active, sigma = list(range(n)), cfg.sigma
    for step in range(cfg.steps):
        if not active:
            break
        # 2. noisy thoughts A = H + sigma eps, in place of the placeholders; one forward pass, no generation
        index = torch.tensor(active, device=ids.device)
        eps = torch.stack([torch.randn(K, thoughts.shape[-1], generator=generators[i], device=ids.device) for i in active])
        noisy = thoughts[index] + sigma * eps.to(thoughts.dtype)
        inputs = embeds[index].index_put((row_of[: len(active)], at[index]), noisy)
        states = model.base_model(inputs_embeds=inputs, attention_mask=mask[index], position_ids=_positions(mask[index]),
                                  use_cache=False).last_hidden_state
        # 3. the confidence at the thought positions, averaged over them: [active]
        thought_states = states[row_of[: len(active)].to(states.device), at[index].to(states.device)]  # device map: the last layer's device
        scores = top_k_confidence(engine.lm_head(thought_states), top_k).mean(-1)
        # 4. raise it: through the model (autograd), or by the score-function estimate R eps / sigma (reinforce)
        if cfg.gradient == "autograd":
            objective = scores.sum()
        else:
            log_policy = -((noisy.detach() - thoughts[index]) ** 2).sum((1, 2)) / (2 * sigma**2)
            objective = (scores.detach().to(log_policy.device) * log_policy).sum()  # device map: scores come from lm_head's device
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        # 5. keep each problem's best-scored thoughts; a problem stops at ltpo.stop_threshold
        for k, i in enumerate(active):
            score = float(scores[k].detach())
            if numerical_error(searches[i], "confidence", score):
                continue
            reward = confidence_reward(score, top_k)
            searches[i]["candidates"].append({"reward": reward, "confidence": score, "sigma": sigma, "tokens": 0, "generations": 0})
            searches[i]["rewards"].append(reward)
            searches[i]["iterations"] += 1
            if score > best_score[i]:
                best_score[i] = score
                best[i] = (thoughts[i] if cfg.keep == "updated" else noisy[k]).detach()
                searches[i]["chosen_step"] = step
        sigma *= cfg.sigma_decay
        # a problem whose confidence was not finite stops too: its thoughts would only carry NaNs on
        active = [i for i in active if "numerical_error" not in searches[i]
                  and (not searches[i]["rewards"] or searches[i]["rewards"][-1] < threshold)]

    # 6. the answer: greedy generation from the prompt with the best thoughts in place
    with torch.no_grad():
        final = embeds.index_put((row_of, at), best.to(embeds.dtype))
        if holds_kv_cache(model):
            out = engine.generate([[] for _ in problems], prompt_state=encode_prompt_embeddings(model, final, mask))
        else:  # recurrent states (kvcache.holds_kv_cache): the embeddings are re-run at every step
            out = generate_from_embeddings(model, final, mask, max_new_tokens=engine.cfg.generation.max_new_tokens,
                                           eos_ids=engine.eos_ids, pad_id=engine.pad_id)
    records = []
    for p, search, text, count in zip(problems, searches, engine.decode(out.tokens), out.new_tokens):
        records.append(engine.record(p, text, count))
        records[-1].update(search)  # after: a numerical error's status stays
    return records


def thought_search(k: int, placeholder: str) -> dict:
    """A problem's search, as its record shows it: one candidate per step (its thoughts' reward on
    the [0, 1] scale, the raw confidence, sigma; nothing generated) and the step whose thoughts answer."""
    return {"thoughts": k, "placeholder": placeholder, "iterations": 0, "rewards": [], "candidates": [],
            "chosen_step": None, "reward_uses_labels": False}


def thought_prompts(engine: Engine, problems: list[dict], placeholders: list[int]) -> tuple[list[list[int]], list[int]]:
    """Each problem's prompt ids with the placeholders after the thoughts sentence, and where they
    start. The chat prompt's text is cut at a mark and its two sides tokenized apart, so that the
    placeholders are exactly the ids given, whatever the tokenizer would merge them with."""
    tokenizer, limit = engine.tokenizer, engine.cfg.data.max_prompt_tokens
    special = not getattr(tokenizer, "chat_template", None)  # as Engine.encode_messages: BOS etc. where no template adds them
    rows, starts = [], []
    for p in problems:
        said = f"{THOUGHTS_SENTENCE.format(k=len(placeholders))} " if engine.cfg.ltpo.instruction else ""
        message = f"{user_message(p, engine.cfg.data.prompt)}\n\n{said}{MARK}"
        before, after = chat_prompt(tokenizer, message).split(MARK)
        head = tokenizer(before, add_special_tokens=special)["input_ids"]
        tail = tokenizer(after, add_special_tokens=False)["input_ids"]
        extra = len(head) + len(placeholders) + len(tail) - limit
        if extra > 0:  # cut from the left, as Engine.encode does; the thoughts and the turn stay
            if p["id"] not in engine.truncated:
                warnings.warn(f"problem {p['id']}: prompt of {limit + extra} tokens cut to data.max_prompt_tokens={limit}")
            engine.truncated.add(p["id"])
            head = head[extra:]
        rows.append(head + placeholders + tail)
        starts.append(len(head))
    return rows, starts


def placeholder_ids(engine: Engine, spec: str, k: int) -> list[int]:
    """The K placeholder ids (docs/algorithms.md §5). ``auto``: the tokenizer's reserved special
    tokens (Llama 3's, one each, as the paper's code), else one special token that is neither
    EOS, pad nor BOS and that the chat prompt never writes (the embedded model's ``<|system|>``),
    else the unknown token, else EOS (the paper's code's choice for Qwen); repeated K times."""
    tokenizer = engine.tokenizer
    if spec != "auto":
        found = tokenizer.convert_tokens_to_ids(spec)
        if found is None or (found == tokenizer.unk_token_id and spec != tokenizer.unk_token):
            raise UserError(f"config key ltpo.placeholder: {spec!r} is not a token of the model's vocabulary")
        return [found] * k
    special = sorted({i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids))
    reserved = [i for i in special if "reserved" in tokenizer.convert_ids_to_tokens(i)]
    if reserved:
        return [reserved[j % len(reserved)] for j in range(k)]
    written = set(engine.encode_messages(["?"])[0])
    taken = set(engine.eos_ids) | {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    unused = [i for i in special if i not in written and i not in taken]
    if unused:
        return [unused[0]] * k
    return [tokenizer.unk_token_id if tokenizer.unk_token_id is not None else engine.eos_ids[0]] * k
