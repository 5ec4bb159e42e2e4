"""Lamb and BertAdam on FSDP2-sharded parameters equal the same steps unsharded.

Two processes (gloo, CPU) each hold half of every parameter as a DTensor
(``torch.distributed.fsdp.fully_shard``). LAMB's trust ratio ``||p|| / ||u||`` and the
global gradient norm must be those of the whole tensors; a shard's norm is not. The
model has BERT-like names (so ``param_groups`` excludes LayerNorm/bias from decay) and
dimensions that do not split evenly in two, including a 1-row weight whose second
shard is empty. The sharded model runs forward/backward under FSDP2; the unsharded copy
(in the same process) replays the very same gradients, so what is compared is the
optimizer alone (fed back through the model, last-bit differences grow with each step
and would blur the comparison).

Each case also runs a deliberately naive variant (norms of the local shards), which
must be far off: the comparison can fail.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bertopt
from bertopt.optim import _lamb, clip
from bertopt.optim.native import build, kernels

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]

WORLD_SIZE = 2
STEPS = 5
# fp32: the sharded run sums squares shard by shard, then across processes; the
# unsharded one in one pass. Norms (and so r and the clip coefficient) differ in the
# last bits; over 5 steps with lr 0.05 on parameters of order 1 (|p| < 4) that stays
# within a few float32 ulps (measured max 2.4e-7, 1-2 ulps; BertAdam: bit-identical). The naive
# shard-local variants are off by > 1e-2.
PARAM_ATOL = 1e-6
NORM_RTOL = 1e-6
NAIVE_MIN_DIFF = 1e-3


class Layer(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.attention = nn.Module()
        self.attention.dense = nn.Linear(hidden, hidden)
        self.attention.LayerNorm = nn.LayerNorm(hidden)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, x):
        x = self.attention.LayerNorm(x + torch.tanh(self.attention.dense(x)))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class TinyBert(nn.Module):
    """Vocab 13, hidden 7, intermediate 9: nothing splits evenly across 2 ranks."""

    def __init__(self, vocab: int = 13, hidden: int = 7, intermediate: int = 9, layers: int = 2):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden)
        self.layer = nn.ModuleList(Layer(hidden, intermediate) for _ in range(layers))
        self.cls = nn.Module()
        self.cls.decoder = nn.Linear(hidden, vocab)
        self.cls.seq_relationship = nn.Linear(hidden, 1)  # 1 row: rank 1's shard is empty

    def forward(self, ids, targets):
        x = self.embeddings.LayerNorm(self.embeddings.word_embeddings(ids))
        for layer in self.layer:
            x = layer(x)
        mlm = F.cross_entropy(self.cls.decoder(x).flatten(0, 1), targets.flatten())
        return mlm + self.cls.seq_relationship(x[:, 0]).pow(2).mean()


def make_model() -> TinyBert:
    torch.manual_seed(0)
    return TinyBert()


def batches():
    """Per step: token ids, targets and a loss scale (grad norm ~0.2 on even steps, ~10 on
    odd ones, so the global-norm clip triggers on some steps and not on others)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 13, (4, 5), generator=g), torch.randint(0, 13, (4, 5), generator=g),
             4.0 if i % 2 else 0.05) for i in range(STEPS)]


CASES = {
    # name: (optimizer class, kwargs)
    "lamb-reference": ("Lamb", dict(lr=0.05, foreach=False, fused=False)),
    "lamb-foreach": ("Lamb", dict(lr=0.05, foreach=True)),
    "lamb-fused": ("Lamb", dict(lr=0.05, fused=True)),  # float32 CPU: the C kernel on local shards
    "lamb-fused-torch": ("Lamb", dict(lr=0.05, fused=True)),  # torch's fused kernel (C kernel off)
    "lamb-fused-always-adapt-clamped": ("Lamb", dict(lr=0.05, fused=True, always_adapt=True, trust_clip=(0.1, 3.0))),
    "lamb-foreach-no-bias-correction": ("Lamb", dict(lr=0.05, foreach=True, bias_correction=False, always_adapt=True)),
    "bertadam-reference": ("BertAdam", dict(lr=0.01, max_grad_norm=1.0, foreach=False)),
    "bertadam-foreach": ("BertAdam", dict(lr=0.01, max_grad_norm=1.0, foreach=True)),
    "bertadam-fused": ("BertAdam", dict(lr=0.01, max_grad_norm=1.0, fused=True)),  # the C kernel on local shards
    "bertadam-fused-torch": ("BertAdam", dict(lr=0.01, max_grad_norm=1.0, fused=True)),  # torch's fused kernel
}

# The entry points of our C kernels (BertAdam's, LAMB's two-call and one-call paths).
C_KERNELS = ((kernels, "adam_step"), (kernels, "lamb_moments"), (kernels, "lamb_step"))
# Also run with shard-local norms patched in: the comparison must catch that bug.
NAIVE_CASES = ["lamb-reference", "lamb-fused", "lamb-fused-torch", "bertadam-foreach", "bertadam-fused"]


