"""Where a model takes its inputs and where its latents come out, when its layers sit on several devices.

A model loaded with ``model.device_map`` (transformers' device maps, run by accelerate's hooks)
may have its layers on several GPUs, and some offloaded to CPU or disk: their parameters are on
``meta`` until a hook loads them for their own forward. ``next(model.parameters()).device`` then
says nothing. Token ids, masks and positions go where the input embeddings run
(``input_device``); latents, logits and the losses on them live where ``lm_head`` runs
(``output_device``). Hooks move activations between layers. On one device both are that device.
"""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module``'s forward runs: its accelerate hook's execution device, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    raise ValueError(f"{type(module).__name__} has no weights on a device and no accelerate hook that runs it")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids, attention masks and positions go: the input embeddings' device."""
    return execution_device(model.get_input_embeddings())


def output_device(model: nn.Module) -> torch.device:
    """Where latents, logits and the losses on them live: ``lm_head``'s device."""
    return execution_device(model.get_output_embeddings())


def device_mapped(model: nn.Module) -> bool:
    """Whether ``model`` was placed by a device map (accelerate's hooks or a chosen device): it
    stays where it was put, and must not be moved as a whole."""
    return getattr(model, "hf_device_map", None) is not None
