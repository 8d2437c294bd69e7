"""Differential privacy: central (on the server's sum) and local (on a client's delta).

Central DP follows DP-FedAvg, McMahan, Ramage, Talwar and Zhang 2018, "Learning
Differentially Private Recurrent Language Models", ICLR, arXiv:1710.06963: every client's
update is clipped to L2 norm C, the clipped updates are summed with equal weights (a
claimed example count would change the sensitivity), Gaussian noise of standard deviation
``noise_multiplier * C`` is added to every coordinate of the sum, and the noisy sum is
divided by the number of clients. :class:`PrivateMeanReduction` does this streaming: each
upload is read twice at acceptance (its norm, then the clipped fold) and released, so the
memory is one running sum whatever the number of clients (kept in float64, as noise and
clipping factors are applied in full precision). Only floating-point tensors are private
and updated; integer counters (``num_batches_tracked``) would reveal how much a client
trained and are left unchanged.

Adaptive clipping follows Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping", NeurIPS, arXiv:1905.03871: after each round,
``C <- C * exp(-clip_lr * (b - target_quantile))`` where ``b`` is the noisy fraction of
clients whose update norm was at most C (count noise of standard deviation
``count_stddev``, by default K/20 as the paper suggests). The update's noise multiplier is
then ``(z^-2 - (2 count_stddev)^-2)^(-1/2)`` so that the round, count included, spends the
privacy of noise multiplier ``z``.

The noise comes from a ``torch.Generator`` (Mersenne Twister), seeded from the operating
system unless a seed is given, and its state is checkpointed so a resumed run draws the
same noise as an uninterrupted one. It is not a cryptographically secure generator; a
deployment that needs one should say so (Opacus' ``secure_mode`` makes the same caveat).

Privacy accounting (epsilon for a given delta after each round) is not done here.

:func:`local_dp` is the client-side counterpart: clip one delta, add noise, before upload.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.server.aggregate import APPLY_BLOCK_ELEMENTS
from fedstream.server.strategies.base import (
    ApplyBlock,
    Info,
    StagedUpload,
    StrategyError,
    iter_blocks,
)
from fedstream.server.upload import READ_BLOCK_BYTES


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / ||delta||): the factor that brings a norm down to at most C."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the floating-point tensors of a delta, taken together (in float64)."""
    total = 0.0
    for tensor in delta.values():
        if tensor.is_floating_point():
            wide = tensor.reshape(-1).to(torch.float64)
            total += float(torch.dot(wide, wide))
    return math.sqrt(total)


def local_dp(
    delta: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Local DP on a client's delta: clip to L2 norm C, add N(0, (sigma C)^2) everywhere.

    Pure: returns new tensors in the delta's dtypes; integer tensors pass unchanged.
    """
    if clip_norm <= 0:
        raise StrategyError(f"local DP: clip_norm must be positive, got {clip_norm}")
    if noise_multiplier < 0:
        raise StrategyError(f"local DP: noise_multiplier must be >= 0, got {noise_multiplier}")
    factor = clip_factor(update_norm(delta), clip_norm)
    stddev = noise_multiplier * clip_norm
    private: dict[str, torch.Tensor] = {}
    for name, tensor in delta.items():
        if not tensor.is_floating_point():
            private[name] = tensor.clone()
            continue
        wide = tensor.to(torch.float64) * factor
        if stddev > 0:
            wide += torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * stddev
        private[name] = wide.to(tensor.dtype)
    return private


class CentralPrivacy:
    """The run's DP settings and the state that outlives a round (clip norm, generator)."""

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.count_stddev = count_stddev
        self.generator = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else seed
        )

    def round_noise(self, num_clients: int) -> tuple[float, float]:
        """(noise multiplier of the update, stddev of the count noise) for one round."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier, 0.0
        count_stddev = self.count_stddev if self.count_stddev is not None else num_clients / 20
        if 2 * count_stddev <= self.noise_multiplier:
            raise StrategyError(
                f"adaptive clipping: option 'dp_count_stddev' ({count_stddev:g}) must exceed "
                f"half of 'dp_noise_multiplier' ({self.noise_multiplier:g}); with "
                f"{num_clients} clients set it explicitly"
            )
        update = (self.noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5
        return update, count_stddev

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "clip_norm" not in state or "generator" not in state:
            raise StrategyError("checkpoint has no differential-privacy state for this run")
        self.clip_norm = float(state["clip_norm"])
        self.generator.set_state(state["generator"])


class PrivateMeanReduction:
    """DP-FedAvg's clipped, noised, equally weighted mean; memory: one float64 sum."""

    def __init__(self, manifest: Manifest, privacy: CentralPrivacy) -> None:
        self.manifest = manifest
        self.privacy = privacy
        self.clip_norm = privacy.clip_norm  # fixed for the round
        self._floating = [s for s in manifest.specs if s.torch_dtype.is_floating_point]
        self._sums = {s.name: torch.zeros(s.numel, dtype=torch.float64) for s in self._floating}
        self.count = 0
        self.unclipped = 0

    def _blocks(self, upload: StagedUpload) -> Iterator[tuple[TensorSpec, int, torch.Tensor]]:
        for spec in self._floating:
            per_block = max(1, READ_BLOCK_BYTES // spec.itemsize)
            for start in range(0, spec.numel, per_block):
                count = min(per_block, spec.numel - start)
                yield spec, start, upload.read(spec.name, start, count)

    def take(self, upload: StagedUpload, weight: int) -> bool:
        squares = 0.0
        for _, _, values in self._blocks(upload):
            wide = values.to(torch.float64)
            squares += float(torch.dot(wide, wide))
        norm = math.sqrt(squares)
        factor = clip_factor(norm, self.clip_norm)
        for spec, start, values in self._blocks(upload):
            self._sums[spec.name][start : start + values.numel()].add_(
                values.to(torch.float64), alpha=factor
            )
        self.count += 1
        self.unclipped += norm <= self.clip_norm
        upload.release()
        return False

    def close(self) -> None:
        """Nothing is kept: every upload was released when it was folded."""

    def reduce(self, apply: ApplyBlock) -> Info:
        noise_multiplier, count_stddev = self.privacy.round_noise(self.count)
        stddev = noise_multiplier * self.clip_norm
        generator = self.privacy.generator
        for spec, start, count in iter_blocks(self.manifest, APPLY_BLOCK_ELEMENTS):
            if spec.name not in self._sums:
                continue  # integer counters: not private, left unchanged
            block = self._sums[spec.name][start : start + count].clone()
            if stddev > 0:
                noise = torch.randn(count, generator=generator, dtype=torch.float64)
                block.add_(noise, alpha=stddev)
            apply(spec, start, block.div_(self.count))
        info: Info = {
            "dp_clip_norm": self.clip_norm,
            "dp_noise_stddev": stddev,
            "dp_clients": self.count,
            "dp_unclipped": self.unclipped,
        }
        if self.privacy.adaptive:
            noisy = float(self.unclipped)
            if count_stddev > 0:
                noise = torch.randn((), generator=generator, dtype=torch.float64)
                noisy += float(noise) * count_stddev
            fraction = noisy / self.count
            self.privacy.clip_norm = self.clip_norm * math.exp(
                -self.privacy.clip_lr * (fraction - self.privacy.target_quantile)
            )
            info["dp_next_clip_norm"] = self.privacy.clip_norm
        return info