def shard_local_norms(cls_name: str):
    """Patches that make an optimizer use norms of the local shards (the bug guarded against):
    LAMB's trust-ratio norms (its global grad norm stays right), BertAdam's global grad norm."""
    local_norm = lambda t: torch.linalg.vector_norm(clip.local_part(t))  # noqa: E731
    local_sums = lambda sums, tensors: sums  # noqa: E731
    if cls_name == "Lamb":
        return [mock.patch.object(_lamb, "whole_norm", local_norm),
                mock.patch.object(_lamb, "whole_sums_of_squares", local_sums)]
    return [mock.patch.object(clip, "whole_sums_of_squares", local_sums)]


def train(case: str, sharded: bool, naive: bool = False, replay: list | None = None):
    """STEPS optimizer steps from the same start.

    Returns the full parameters, the grad norm of each step and the (full) gradients
    used. With ``replay`` the model is not run: those gradients are set instead, so two
    runs see identical gradients and differ only by what the optimizer does.
    """
    from torch.distributed.fsdp import fully_shard

    cls_name, kwargs = CASES[case]
    model = make_model()
    if sharded:
        for layer in model.layer:
            fully_shard(layer)
        fully_shard(model)
    params = dict(model.named_parameters())
    optimizer = getattr(bertopt, cls_name)(bertopt.param_groups(model, weight_decay=0.01), **kwargs)
    patches = shard_local_norms(cls_name) if naive else []
    if case.endswith("-torch"):  # our C kernels off: the torch path other devices take
        patches += [mock.patch.object(build, "library", lambda: None)]
    # count the C kernels' calls: the fused cases must run them on the local shards
    patches += [mock.patch.object(module, name, wraps=getattr(module, name)) for module, name in C_KERNELS]
    for p in patches:
        p.start()
    norms, grads = [], []
    try:
        for step, (ids, targets, scale) in enumerate(batches()):
            if replay is None:
                (model(ids, targets) * scale).backward()
            else:
                for name, p in params.items():
                    p.grad = replay[step][name].clone()
            # (before step(): the fused paths leave the clipped gradient in .grad)
            grads.append({n: (p.grad.full_tensor() if sharded else p.grad).clone() for n, p in params.items()})
            optimizer.step()
            optimizer.zero_grad()
            norms.append(optimizer.last_grad_norm.item())
        native_calls = sum(getattr(module, name).call_count for module, name in C_KERNELS)  # the mocks
    finally:
        for p in patches:
            p.stop()
    full = {n: (p.full_tensor() if sharded else p).detach().clone() for n, p in params.items()}
    return full, norms, grads, native_calls


def compare(case: str, naive: bool) -> dict:
    sharded, sharded_norms, grads, native_calls = train(case, sharded=True, naive=naive)
    plain, plain_norms, _, _ = train(case, sharded=False, replay=grads)
    start = make_model().state_dict()
    return {
        "param_diff": max((sharded[n] - plain[n]).abs().max().item() for n in plain),
        "norm_rel_diff": max(abs(a - b) / b for a, b in zip(sharded_norms, plain_norms)),
        "clipped_steps": sum(n > 1.0 for n in plain_norms),
        "unclipped_steps": sum(n <= 1.0 for n in plain_norms),
        "moved": max((plain[n] - start[n]).abs().max().item() for n in plain),
        "native_calls_sharded": native_calls,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes on a shared machine; also fork-safe OpenMP
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for case in CASES:
            results[case] = compare(case, naive=False)
        for case in NAIVE_CASES:
            results[case + "-naive"] = compare(case, naive=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.distributed.fsdp  # noqa: F401  (import once here, before forking)

    out_dir = tmp_path_factory.mktemp("sharded")
    # fork: the children inherit the imported modules (spawn re-imports torch: ~20 s).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    torch.multiprocessing.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE,
                                          start_method=method)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for case in CASES:  # (the naive variants see different local norms on each rank)
        assert ranks[0][case] == ranks[1][case], f"{case}: the two processes disagree"
    return ranks[0]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_steps_equal_unsharded_steps(results, case):
    r = results[case]
    assert r["moved"] > 0.01, "the parameters hardly moved; the comparison would prove nothing"
    assert r["clipped_steps"] >= 2 and r["unclipped_steps"] >= 2, "the clip should trigger on some steps only"
    assert r["param_diff"] <= PARAM_ATOL, r
    assert r["norm_rel_diff"] <= NORM_RTOL, r
    uses_c_kernel = case.split("-")[1] == "fused" and not case.endswith("-torch")
    assert (r["native_calls_sharded"] > 0) == uses_c_kernel, r


@pytest.mark.parametrize("case", NAIVE_CASES)
def test_shard_local_norms_would_be_caught(results, case):
    naive = results[case + "-naive"]
    assert naive["param_diff"] > NAIVE_MIN_DIFF, naive
    if case.startswith("bertadam"):  # its only norm is the global grad norm, via the clip
        assert naive["norm_rel_diff"] > 0.01, naive
