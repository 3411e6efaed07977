"""Typed configuration: one dataclass per config section, a one-line comment under every key.

``__post_init__`` checks values and cross-field rules. Every problem surfaces as a
:class:`UserError` whose one-line message names the key or file, which the entry points
print without a traceback (exit code 2). ``lit_latent.cli`` merges YAML files and
``key=value`` overrides onto these dataclasses and writes ``--help`` from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union




# The embedded default model and its bundled held-out problems (see lit_latent/embedded).
MODEL_DIR = Path(__file__).parent / "embedded" / "model"
HELDOUT_PATH = Path(__file__).parent / "embedded" / "heldout.jsonl"


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


DTYPES = ("float32", "bfloat16", "float16")
METHODS = ("cot", "latentseek", "resample", "latentevolve", "self_consistency", "best_of_n", "ltpo")
REWARD_KINDS = ("self", "verifier", "majority", "confidence", "custom")
# self-reward schemes: criterion -> default weight. LatentSeek: calculations 2, answer 1,
# complete 2, understood 1; LatentEvolve: answer 1, comprehension 1, calculation 1, format 2,
# clarity 2; steps and recompute ask LatentSeek's criteria, the calculation check line by line
SCHEME_WEIGHTS = {
    "latentseek": {"calculation": 2.0, "answer": 1.0, "complete": 2.0, "understood": 1.0},
    "latentevolve": {"answer": 1.0, "understood": 1.0, "calculation": 1.0, "format": 2.0, "clarity": 2.0},
    "steps": {"calculation": 2.0, "answer": 1.0, "complete": 2.0, "understood": 1.0},
    "recompute": {"calculation": 2.0, "answer": 1.0, "complete": 2.0, "understood": 1.0},
}
SCHEMES = tuple(SCHEME_WEIGHTS)
# what a sampled output's reward Q is compared with in the latent policy gradient (Q - b):
# mean (the M samples' mean reward), none (b = 0: Q as it is, the papers' formula) or one
# (b = 1: LatentSeek's [-1, 0] scale, every imperfect sample is pushed away from)
BASELINES = ("mean", "none", "one")


def _positive(name: str, value: Union[int, float, None], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key {name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config key {name}: {value!r} is not one of {', '.join(allowed)}")


def scheme_weights(scheme: str, overrides: Optional[dict] = None) -> dict[str, float]:
    """The criteria a self-reward asks and their weights: the scheme's defaults with
    ``reward.weights`` overrides applied; a criterion of weight 0 is dropped (it cannot change
    the reward, so it is not asked)."""
    _one_of("reward.scheme", scheme, SCHEMES)
    weights = dict(SCHEME_WEIGHTS[scheme])
    for crit, w in (overrides or {}).items():
        if crit not in weights:
            raise UserError(f"config key reward.weights.{crit}: not a criterion of scheme {scheme} ({', '.join(weights)})")
        _positive(f"reward.weights.{crit}", float(w), allow_zero=True)
        weights[crit] = float(w)
    weights = {crit: w for crit, w in weights.items() if w > 0}
    if not weights:
        raise UserError(f"config key reward.weights: every criterion of scheme {scheme} has weight 0")
    return weights


# device maps whose placement accelerate plans from the devices' memory (model.max_memory)
PLANNED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# accelerate's units (accelerate.utils.convert_file_size_to_int); a lower-case b counts bits
_SIZE = re.compile(r"^\s*\d+(\.\d*)?\s*(GIB|MIB|KIB|GB|MB|KB)\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|disk|mps|[a-z]+:\d+)$")


def _gpu_number(device: Any) -> bool:
    return isinstance(device, int) and not isinstance(device, bool) and device >= 0


def _check_device_map(device_map: Any) -> None:
    key = "config key model.device_map"
    if device_map is None or device_map in PLANNED_MAPS:
        return
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, dict)):
        raise UserError(f"{key}: {' / '.join(PLANNED_MAPS)}, a device, or a mapping of module names to devices, got {device_map!r}")
    if device_map == "disk":
        raise UserError(f"{key}: disk alone would put the whole model on disk; map some modules to disk "
                        "({{model.layers.5: disk, ...}}) or use auto with model.max_memory")
    places = device_map.items() if isinstance(device_map, dict) else [("", device_map)]
    for module, device in places:
        if not isinstance(module, str):
            raise UserError(f"{key}: module names are strings (model.layers.3, lm_head; '' for the whole model), got {module!r}")
        ok = _gpu_number(device) or (
            isinstance(device, str) and bool(_DEVICE.match(device)) and (isinstance(device_map, dict) or device != "disk"))
        if not ok:
            where = f" for {module}" if module else ""
            raise UserError(f"{key}: {device!r}{where} is not a device (a GPU number, cpu, disk or a name like cuda:1)"
                            f"{'' if isinstance(device_map, dict) else ', nor ' + ' / '.join(PLANNED_MAPS)}")


def _check_max_memory(max_memory: dict) -> None:
    if not max_memory:
        raise UserError("config key model.max_memory: give at least one device, e.g. {0: 70GiB, cpu: 200GiB}")
    for device, size in max_memory.items():
        if size is None and ":" in str(device):  # YAML reads {cpu:2MB} as the key "cpu:2MB"
            raise UserError(f"config key model.max_memory: {device!r} has no size; write a space after the colon ({{cpu: 2MB}})")
        if not (_gpu_number(device) or device in ("cpu", "disk", "mps")):
            raise UserError(f"config key model.max_memory: {device!r} is not a device (a GPU number, cpu, disk or mps)")
        if isinstance(size, bool) or not ((isinstance(size, int) and size > 0) or (isinstance(size, str) and _SIZE.match(size))):
            raise UserError(f"config key model.max_memory: {device}: {size!r} is not a size (bytes, or a number with "
                            "KB, MB, GB, KiB, MiB or GiB, e.g. 70GiB)")


@dataclass
class ModelConfig:
    path: str = str(MODEL_DIR)
    """Local Hugging Face causal LM directory (default: the embedded tiny model)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run the modelling code a model directory ships (auto_map in its config.json): only for code you trust."""
    device_map: Any = None
    """Spread a model larger than one device over several with transformers' device maps (accelerate): auto, balanced, balanced_low_0, sequential, one device (cuda:1), or {module name: device} with devices GPU numbers, cpu or disk (null: one device, the Trainer's)."""
    max_memory: Optional[dict[Any, Any]] = None
    """With device_map auto, balanced, balanced_low_0 or sequential: the most each device may hold, e.g. {0: 70GiB, cpu: 200GiB}; what fits nowhere goes to disk (null: each device's free memory)."""
    offload_folder: Optional[str] = None
    """Where the layers a device map puts on disk are read from (default: <run_dir>/offload; safetensors checkpoints are read in place)."""

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, DTYPES)
        _check_device_map(self.device_map)
        if self.max_memory is not None:
            if self.device_map not in PLANNED_MAPS:
                raise UserError(f"config key model.max_memory: sizes devices for model.device_map={' / '.join(PLANNED_MAPS)}, "
                                f"got model.device_map={self.device_map}")
            _check_max_memory(self.max_memory)
        if self.offload_folder is not None and self.device_map is None:
            raise UserError("config key model.offload_folder: holds the layers a device map puts on disk; set model.device_map too")


