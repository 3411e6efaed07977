"""The embedded default model: a tiny Llama trained here on generated arithmetic problems.

``MODEL_DIR`` is the shipped Hugging Face model directory (weights, tokenizer, chat
template); ``HELDOUT_PATH`` the bundled held-out problems (JSONL: ``id, problem, answer,
solution, steps``). Regenerate both with ``python -m lit_latent.embedded.train``.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
HELDOUT_PATH = Path(__file__).parent / "heldout.jsonl"

__all__ = ["MODEL_DIR", "HELDOUT_PATH"]
