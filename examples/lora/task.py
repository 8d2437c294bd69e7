"""Fine-tuning a small transformer language model with LoRA; only the adapters travel.

The model is a tiny GPT-2 built locally from a ``transformers`` config class (random
weights, seeded: every process builds the same base model, and the task's fingerprint
checks that). ``peft`` wraps its attention projections with LoRA adapters (Hu et al.
2021, arXiv:2106.09685); the base weights are frozen and never leave a process:
``exchange`` names only the adapter tensors, so each round moves a few kilobytes
instead of the whole model. The data is character-level text, sums such as ``"17+25=42"``,
different numbers on every client.

    fl-local --task examples.lora.task:LoraTask --clients 2 --rounds 3
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fedstream.common.task import Context, Partition, Task
from torch import nn

VOCAB = "0123456789+=;"
SEQUENCE = 24


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def sums(count: int, seed: int) -> torch.Tensor:
    """(count, SEQUENCE) token ids of ``a+b=c;`` strings packed end to end."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        text = ""
        while len(text) < SEQUENCE:
            a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=generator))
            text += f"{a}+{b}={a + b};"
        rows.append(encode(text[:SEQUENCE]))
    return torch.tensor(rows)


@dataclass(frozen=True)
class Texts:
    train: torch.Tensor  # (N, SEQUENCE) token ids
    test: torch.Tensor


class LoraTask(Task):  # type: ignore[misc]
    """A 2-layer GPT-2 (random init) with rank-``rank`` LoRA on its attention."""

    def __init__(self, rank: int = 4, width: int = 64, layers: int = 2,
                 examples: int = 256) -> None:
        self.rank, self.width, self.layers, self.examples = rank, width, layers, examples

    def options(self) -> dict[str, int]:
        return {"rank": self.rank, "width": self.width, "layers": self.layers,
                "examples": self.examples}

    def build_model(self) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(VOCAB), n_positions=SEQUENCE, n_embd=self.width,
                            n_layer=self.layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        base = GPT2LMHeadModel(config)
        lora = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0,
                          target_modules=["c_attn"], fan_in_fan_out=True)
        return get_peft_model(base, lora)  # type: ignore[no-any-return]

    def exchange(self, model: nn.Module) -> list[str]:
        return [name for name in model.state_dict() if "lora_" in name]

    def load_data(self, partition: Partition) -> Texts:
        seed = partition.seed * 1_000 + partition.index
        return Texts(sums(self.examples, seed), sums(self.examples // 4, seed + 500))

    def server_data(self) -> Texts:
        return Texts(torch.empty(0, SEQUENCE, dtype=torch.long),
                     sums(self.examples // 2, 999_999))

    def train(self, model: nn.Module, data: Texts, ctx: Context) -> dict[str, float]:
        lr = float(ctx.config.get("lora_lr", 1e-2))
        epochs = int(ctx.config.get("local_epochs", 1))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr)
        generator = torch.Generator().manual_seed(ctx.seed)
        model.train()
        total, steps = 0.0, 0
        for _ in range(epochs):
            for index in torch.randperm(len(data.train), generator=generator).split(16):
                if ctx.should_stop():
                    break
                batch = data.train[index]
                loss = model(input_ids=batch, labels=batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
        return {"loss": total / max(1, steps), "num_examples": len(data.train)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Texts, ctx: Context) -> dict[str, float]:
        model.eval()
        loss = float(model(input_ids=data.test, labels=data.test).loss)
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(loss))),
                "num_examples": len(data.test)}
