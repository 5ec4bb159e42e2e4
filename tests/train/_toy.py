"""A tiny regression task for testing the shared training loop without transformers."""

from __future__ import annotations

import torch

from bertopt.train.job import StepOutput
from bertopt.train.sampler import EpochBatchSampler


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # dropout makes the loss depend on the torch RNG, which --resume must restore
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def make_optimizer(model, total_steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total_steps)
    return optimizer, scheduler


class ToyTask:
    def __init__(self, num_examples: int = 64, batch_size: int = 8, rank: int = 0, world_size: int = 1,
                 hook=None):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(num_examples, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(num_examples, 1, generator=g)
        self.sampler = EpochBatchSampler(num_examples, batch_size, seed=7, rank=rank, world_size=world_size)
        self.hook = hook  # called with the step before each batch (tests use it to inject faults)

    def batch(self, step):
        if self.hook is not None:
            self.hook(step)
        idx = torch.from_numpy(self.sampler.indices(step))
        return self.x[idx], self.y[idx]

    def forward(self, model, batch):
        x, y = batch
        pred = model(x)
        return StepOutput(((pred - y) ** 2).sum(), count=len(y), tokens=x.numel(),
                          sums={"abs_error": (pred - y).abs().sum().item()})

    def evaluate(self, model):
        return {"eval_loss": float(((model(self.x) - self.y) ** 2).mean())}

    def data_position(self, step):
        return self.sampler.position(step)