@dataclass
class DataConfig:
    path: str = str(HELDOUT_PATH)
    """JSONL file with id, problem, answer (+ solution, choices); default: bundled problems."""
    offset: int = 0
    """Skip the first N problems of the file (e.g. report on problems the settings were not tuned on)."""
    limit: Optional[int] = None
    """Use only the first N problems after the offset (null: all)."""
    batch_size: int = 8
    """Problems adapted together in one predict_step."""
    max_prompt_tokens: int = 1024
    """Longer prompts are cut from the left, with a warning and a record status."""
    prompt: str = "auto"
    """Prompt format: math (step by step, answer in \\boxed{}), choice (list choices, ask for the letter), auto (choice when a row has choices)."""

    def __post_init__(self) -> None:
        _one_of("data.prompt", self.prompt, ("auto", "math", "choice"))
        _positive("data.limit", self.limit)
        _positive("data.offset", self.offset, allow_zero=True)
        _positive("data.batch_size", self.batch_size)
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    """Longest answer generated (paper: 1024 for LatentSeek, 2048 for LatentEvolve)."""
    temperature: float = 0.7
    """Temperature of sampled decoding (resample, self-consistency, best-of-n, majority)."""
    top_p: float = 1.0
    """Nucleus sampling mass of sampled decoding."""
    num_samples: int = 8
    """N: samples per problem for self_consistency / best_of_n."""

    def __post_init__(self) -> None:
        _positive("generation.max_new_tokens", self.max_new_tokens)
        _positive("generation.temperature", self.temperature, allow_zero=True)
        _positive("generation.num_samples", self.num_samples)
        if not 0 < self.top_p <= 1:
            raise UserError(f"config key generation.top_p: must be in (0, 1], got {self.top_p}")


