"""The frozen model's large linear layers on CPU through oneDNN, with their weights packed once.

PyTorch's CPU linear (MKL's sgemm) rearranges the weight into its own blocked layout at every
call. For the few rows of a decoding step, on weights too large for the cache, that rearranging
costs more than the multiplication: on the 2-core CPU, a Qwen2-0.5B-shaped MLP matrix times 12
rows takes 2.5 ms through ``F.linear`` and 1.15 ms through oneDNN with the weight packed ahead.
Small weights stay on MKL, which is faster for them (the embedded model's are all small, so its
records never pass here).

The packed copy is held beside the original weight (which other code reads: shapes, dtypes,
a device move), so packing costs the packed layers' memory once more; a model whose packed
layers would take more than ``MEMORY_SHARE`` of the machine's memory is left as it is. Outputs
differ from ``F.linear``'s by float rounding (another summation order); a forward that needs
gradients through the layer (LTPO's thoughts) or runs off the CPU takes ``F.linear``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

MIN_WEIGHT = 1 << 19  # elements: Qwen2-0.5B's 896 x 896 projections and up; the embedded model's 192 x 800 head not
MEMORY_SHARE = 0.25
PACK_ROWS = 16  # oneDNN's layout is chosen for this many rows; any number of rows works


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward on CPU multiplies by ``packed``, its weight in oneDNN's layout."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linear_weights(model, min_weight: int = MIN_WEIGHT) -> int:
    """Turn the float32 ``nn.Linear`` layers of ``model`` on CPU with at least ``min_weight``
    weights (not its output head: the latents' loss backpropagates through it) into
    ``PackedLinear``s. Returns how many; 0 where oneDNN is missing or the copies would not fit."""
    if not torch.backends.mkldnn.is_available():
        return 0
    head = model.get_output_embeddings()
    chosen = [m for m in model.modules() if type(m) is nn.Linear and m is not head and m.weight.device.type == "cpu"
              and m.weight.dtype == torch.float32 and m.weight.numel() >= min_weight]
    extra = sum(m.weight.numel() * m.weight.element_size() for m in chosen)
    if extra > MEMORY_SHARE * _physical_memory():
        return 0
    for module in chosen:
        module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACK_ROWS)
        module.__class__ = PackedLinear
    return len(chosen)


def _physical_memory() -> int:
    """The machine's memory in bytes (8 GiB where the OS does not say, e.g. no ``os.sysconf`` on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 << 30
