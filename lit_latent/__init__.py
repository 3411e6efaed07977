"""lit_latent: test-time optimization of a frozen LLM's latents (LatentSeek, LatentEvolve) on Lightning."""

__version__ = "0.1.0"