ANSWERS = ("last", "best", "sample")
ARCHIVES = ("z_star", "own_edit", "answer")


@dataclass
class SearchConfig:
    """The latent search settings LatentSeek (``latent.*``) and LatentEvolve (``evolve.*``) share."""

    lr: float = 0.03
    """Adam learning rate on the latents (LatentSeek paper: 0.03; LatentEvolve's eta: 0.3)."""
    rho: Optional[float] = 0.2
    """Fraction of the answer's latents optimized: the first floor(rho * T) of a T-token answer. LatentEvolve: at least L', null: the paper, the L' latents only."""
    samples: int = 1
    """Prefixes sampled from the latent policy per step. 1: LatentSeek's greedy decode; M > 1: M samples, the gradient of LatentEvolve (paper: 8)."""
    sample_temperature: float = 1.0
    """Temperature of the latent policy when samples > 1."""
    baseline: str = "mean"
    """With samples > 1, what each sample's reward Q is compared with: mean (of the M samples; ours), none (the paper's plain Q) or one (Q - 1, LatentSeek's scale)."""
    stop_threshold: Optional[float] = 0.8
    """Stop once reward >= this, on our [0, 1] scale (LatentSeek: -0.2 on [-1, 0], i.e. 0.8). LatentEvolve scores the greedy CoT first and keeps one that passes, and stops refining a problem at the first step one of its samples passes; null: refine every problem for its K steps (its paper)."""
    regenerate_after_first_change: bool = False
    """Keep a decoded or sampled prefix only up to its first token that differs from the greedy CoT, and regenerate the rest."""
    answer: str = "last"
    """The answer: last (the papers: LatentSeek's last candidate, LatentEvolve's greedy answer from the last step's latents), best (the highest-reward candidate, earliest on ties, the initial one included; LatentEvolve: greedy from the step with the best mean reward) or sample (LatentEvolve: the highest-reward output sampled at any step)."""

    reanchor: bool = False
    """After a new candidate that scores at least as well as the one the latents were last anchored to (at first the initial answer), the latents become that candidate's (the kept prefix's, then the model's states behind the regenerated tokens) and Adam restarts: edits build on each other and the loss covers the scored tokens. For regenerate_after_first_change; greedy candidates (samples=1) only."""
    edit_from: str = "start"
    """Which of the L latents are optimized: start (all, the paper) or first_failing_line (only those from the first line the reward's own verdicts fail, e.g. reward.scheme=recompute; the chain before it stays as it is; a reward that cannot tell edits from the start); greedy candidates (samples=1) only."""
    loss_tokens: str = "decoded"
    """Which tokens the greedy policy-gradient loss covers: decoded (what all optimized latents decode to, the paper) or scored (only those of the last candidate's kept prefix: with regenerate_after_first_change, the latents after its first change were not scored)."""

    def check(self, section: str) -> None:
        _positive(f"{section}.lr", self.lr)
        if self.rho is not None and not 0 < self.rho <= 1:
            raise UserError(f"config key {section}.rho: must be in (0, 1] or null, got {self.rho}")
        _positive(f"{section}.samples", self.samples)
        _positive(f"{section}.sample_temperature", self.sample_temperature)
        _one_of(f"{section}.baseline", self.baseline, BASELINES)
        if self.answer == "final":
            raise UserError(f"config key {section}.answer: 'final' is now called 'last' (one of {', '.join(ANSWERS)})")
        _one_of(f"{section}.answer", self.answer, ANSWERS)
        _one_of(f"{section}.edit_from", self.edit_from, ("start", "first_failing_line"))
        _one_of(f"{section}.loss_tokens", self.loss_tokens, ("decoded", "scored"))
        if self.edit_from != "start" and self.samples != 1:
            raise UserError(f"config key {section}.edit_from: edits greedy candidates; it needs {section}.samples=1 (got {self.samples})")
        if self.reanchor and self.samples != 1:
            raise UserError(f"config key {section}.reanchor: anchors greedy candidates; it needs {section}.samples=1 (got {self.samples})")


