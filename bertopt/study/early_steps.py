"""How big are the first updates with and without Adam's bias correction, under warmup?

Without bias correction ``m`` and ``v`` start at 0 and are underestimated by the factors
``1 - b1^t`` and ``1 - b2^t``, so the update ``m / sqrt(v)`` is the corrected one times

    r(t) = (1 - b1^t) / sqrt(1 - b2^t)       (eps aside)

which is 3.2 at t=1, peaks near 6.5 around t=10 (for BERT's betas) and tends to 1 only after
a few thousand steps. BERT gets away without correction because warmup scales the learning
rate by t/W while r(t) is large. This module measures it on real runs: two MLM pretraining
runs of the same model, from the same initialisation, on the same batches, one with
``bias_correction=False`` (BERT) and one with ``True`` (AdamW), recording after every step the
norm of the Adam direction u = m_hat / (sqrt(v_hat) + eps) that each run applied, and the
size of each run's actual parameter change ``||delta theta||``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path


def analytic_ratio(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """Uncorrected / corrected Adam update size at step t (1-based), for eps -> 0."""
    return (1 - beta1**t) / math.sqrt(1 - beta2**t)


@dataclass
class EarlyStep:
    step: int  # 1-based update count
    lr: float  # the LR both runs used for this update
    ratio_analytic: float
    ratio_measured: float  # ||u|| without / with bias correction, each from its own run
    delta_bert: float  # ||theta_t - theta_{t-1}|| of the BERT run (no bias correction)
    delta_adamw: float  # the same for the bias-corrected run


def _direction_norm(optimizer, bias_correction: bool) -> float:
    """Norm over all parameters of the Adam direction the optimizer just applied."""
    import torch

    total = 0.0
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            t = float(state["step"])
            m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()
            if bias_correction:
                m, v = m / (1 - beta1**t), v / (1 - beta2**t)
            total += float(torch.sum((m / (v.sqrt() + group["eps"])) ** 2))
    return math.sqrt(total)


def measure(*, steps: int = 60, warmup_steps: int = 30, total_steps: int = 300, lr: float = 2e-3,
            preset: str = "tiny", batch_size: int = 16, seq_len: int = 64, seed: int = 0) -> list[EarlyStep]:
    """Run the two optimizers side by side for ``steps`` updates of the BERT schedule
    (``warmup_steps`` of ``total_steps``) and return one record per update."""
    import torch
    from transformers import BertForMaskedLM

    from bertopt.recipe import create_optimizer
    from bertopt.train import data as data_mod
    from bertopt.train.distributed import DistContext
    from bertopt.train.config import DEFAULT_VOCAB_SIZE
    from bertopt.train.pretrain import MaskedLMTask, default_cache_dir, masked_lm_objective
    from bertopt.train.presets import build_config

    prepared = data_mod.prepare_data(data_mod.wiki_corpus(), default_cache_dir(), vocab_size=DEFAULT_VOCAB_SIZE,
                                     seq_len=seq_len, log=lambda message: None)
    task = MaskedLMTask(prepared.train, prepared.eval[:8], vocab_size=prepared.vocab_size, batch_size=batch_size,
                        mask_prob=0.15, seed=seed, ctx=DistContext())
    config = build_config(preset=preset, config_file=None, vocab_size=prepared.vocab_size,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # same forward in both runs
    runs = []
    for bias_correction in (False, True):
        torch.manual_seed(seed)
        model = masked_lm_objective(BertForMaskedLM(config))
        opt, sched = create_optimizer(model, lr, total_steps, warmup_steps, bias_correction=bias_correction)
        runs.append((model, opt, sched, bias_correction))

    records = []
    for step in range(steps):
        batch = task.batch(step)
        measured = []
        for model, opt, sched, bias_correction in runs:
            lr_used = opt.param_groups[0]["lr"]
            before = [p.detach().clone() for p in model.parameters()]
            loss_sum, _ = task.run_model(model, batch)
            (loss_sum / len(batch.labels)).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            delta = math.sqrt(sum(float(torch.sum((p.detach() - b) ** 2)) for p, b in zip(model.parameters(), before)))
            measured.append((lr_used, _direction_norm(opt, bias_correction), delta))
        (lr_used, u_plain, d_plain), (_, u_corrected, d_corrected) = measured
        t = step + 1
        records.append(EarlyStep(t, lr_used, analytic_ratio(t), u_plain / u_corrected, d_plain, d_corrected))
    return records


def measure_cached(path: Path, **settings) -> list[EarlyStep]:
    """``measure(**settings)``, or its records from ``path`` when an earlier run with the same
    settings saved them there (so a resumed or split study measures once)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return [EarlyStep(**r) for r in saved["records"]]
    print("measuring the early steps with and without bias correction ...", flush=True)
    records = measure(**settings)
    path.write_text(json.dumps({"settings": settings, "records": [dataclasses.asdict(r) for r in records]}, indent=1))
    return records
