"""A synthetic model of any size, for transport and memory benchmarks.

``fl-server --model benchmarks.models:synthetic`` builds it; its size comes from the
environment (``FEDSTREAM_BENCH_MODEL_BYTES``), because the server calls a model factory
with the input shape and class count only. Clients that build the model by the run's
name read the same variables, so both ends agree on the manifest.

The weights are float32 blocks of at most ``FEDSTREAM_BENCH_TENSOR_BYTES`` each (64 MiB
by default) plus a small linear head, so the model still has a forward pass. Every block
is written at construction: untouched ``torch.zeros`` pages would not count in the
server's resident memory and would flatter the memory benchmarks.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

MODEL_BYTES_VAR = "FEDSTREAM_BENCH_MODEL_BYTES"
TENSOR_BYTES_VAR = "FEDSTREAM_BENCH_TENSOR_BYTES"
DEFAULT_TENSOR_BYTES = 64 << 20
FILL_VALUE = 1e-3


def block_sizes(total_bytes: int, tensor_bytes: int) -> list[int]:
    """Element counts of float32 blocks that hold ``total_bytes`` (rounded down to 4)."""
    elements, per_block = total_bytes // 4, max(1, tensor_bytes // 4)
    sizes = [per_block] * (elements // per_block)
    if elements % per_block:
        sizes.append(elements % per_block)
    return sizes


class SyntheticModel(nn.Module):
    """``len(blocks)`` float32 weight blocks and a linear head: (B, *input) -> (B, classes)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, sizes: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ParameterList(
            nn.Parameter(torch.empty(n).fill_(FILL_VALUE)) for n in sizes
        )
        self.head = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))  # type: ignore[no-any-return]


def synthetic(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Model factory for ``--model benchmarks.models:synthetic`` (size from the environment)."""
    total = int(os.environ.get(MODEL_BYTES_VAR, str(1 << 20)))
    tensor = int(os.environ.get(TENSOR_BYTES_VAR, str(DEFAULT_TENSOR_BYTES)))
    return SyntheticModel(input_shape, num_classes, block_sizes(total, tensor))


def synthetic_state(total_bytes: int, tensor_bytes: int = DEFAULT_TENSOR_BYTES
                    ) -> dict[str, torch.Tensor]:
    """The weight blocks alone as a state dict (in-process benchmarks)."""
    return {
        f"blocks.{i}": torch.empty(n).fill_(FILL_VALUE)
        for i, n in enumerate(block_sizes(total_bytes, tensor_bytes))
    }