@dataclass
class LatentConfig(SearchConfig):
    """LatentSeek (docs/algorithms.md §1)."""

    max_latents: int = 300
    """L_max, the cap on optimized latents (paper: 300)."""
    max_iterations: int = 10
    """K, policy-gradient iterations per problem (paper: 10)."""
    free_repeats: int = 0
    """Iterations whose candidate repeats one the problem tried before (nothing new generated) that do not count toward K; 0: every iteration counts (the paper)."""

    def __post_init__(self) -> None:
        self.check("latent")
        if self.rho is None:
            raise UserError("config key latent.rho: must be in (0, 1], got null")
        _positive("latent.max_latents", self.max_latents)
        _positive("latent.max_iterations", self.max_iterations, allow_zero=True)
        _positive("latent.free_repeats", self.free_repeats, allow_zero=True)
        if self.answer == "sample":
            raise UserError("config key latent.answer: 'sample' is LatentEvolve's; LatentSeek's candidates are "
                            "already the best sample of each step (use best)")


@dataclass
class RewardConfig:
    kind: str = "self"
    """self (the model grades itself), verifier (gold labels), majority (TTRL vote), confidence (LTPO's: how peaked the model's distributions are), custom."""
    scheme: str = "latentseek"
    """For kind=self: latentseek (4 checks), latentevolve (5 criteria), steps (per-line calculation)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Override check weights, e.g. {calculation: 2}; defaults follow the papers; a weight of 0 drops that check (not asked)."""
    verdict_tokens: int = 4
    """Tokens generated for each verification verdict."""
    majority_samples: int = 8
    """For kind=majority: sampled answers that vote."""
    top_k: int = 10
    """For kind=confidence (and method ltpo): the k most likely tokens whose mean -log p is a distribution's confidence (LTPO: 10)."""
    class_path: Optional[str] = None
    """For kind=custom: import path of a lit_latent.rewards.Reward subclass."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """For kind=custom: keyword arguments of class_path."""

    def __post_init__(self) -> None:
        _one_of("reward.kind", self.kind, REWARD_KINDS)
        _one_of("reward.scheme", self.scheme, SCHEMES)
        _positive("reward.verdict_tokens", self.verdict_tokens)
        _positive("reward.majority_samples", self.majority_samples)
        _positive("reward.top_k", self.top_k)
        if self.kind == "custom" and not self.class_path:
            raise UserError("config key reward.class_path: required when reward.kind=custom")
        if self.kind == "self":
            scheme_weights(self.scheme, self.weights)


@dataclass
class EvolveConfig(SearchConfig):
    """LatentEvolve's daytime (docs/algorithms.md §2)."""

    # the paper's values where they differ from LatentSeek's (the shared fields are documented above)
    lr: float = 0.3
    rho: Optional[float] = None
    samples: int = 8
    stop_threshold: Optional[float] = None
    latent_count: int = 15
    """L': latents of the greedy CoT kept as z_base (paper: 15; its ablation found 30 slightly better)."""
    top_k: int = 5
    """Neighbours retrieved from the episodic memory for momentum transfer (paper: not given)."""
    max_steps: int = 10
    """K: refinement steps at most (paper: 10)."""
    patience: int = 3
    """Stop once the mean reward has not improved for this many steps (paper: 3); the sampled search (samples > 1) only."""
    archive_threshold: float = 0.5
    """tau: archive (e, z_base, z*) when the final mean reward >= tau (paper: 0.5)."""
    archive: str = "z_star"
    """What is archived as z*: z_star (the paper: the latents found, which include the start's
    transferred offset), own_edit (z_base plus only this problem's own refinement, z* - z_0, so
    that transferred offsets do not compound along a stream) or answer (samples=1: the latents
    behind the answer chosen, the whole of them kept beside z* = their first L', with the
    iterations the search spent, so that the problem met again can start from that answer)."""
    recall: Optional[float] = None
    """samples=1, archive=answer: recall a problem met again, which starts from the remembered
    answer. Its own prompt again is always recalled, with the iterations the remembered search
    left; the same numbers in the same order under other words are recalled at this cosine of e
    or more when the remembered answer passed, with a whole K (null: never recall)."""
    night_every: int = 200
    """T: train the latent weaver after every T problems of a run (paper: 200; 0: never)."""

    def __post_init__(self) -> None:
        self.check("evolve")
        for name in ("latent_count", "top_k", "max_steps", "patience"):
            _positive(f"evolve.{name}", getattr(self, name))
        _positive("evolve.night_every", self.night_every, allow_zero=True)
        _one_of("evolve.archive", self.archive, ARCHIVES)
        if self.archive == "answer" and self.samples != 1:
            raise UserError(f"config key evolve.archive: answer archives the greedy search's answer; it needs evolve.samples=1 (got {self.samples})")
        if self.recall is not None:
            if self.samples != 1:
                raise UserError(f"config key evolve.recall: recalls into the greedy search; it needs evolve.samples=1 (got {self.samples})")
            if not -1 <= self.recall <= 1:
                raise UserError(f"config key evolve.recall: a cosine similarity in [-1, 1] or null, got {self.recall}")


