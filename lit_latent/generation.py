"""Model loading and the batched decoding loop that the latent methods need.

``generate`` returns, besides the tokens, the last-layer hidden state that produced every
generated token: the latents of docs/algorithms.md, the vectors the model's head turns into logits
(``LogitHead(model)(hidden[t]).argmax() == tokens[t]`` under greedy). The KV-cache machinery
it runs on is in ``kvcache.py``, the head in ``heads.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_latent.config import ModelConfig, UserError
from lit_latent.devices import input_device, output_device
from lit_latent.heads import LogitHead, logit_transform
from lit_latent.kvcache import (
    CACHE,
    PromptState,
    _additive,
    _left_pad,
    _positions,
    accepts_4d_mask,
    extend_prompts,
    full_attention,
    holds_kv_cache,
    new_cache,
    select_rows,
    step_mask,
)
from lit_latent.drafts import Drafts, block_budget
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig, run_dir: Optional[Path] = None):
    """Load a local HF causal LM and its tokenizer, frozen, in eval mode. A model lit_latent cannot
    serve (a hub id given offline, an encoder-decoder, no causal LM head, logits it cannot
    reproduce from a latent, its own code (``auto_map``) without ``model.trust_remote_code``, a
    forward that does not run) is refused in one line naming ``model.path``. Which cache decoding
    uses is probed here too (``rerun.decoding_path``).

    With ``model.device_map`` transformers and accelerate place the layers (several GPUs, CPU,
    disk); layers put on disk are read from ``model.offload_folder``, by default
    ``<run_dir>/offload`` (transformers reads safetensors checkpoints in place and writes there
    only weights it converts while loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny bar per load clutters every run's output

    path = Path(cfg.path)
    refuse = lambda why: UserError(f"config key model.path: {cfg.path} {why}")  # noqa: E731
    if not path.is_dir():
        if _looks_like_hub_id(cfg.path):
            raise refuse("is not a local directory; it looks like a Hugging Face hub id, and models are read from disk only "
                         f"(offline): download it first (hf download {cfg.path} --local-dir DIR) and set model.path=DIR")
        raise UserError(f"config key model.path: model directory not found: {cfg.path}")
    if not (path / "config.json").is_file():
        raise UserError(f"config key model.path: {cfg.path} has no config.json (not a Hugging Face model directory)")
    remote = dict(trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    auto_map = _auto_map(path)

    def needs_remote_code() -> None:
        # transformers cannot load it without the directory's own code: say so instead of its error
        if auto_map and not cfg.trust_remote_code:
            raise refuse(f"ships its own modelling code (auto_map in config.json: {', '.join(sorted(auto_map))}), which "
                         "would run on loading; set model.trust_remote_code=true only if you trust that code") from None

    try:
        config = AutoConfig.from_pretrained(path, **remote)
    except Exception as e:
        needs_remote_code()
        raise refuse(f"has an unreadable config.json: {_first_line(e)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise refuse(f"is an encoder-decoder model ({config.model_type}); lit_latent needs a decoder-only causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except Exception as e:
        needs_remote_code()
        raise UserError(f"config key model.path: cannot load a tokenizer from {cfg.path}: {_first_line(e)}") from None
    placement = {}
    if isinstance(cfg.device_map, dict):
        _check_map_names(config, cfg.device_map, cfg.trust_remote_code)
    if cfg.device_map is not None:
        offload = cfg.offload_folder or (str(Path(run_dir) / "offload") if run_dir is not None else None)
        placement = dict(device_map=cfg.device_map, max_memory=cfg.max_memory, offload_folder=offload)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], **remote, **placement)
    except Exception as e:
        needs_remote_code()
        if placement:  # a module name the model lacks, a device that is not there, no room on any device
            raise UserError(f"config key model.device_map: cannot load {cfg.path} with device_map={cfg.device_map}"
                            f"{f' and max_memory={cfg.max_memory}' if cfg.max_memory else ''}: {_first_line(e)}") from None
        raise UserError(f"config key model.path: cannot load a causal LM from {cfg.path}: {_first_line(e)}") from None
    if model.get_output_embeddings() is None:
        raise refuse(f"({config.model_type}) has no causal LM head (get_output_embeddings() is None)")
    model.eval()
    model.requires_grad_(False)
    broken = _nonfinite_weight(model)
    if broken is not None:
        raise refuse(f"holds NaN or inf in its weights ({broken}): the checkpoint is damaged or was saved after a diverged update")
    try:
        logit_transform(model)  # probed now, so a model whose logits cannot be reproduced stops here
    except Exception as e:
        raise refuse(f"({config.model_type}): {_first_line(e)}") from None
    from lit_latent.rerun import decoding_path  # it builds on this module

    try:
        decoding_path(model)  # probed now too: which cache decoding can use (rerun.py), before any work
    except Exception as e:
        raise refuse(f"({config.model_type}) cannot be run without a cache: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_map_names(config, device_map: dict, trust_remote_code: bool) -> None:
    """Every module a device map names exists and every weight is placed: transformers loads a
    weight the map leaves out onto the CPU without a word, where the layers around it cannot reach it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # the model's structure on meta, no weights read
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = {name for name, _ in empty.named_modules()}
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        raise UserError(f"config key model.device_map: {config.model_type} has no module {unknown[0]!r} "
                        f"(its top modules: {', '.join(n for n, _ in empty.named_children())})")
    placed = lambda w: any(m == "" or w == m or w.startswith(m + ".") for m in device_map)  # noqa: E731
    missing = [name for name, _ in empty.named_parameters() if not placed(name)]
    if missing:
        raise UserError(f"config key model.device_map: places no module holding {missing[0]} "
                        f"({len(missing)} weights unplaced); map every module, or use auto")


def _nonfinite_weight(model) -> Optional[str]:
    """The name of the first weight holding NaN or inf, None when all are finite."""
    if not any(w.device.type == "meta" for w in model.parameters()):
        return next((name for name, w in model.state_dict().items() if w.is_floating_point() and not torch.isfinite(w).all()), None)
    # a device map offloaded some layers (their weights are on meta): each module's are read in to be checked
    from accelerate.utils import align_module_device

    for prefix, module in model.named_modules():
        with align_module_device(module):
            for name, w in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if w.is_floating_point() and not torch.isfinite(w).all():
                    return f"{prefix}.{name}" if prefix else name
    return None


def _auto_map(path: Path) -> dict:
    """config.json's ``auto_map`` (classes in the directory's own code), {} when none or unreadable."""
    import json

    try:
        found = json.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def model_id(path: str | Path) -> str:
    """A stable name for a model directory: its folder name and a digest of its config.json.
    Memories and weavers record it, so that another model's are refused."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha1((path / "config.json").read_bytes()).hexdigest()[:12]
    return f"{path.resolve().name}-{digest}"


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end an answer: the generation config's (instruct models list several) and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def chat_prompt(tokenizer, user_message: str) -> str:
    """The user message wrapped in the tokenizer's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], add_generation_prompt=True, tokenize=False
        )
    return user_message + "\n"


@dataclass
class Generation:
    tokens: list[list[int]]
    """Per row: the prefix given, then the generated ids (EOS and padding removed)."""
    hidden: Optional[list[Tensor]]
    """Per row ``[len(tokens), d]``: the post-norm last-layer state that produced each token
    (``d = heads.latent_size(model)``, ``lm_head``'s input: after OPT's ``project_out``)."""
    new_tokens: list[int]
    """Per row: tokens the model generated (EOS included), the compute spent."""
    finished: list[bool]
    """Per row: stopped at EOS rather than at max_new_tokens."""


def _block_mask(attention: Tensor, n: int, four_d: bool) -> Tensor:
    """The mask of a step that feeds ``n`` tokens a row: each sees the cached positions its row sees
    (``attention``: 4D additive ``[rows, 1, 1, S]`` or 2D ``[rows, S]``, then only for ``n = 1``) and
    the block's tokens up to itself."""
    rows = attention.shape[0]
    if not four_d:
        return torch.cat([attention, torch.ones((rows, n), dtype=attention.dtype, device=attention.device)], dim=-1)
    causal = torch.ones((n, n), dtype=torch.bool, device=attention.device).tril()
    within = torch.zeros((rows, 1, n, n), dtype=attention.dtype, device=attention.device)
    within.masked_fill_(~causal, torch.finfo(attention.dtype).min)
    return torch.cat([attention.expand(-1, -1, n, -1), within], dim=-1)


def _accepted(choice: Tensor, guessed: Tensor, done: Tensor, eos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, how many draft tokens ``guessed`` ``[rows, k]`` (-1: none) to keep: each while every
    one before it, and it, is the model's own ``choice``, through the first end of answer. Returns
    the counts ``[rows]``, which draft positions are kept and which kept ones end the answer."""
    agree = (choice == guessed) & (guessed >= 0) & ~done[:, None]
    run = agree.long().cumprod(1).bool()  # the unbroken run of agreement from the block's start
    accepted = run.sum(1)
    drafted_eos = torch.isin(guessed, eos) & run
    accepted = torch.where(drafted_eos.any(1), drafted_eos.long().argmax(1) + 1, accepted)
    kept = torch.arange(guessed.shape[1], device=guessed.device)[None, :] < accepted[:, None]
    return accepted, kept, drafted_eos & kept


def _pick(logits: Tensor, temperature: float, top_p: float, generators: Optional[list[torch.Generator]]) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    # one generator per row: a row's samples do not depend on which rows share its batch
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: Optional[list[torch.Generator]] = None,
    return_hidden: bool = False,
    use_cache: bool = True,
    prompt_state: Optional[PromptState] = None,
    draft_tokens: int = 0,
    lookup: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    draft_budget: Optional[int] = None,
) -> Generation:
    """Batched greedy or sampled decoding of left-padded prompts, optionally after a forced prefix.

    ``prefixes[i]`` (answer tokens already chosen, e.g. decoded from optimized latents) is
    fed after ``prompts[i]`` and the model continues from it. ``prompt_state`` (from
    ``encode_prompts``, rows matching ``prompts``) skips recomputing the prompts.
    ``use_cache=False`` recomputes the whole sequence at every step: the reference
    implementation's cost profile. A model whose cache cannot be held (recurrent or convolution
    states, ``kvcache.holds_kv_cache``) re-runs prompt and prefix instead (``rerun.py``).

    ``lookup[i]`` (earlier answers to row ``i``'s problem) turns on drafts for greedy rows with a
    held cache (``drafts.py``): each step feeds, after a row's next token, up to ``draft_tokens``
    tokens that followed its latest tokens before, and keeps those the model would have chosen.
    A step feeds at most ``draft_budget`` tokens in all (rows x block width; None: by the model's
    size and device, ``drafts.block_budget``).
    """
    if use_cache and not holds_kv_cache(model):
        from lit_latent.rerun import generate_rerunning  # it builds on this module

        return generate_rerunning(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                                  prefixes=prefixes, temperature=temperature, top_p=top_p, generators=generators,
                                  return_hidden=return_hidden)
    device = input_device(model)
    backbone = model.base_model
    head = LogitHead(model)
    prefixes = prefixes if prefixes is not None else [[] for _ in prompts]
    if len(prefixes) != len(prompts):
        raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts")
    batch = len(prompts)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    hidden_rows: list[list[Tensor]] = [[] for _ in range(batch)]

    if prompt_state is None or not use_cache:
        rows = [list(p) + list(x) for p, x in zip(prompts, prefixes)]
        ids, mask = _left_pad(rows, pad_id, device)
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=use_cache,
                       **{CACHE: new_cache(model, room=min(max_new_tokens, 256)) if use_cache else None})
        cache = getattr(out, CACHE) if use_cache else None
        states = out.last_hidden_state  # [B, S, d]
        if return_hidden:
            width = ids.shape[1]
            for i, prefix in enumerate(prefixes):
                # the state at position j predicts token j + 1
                if len(prefix):
                    hidden_rows[i].append(states[i, width - len(prefix) - 1 : width - 1])
        last = states[:, -1]
    else:
        if prompt_state.mask.shape[0] != batch:
            raise ValueError(f"prompt_state has {prompt_state.mask.shape[0]} rows for {batch} prompts")
        cache = copy.copy(prompt_state.cache)
        # new layer objects over the same buffers: this call writes only past the prompts, so
        # the caller's state keeps its positions and lengths
        cache.layers = [copy.copy(layer) for layer in prompt_state.cache.layers]
        mask, last = prompt_state.mask, prompt_state.last
        ids = None
        if any(len(x) for x in prefixes):
            extended, block_states = extend_prompts(model, PromptState(cache, mask, last), prefixes, pad_id)
            cache, mask, last = extended.cache, extended.mask, extended.last
            if return_hidden:
                width = block_states.shape[1]
                for i, prefix in enumerate(prefixes):
                    if len(prefix):
                        # prefix token 0 is predicted by the prompt's last state, token j by block position j - 1
                        hidden_rows[i].append(prompt_state.last[i : i + 1])
                        hidden_rows[i].append(block_states[i, width - len(prefix) : width - 1])

    # `live` maps the rows still in the batch to their original index: finished rows are
    # dropped once they are a quarter of the batch, so long answers do not carry short ones.
    # The per-step bookkeeping runs on the live rows only and is written back to the original
    # rows when rows leave and at the end (an indexed write per step cost more than the step's
    # own ops on the embedded model).
    live = torch.arange(batch, device=device)
    # a step writes its tokens from each row's count on (-1 where none): room for a whole block past the end
    generated = torch.full((batch, max_new_tokens + draft_tokens + 1), -1, dtype=torch.long, device=device)
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    ended_at_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    live_generated, live_counts, live_eos = generated.clone(), counts.clone(), ended_at_eos.clone()
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # per live row
    # per span of steps with the same live rows: per step the states behind the step's tokens
    # [rows, block, d] and which of them produced a kept token [rows, block]
    spans: list[tuple[list[int], list[tuple[Tensor, Tensor]]]] = [(list(range(batch)), [])]
    all_ids, all_mask = ids, mask  # all_ids is only needed without a cache
    if use_cache:
        pos = all_mask.sum(-1, keepdim=True) - 1  # each row's last position (left padding counts none)
        attention = step_mask(model, cache, all_mask)
        four_d = attention.dim() == 4
    # greedy rows with a cache that takes a 4D mask check drafts of their next tokens (drafts.py)
    drafts = None
    if draft_tokens and lookup is not None and use_cache and four_d and temperature <= 0:
        contexts = [list(p) + list(x) for p, x in zip(prompts, prefixes)]
        drafts = Drafts(contexts, lookup)
        budget = draft_budget or block_budget(model, device)
    # inference mode: no version counters or view tracking per op, a cheaper step (the tensors made
    # here stay inside; the hidden states returned are assembled after it, as normal tensors)
    with torch.inference_mode():
        while True:
            logits = head(last).float().to(device)  # under a device map lm_head may run elsewhere
            nxt = _pick(logits, temperature, top_p, generators)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            if return_hidden:
                spans[-1][1].append((last[:, None], torch.ones_like(done)[:, None]))
            is_eos = torch.isin(nxt, eos) & ~done
            live_eos |= is_eos
            live_generated.scatter_(1, live_counts[:, None], torch.where(done | is_eos, torch.full_like(nxt, -1), nxt)[:, None])
            live_counts += (~done).long()
            done |= is_eos
            budget_left = max_new_tokens - live_counts
            done |= budget_left <= 0
            finished = int(done.sum())
            if finished == len(done):
                break
            if 4 * finished >= len(done):
                generated[live], counts[live], ended_at_eos[live] = live_generated, live_counts, live_eos
                keep = (~done).nonzero().squeeze(1)
                live, nxt, done, all_mask = live[keep], nxt[keep], done[keep], all_mask[keep]
                live_generated, live_counts, live_eos = live_generated[keep], live_counts[keep], live_eos[keep]
                budget_left = budget_left[keep]
                spans.append((live.tolist(), []))
                if generators is not None:
                    generators = [generators[k] for k in keep.tolist()]
                if drafts is not None:
                    drafts.select(keep.tolist())
                if use_cache:
                    select_rows(cache, keep)
                    pos, attention = pos[keep], attention[keep]
                else:
                    all_ids = all_ids[keep]
            rows_now = len(live)
            if not use_cache:
                all_mask = torch.cat([all_mask, torch.ones((rows_now, 1), dtype=all_mask.dtype, device=device)], dim=1)
                all_ids = torch.cat([all_ids, nxt[:, None]], dim=1)
                out = backbone(input_ids=all_ids, attention_mask=all_mask, position_ids=_positions(all_mask), use_cache=False)
                last = out.last_hidden_state[:, -1]
                continue
            # the block fed this step: the new token, then each row's draft (drafts.py) padded to one width
            block = nxt[:, None]
            guessed = None
            if drafts is not None:
                for r, t in enumerate(nxt.tolist()):
                    drafts.extend(r, [t])
                # the draft's length: the block's tokens (rows x (1 + draft)) stay within the budget
                length = min(draft_tokens, budget // rows_now - 1)
                guesses = []
                if length > 0:
                    left, stopped = budget_left.tolist(), done.tolist()
                    guesses = [[] if stopped[r] else drafts.guess(r, min(length, left[r])) for r in range(rows_now)]
                width = max((len(g) for g in guesses), default=0)
                if width:
                    guessed = torch.tensor([g + [-1] * (width - len(g)) for g in guesses], device=device)
                    block = torch.cat([block, guessed.clamp(min=0)], dim=1)
            n = block.shape[1]
            full = _block_mask(attention, n, four_d)
            out = backbone(input_ids=block, attention_mask=full, position_ids=pos + 1 + torch.arange(n, device=device),
                           use_cache=True, **{CACHE: cache})
            cache = getattr(out, CACHE)
            states = out.last_hidden_state  # [rows, n, d]
            if guessed is None:
                accepted = torch.zeros(rows_now, dtype=torch.long, device=device)
                attention = full[:, :, -1:] if four_d else full
            else:
                choice = head(states[:, :-1]).float().argmax(-1).to(device)  # the model's own token after each block token
                accepted, kept, is_eos = _accepted(choice, guessed, done, eos)
                tokens = torch.where(kept & ~is_eos, guessed, torch.full_like(guessed, -1))
                live_generated.scatter_(1, live_counts[:, None] + torch.arange(n - 1, device=device)[None, :], tokens)
                live_counts += accepted
                live_eos |= is_eos.any(1)
                done |= is_eos.any(1) | (live_counts >= max_new_tokens)
                if return_hidden:
                    spans[-1][1].append((states[:, :-1], kept))
                for r, a in enumerate(accepted.tolist()):
                    if a:
                        drafts.extend(r, guesses[r][:a])
                # the block's positions past a row's last kept token stay in the cache, masked out
                seen = torch.arange(n, device=device)[None, :] <= accepted[:, None]
                attention = torch.cat([attention, _additive(seen[:, None, None, :], attention.dtype)], dim=-1)
            pos = pos + 1 + accepted[:, None]
            last = states[torch.arange(rows_now, device=states.device), accepted.to(states.device)]
    generated[live], counts[live], ended_at_eos[live] = live_generated, live_counts, live_eos

    generated = generated[:, :max_new_tokens].tolist()
    if return_hidden:
        for rows, blocks in spans:
            if blocks:
                states = torch.cat([b for b, _ in blocks], dim=1)  # [rows, tokens of the span's steps, d]
                kept = torch.cat([k for _, k in blocks], dim=1).to(states.device)  # under a device map: another device
                for k, i in enumerate(rows):
                    hidden_rows[i].append(states[k][kept[k]])
    tokens, hidden = [], [] if return_hidden else None
    latent_device = output_device(model) if return_hidden else None
    for i in range(batch):
        gen = [t for t in generated[i] if t >= 0]
        tokens.append(list(prefixes[i]) + gen)
        if return_hidden:
            row = torch.cat([h.to(latent_device) for h in hidden_rows[i]], dim=0)  # latents live where lm_head runs
            hidden.append(row[: len(tokens[i])])
    return Generation(tokens=tokens, hidden=hidden, new_tokens=counts.tolist(), finished=ended_at_eos.tolist())


@torch.inference_mode()  # all it returns is token ids (see generate)
def generate_branches(
    model,
    state: PromptState,
    branches: Sequence[Sequence[Sequence[int]]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Greedy continuations of several branches after each cached row of ``state``.

    Row ``g`` holds an opening (e.g. one candidate's problem and solution) and
    ``branches[g]`` its continuations (the verification questions about it, each non-empty).
    All branches of a row are packed after the opening in one sequence, and a 4D attention
    mask lets each branch see the opening and its own tokens only: every branch is answered
    as if it were alone, while the opening's cache is neither copied nor repeated per branch.
    Returns per row and branch the generated ids (EOS removed) and the tokens generated (EOS
    included), like ``generate``.

    A model whose layers slide their window, or that does not take 4D masks (ALiBi), gets
    the same answers the slower way: one row per branch, the opening's cache repeated.
    """
    if any(len(t) == 0 for b in branches for t in b):
        raise ValueError("every branch needs at least one token of its own")
    if state.cache is None:
        raise ValueError("generate_branches needs a held cache; this model's generations re-run their prompts")
    if not (full_attention(state.cache) and accepts_4d_mask(model)):
        return _branches_one_by_one(model, state, branches, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)
    device = state.mask.device
    dtype = next(model.parameters()).dtype
    B, S = state.mask.shape
    K = max(len(b) for b in branches)
    opening_len = state.mask.sum(1)  # [B]: positions continue from each row's own opening
    T = max(sum(len(t) for t in b) for b in branches)  # the packed block's width
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    branch_of = torch.full((B, T), -1, dtype=torch.long, device=device)
    offset = torch.zeros((B, T), dtype=torch.long, device=device)
    ends = torch.zeros((B, K), dtype=torch.long, device=device)  # block index of each branch's last token
    for g, row in enumerate(branches):
        at = 0
        for k, tail in enumerate(row):
            ids[g, at : at + len(tail)] = torch.tensor(list(tail), dtype=torch.long, device=device)
            branch_of[g, at : at + len(tail)] = k
            offset[g, at : at + len(tail)] = torch.arange(len(tail), device=device)
            ends[g, k] = at + len(tail) - 1
            at += len(tail)
    exists = torch.tensor([[k < len(b) for k in range(K)] for b in branches], device=device)  # [B, K]
    tail_len = torch.tensor([[len(b[k]) if k < len(b) else 0 for k in range(K)] for b in branches], device=device)

    opening = state.mask.bool()[:, None, None, :]  # every query sees its row's opening (so none sees nothing)
    # the block: a token sees the earlier tokens of its own branch
    index = torch.arange(T, device=device)
    same = (branch_of[:, :, None] == branch_of[:, None, :]) & (branch_of[:, None, :] >= 0)
    causal = index[None, :, None] >= index[None, None, :]
    sees = torch.cat([opening.expand(B, 1, T, S), (same & causal)[:, None]], dim=-1)
    cache = copy.copy(state.cache)
    cache.layers = [copy.copy(layer) for layer in state.cache.layers]  # write past the opening only
    out = model.base_model(input_ids=ids, attention_mask=_additive(sees, dtype),
                           position_ids=opening_len[:, None] + offset, use_cache=True, **{CACHE: cache})
    states = out.last_hidden_state
    last = states.gather(1, ends.to(states.device)[:, :, None].expand(B, K, states.shape[-1]))
    head = LogitHead(model)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    done = ~exists  # rows with fewer branches fill the missing ones with finished dummies
    generated = torch.full((B, K, max_new_tokens), -1, dtype=torch.long, device=device)
    counts = torch.zeros((B, K), dtype=torch.long, device=device)
    k_index = torch.arange(K, device=device)
    own_block = branch_of[:, None, :] == k_index[None, :, None]  # [B, K, T]
    gen_branch = torch.zeros(0, dtype=torch.long, device=device)  # branch of each generated key
    gen_real = torch.zeros((B, 0), dtype=torch.bool, device=device)  # fed while its branch was running
    for step in range(max_new_tokens):
        nxt = head(last).float().argmax(-1).to(device)  # [B, K]
        counts += (~done).long()
        is_eos = torch.isin(nxt, eos) & ~done
        generated[:, :, step] = torch.where(done | is_eos, torch.full_like(nxt, -1), nxt)
        done = done | is_eos
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        # one new token per branch: it sees the opening, its branch's block and its branch's generated tokens
        gen_branch = torch.cat([gen_branch, k_index])
        gen_real = torch.cat([gen_real, ~done], dim=-1)
        own_gen = (gen_branch[None, None, :] == k_index[None, :, None]) & gen_real[:, None, :]
        step_sees = torch.cat([opening[:, 0].expand(B, K, S), own_block, own_gen], dim=-1)[:, None]
        out = model.base_model(input_ids=torch.where(done, torch.full_like(nxt, pad_id), nxt),
                               attention_mask=_additive(step_sees, dtype),
                               position_ids=opening_len[:, None] + tail_len + step, use_cache=True,
                               **{CACHE: getattr(out, CACHE)})
        last = out.last_hidden_state
    tokens = [[[t for t in generated[g, k].tolist() if t >= 0] for k in range(len(b))] for g, b in enumerate(branches)]
    return tokens, [[int(counts[g, k]) for k in range(len(b))] for g, b in enumerate(branches)]


def _branches_one_by_one(model, state: PromptState, branches, *, max_new_tokens: int, eos_ids, pad_id: int):
    rows = [(g, tail) for g, row in enumerate(branches) for tail in row]
    # the prompts are in the state: generate reads only their number
    out = generate(model, [[] for _ in rows], prefixes=[tail for _, tail in rows], max_new_tokens=max_new_tokens,
                   eos_ids=eos_ids, pad_id=pad_id, prompt_state=state.select([g for g, _ in rows]))
    tokens, counts, k = [], [], 0
    for row in branches:
        tokens.append([out.tokens[k + j][len(tail):] for j, tail in enumerate(row)])
        counts.append(out.new_tokens[k : k + len(row)])
        k += len(row)
    return tokens, counts