@dataclass
class LtpoConfig:
    """LTPO (docs/algorithms.md §5): K thought embeddings in the prompt, tuned per problem for the
    model's confidence at them (reward.kind=confidence, reward.top_k); the paper's code's values."""

    thoughts: int = 10
    """K: placeholder thought tokens after the problem (paper: 8-10; its code: 10)."""
    instruction: bool = True
    """Announce the thoughts with the paper's sentence (they hold compressed reasoning, use or ignore them); false: the placeholders follow the problem with nothing said."""
    placeholder: str = "auto"
    """The token whose embedding starts every thought: auto (a reserved special token, else a special token the chat prompt never writes, else unk, else EOS; docs/algorithms.md §5) or the token's text."""
    steps: int = 10
    """N: optimization steps at most, each one forward pass over the prompts (paper: 10-20)."""
    lr: float = 0.05
    """Adam learning rate on the thought embeddings (maximizing the confidence)."""
    sigma: float = 0.1
    """sigma0: standard deviation of the Gaussian noise added to the thoughts at the first step."""
    sigma_decay: float = 0.99
    """sigma is multiplied by this after every step."""
    gradient: str = "autograd"
    """How the confidence of the noisy thoughts A = H + sigma eps moves H: autograd (its gradient through the frozen model, the code's default) or reinforce (the score-function estimate R eps / sigma, the paper's policy-gradient form)."""
    keep: str = "updated"
    """The thoughts answered with: updated (the code: H right after the step whose noisy thoughts scored best) or scored (those noisy thoughts themselves)."""
    stop_threshold: Optional[float] = None
    """Stop a problem once its confidence, on the [0, 1] reward scale (docs/rewards.md), reaches this; null: all N steps (the paper)."""

    def __post_init__(self) -> None:
        for name in ("thoughts", "lr", "sigma"):
            _positive(f"ltpo.{name}", getattr(self, name))
        _positive("ltpo.steps", self.steps, allow_zero=True)
        if not 0 < self.sigma_decay <= 1:
            raise UserError(f"config key ltpo.sigma_decay: must be in (0, 1], got {self.sigma_decay}")
        _one_of("ltpo.gradient", self.gradient, ("autograd", "reinforce"))
        _one_of("ltpo.keep", self.keep, ("updated", "scored"))
        if not self.placeholder:
            raise UserError("config key ltpo.placeholder: must be auto or a token's text, got an empty string")


@dataclass
class MemoryConfig:
    path: Optional[str] = None
    """Episodic memory directory (default: <run_dir>/memory); an existing memory is loaded."""
    backend: str = "torch"
    """Retrieval: torch (exact cosine top-k) or faiss (optional extra, for large memories)."""

    def __post_init__(self) -> None:
        _one_of("memory.backend", self.backend, ("torch", "faiss"))


@dataclass
class WeaverConfig:
    checkpoint: Optional[str] = None
    """A trained latent weaver to load (a directory written by train.py); null: none yet."""
    kind: str = "transformer"
    """transformer (small residual network) or lora (a local HF causal LM adapted with LoRA)."""
    layers: int = 2
    """Transformer layers of the small weaver."""
    heads: int = 4
    """Attention heads of the small weaver."""
    backbone_path: Optional[str] = None
    """For kind=lora: local HF causal LM directory used as the backbone (default: model.path)."""
    lora_r: int = 8
    """For kind=lora: LoRA rank."""
    lora_alpha: int = 16
    """For kind=lora: LoRA alpha."""
    lr: float = 1e-3
    """AdamW learning rate of the weaver."""
    batch_size: int = 32
    """Memory entries per training batch."""
    max_epochs: int = 100
    """Epochs at most; early stopping on validation MSE usually ends sooner."""
    val_fraction: float = 0.2
    """Share of the memory held out for validation MSE and early stopping."""
    patience: int = 5
    """Early stopping: epochs without validation improvement."""

    def __post_init__(self) -> None:
        _one_of("weaver.kind", self.kind, ("transformer", "lora"))
        for name in ("layers", "heads", "lora_r", "lora_alpha", "batch_size", "max_epochs", "patience"):
            _positive(f"weaver.{name}", getattr(self, name))
        _positive("weaver.lr", self.lr)
        if not 0 < self.val_fraction < 1:
            raise UserError(f"config key weaver.val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass
class PerfConfig:
    reference_mode: bool = False
    """The reference implementation's cost profile: batch 1, no KV cache, one verification at a time."""
    chunk: int = 64
    """Verification prompts, or samples, per batched generation (bounds memory)."""
    max_active: int = 0
    """LatentSeek: problems adapting at once; when one stops, the next problem of the loader's
    batch (data.batch_size) takes its slot. 0: the whole batch at once."""
    autocast: bool = False
    """Run generation under bf16 autocast (for GPUs; latents and their loss stay float32)."""
    draft_tokens: int = 4
    """Greedy regenerations (LatentSeek, LatentEvolve): up to this many tokens of a draft, looked up
    in the problem's earlier answers, are checked per step in one forward (lit_latent/drafts.py).
    Answers are the model's greedy answers up to float rounding; 0: one token per step."""
    draft_budget: Optional[int] = None
    """Tokens a drafted step may feed in all (rows x (1 + draft)); drafts are cut to fit. null: by the
    model's size on CPU (about 40 for the embedded model, 4 for a 0.5B one), 256 on a GPU."""
    pack_weights: bool = True
    """On CPU, the transformer's large linear layers (>= 2^19 weights) run through oneDNN with their
    weights packed once (lit_latent/packed_linear.py): 2x per matmul at a 0.5B model's decoding
    batch; a second copy of those weights in memory."""
    compile: bool = False
    """torch.compile the transformer's forward (the decode step), for GPUs. On the 2-core CPU it is
    slower than eager even after compiling (docs/performance.md)."""

    def __post_init__(self) -> None:
        _positive("perf.chunk", self.chunk)
        _positive("perf.max_active", self.max_active, allow_zero=True)
        _positive("perf.draft_tokens", self.draft_tokens, allow_zero=True)
        _positive("perf.draft_budget", self.draft_budget)


def refuse_fsdp(trainer: "TrainerConfig", instead: str) -> None:
    """Lightning 2.6 runs FSDP on CUDA only (its accelerator connector refuses any other
    accelerator), so no FSDP run of ours can be tested on the CPU our tests run on; what fits no
    single GPU goes through model.device_map instead."""
    if "fsdp" in str(trainer.strategy).lower():
        raise UserError(f"config key trainer.strategy: {trainer.strategy} is not supported (Lightning runs FSDP on CUDA "
                        f"only, untested here): {instead}")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    """lightning.Trainer accelerator: cpu, gpu, auto."""
    devices: Any = 1
    """lightning.Trainer devices: a count, a list of ids, or auto."""
    strategy: str = "auto"
    """lightning.Trainer strategy, e.g. ddp."""
    precision: Optional[str] = None
    """lightning.Trainer precision, e.g. bf16-mixed (null: Lightning's default)."""


def check_one_process(trainer: "TrainerConfig", key: str) -> None:
    """A device map spreads one model over the devices of one process: several processes (DDP,
    FSDP, DeepSpeed) would each load it over the same devices."""
    devices = trainer.devices
    one = devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    if not one:
        raise UserError(f"config key {key}: spreads one model over the devices of one process; it runs with "
                        f"trainer.devices=1 (got {devices}; the device map itself says which GPUs hold the layers)")
    if any(name in str(trainer.strategy).lower() for name in ("ddp", "fsdp", "deepspeed")):
        raise UserError(f"config key {key}: spreads one model over the devices of one process; it cannot be combined "
                        f"with trainer.strategy={trainer.strategy}")


@dataclass
class AdaptConfig:
    method: str = "latentseek"
    """cot, latentseek, resample, latentevolve, self_consistency, best_of_n, ltpo."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    ltpo: LtpoConfig = field(default_factory=LtpoConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    weaver: WeaverConfig = field(default_factory=WeaverConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_dir: Optional[str] = None
    """Results folder (default: runs/<date>-<time>-<config name>); an existing one resumes."""
    seed: int = 0
    """Seed of every random choice; the same seed gives the same predictions."""
    config_name: str = "default"
    """Name of the YAML the run came from (set by the loader; used in the default run_dir)."""

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        if self.method == "ltpo" and self.reward.kind != "confidence":
            raise UserError(f"config key reward.kind: method ltpo scores its thoughts by confidence (reward.kind=confidence), got {self.reward.kind}")
        if self.method == "ltpo" and self.perf.reference_mode:
            raise UserError("config key perf.reference_mode: method ltpo answers from input embeddings through the KV cache, which reference mode has not")
        refuse_fsdp(self.trainer, "shard the problems with ddp, and spread a model larger than one GPU with model.device_map")
        if self.model.device_map is not None:
            check_one_process(self.trainer, "model.device_map")
            if self.perf.compile:
                raise UserError("config key perf.compile: not supported with model.device_map (torch.compile has not been "
                                "tried on accelerate's hooks, which move activations and read offloaded layers inside the compiled forward)")


@dataclass
class TrainConfig:
    """``python train.py``: fit the latent weaver on a logged episodic memory."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    weaver: WeaverConfig = field(default_factory=WeaverConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_dir: Optional[str] = None
    """An adapt run folder: its memory (<run_dir>/memory) is used when memory.path is not set."""
    out: Optional[str] = None
    """Where the weaver checkpoint goes (default: <memory dir>/../weaver)."""
    seed: int = 0
    """Seed of the split and of training."""
    config_name: str = "train"
    """Name of the YAML the run came from (set by the loader)."""

    def __post_init__(self) -> None:
        refuse_fsdp(self.trainer, "train the weaver with ddp (each rank holds the whole LoRA backbone and trains its adapters)")
