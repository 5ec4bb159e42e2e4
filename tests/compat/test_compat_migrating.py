"""The numbers in docs/migrating.md: what changes when you move off an old optimizer.

Each test runs an old optimizer (transformers 4.49's AdamW from the recorded fixture,
pytorch-pretrained-bert 0.6.2's BertAdam live) against the replacement the doc suggests
other than the drop-in, on the same problems as test_compat_adamw.py /
test_compat_bert_adam.py, and bounds the largest parameter difference after all steps.
The doc quotes the measured values (torch 2.13 CPU) given in the comments.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

import bertopt
import test_compat_adamw as hf
import test_compat_bert_adam as ppb_tests


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(hf.FIXTURE.read_text())


def replay_final_gap(fixture, name, make_optimizer) -> float:
    """Largest |p - transformers' p| over all steps of a scenario, for another optimizer."""
    scenario = fixture["scenarios"][name]
    params = [torch.nn.Parameter(t) for t in hf.tensors(fixture, "initial")]
    opt = make_optimizer(hf.param_groups(fixture, params, scenario))
    c, d = hf.tensors(fixture, "c"), hf.tensors(fixture, "d")
    worst = 0.0
    for k, recorded in enumerate(scenario["steps"]):
        hf.loss_fn(params, c, d, fixture["problem"]["factors"][k]).backward()
        opt.step()
        opt.zero_grad()
        for p, want in zip(params, recorded["params"]):
            worst = max(worst, (p.detach() - torch.tensor(want).reshape(p.shape)).abs().max().item())
    return worst


def test_torch_adamw_is_not_transformers_adamw(fixture):
    # correct_bias=True, wd 0.05, lr 1e-2, 40 steps: measured 5.6e-4 (eps scaled by
    # sqrt(1 - b2^t) in torch, not in transformers; decay before vs after the step).
    gap = replay_final_gap(fixture, "bias_correction_decay",
                           lambda g: torch.optim.AdamW(g, lr=1e-2, eps=1e-6, weight_decay=0.05))
    assert 1e-4 < gap < 5e-3, gap
    # Without decay only the eps placement differs: measured 6.3e-4.
    gap = replay_final_gap(fixture, "bias_correction", lambda g: torch.optim.AdamW(g, lr=1e-2, eps=1e-6, weight_decay=0.0))
    assert 1e-4 < gap < 5e-3, gap


def test_bertopt_bert_adam_for_correct_bias_false(fixture):
    # transformers' AdamW(correct_bias=False) and Google's update differ only in when the
    # decay applies (to p after the step vs before): lr^2 * wd * u per step, carried forward
    # by the problem. Measured 7.4e-4 (lr 1e-2, wd 0.05, 40 steps).
    gap = replay_final_gap(fixture, "bert_no_bias_correction",
                           lambda g: bertopt.BertAdam(g, lr=1e-2, eps=1e-6, weight_decay=0.05))
    assert 1e-4 < gap < 5e-3, gap
    # Without decay they are the same update: measured 1.8e-7 (1-2 float32 ulps).
    gap = replay_final_gap(fixture, "no_bias_correction_no_decay",
                           lambda g: bertopt.BertAdam(g, lr=1e-2, eps=1e-6, weight_decay=0.0))
    assert gap < 1e-6, gap


def ppb_gap(ppb_kwargs, make_bertopt, steps=ppb_tests.NUM_STEPS) -> float:
    theirs = ppb_tests.run(lambda g: ppb_tests.ppb.BertAdam(g, **ppb_kwargs))
    ours = ppb_tests.run(make_bertopt, steps=steps)
    return ppb_tests.max_gap(theirs, ours)


def bertopt_with_rebased_schedule(total, warmup, **kwargs):
    """bertopt.BertAdam + bert_schedule(style="rebased"), stepping the scheduler after each step."""
    def make(groups):
        opt = bertopt.BertAdam(groups, **kwargs)
        sched = bertopt.bert_schedule(opt, total, warmup, style="rebased")
        original_step = opt.step

        def step(closure=None):
            out = original_step(closure)
            sched.step()
            return out

        opt.step = step
        return opt

    return make


def test_ppb_without_clipping_is_bertopt_bert_adam_with_the_rebased_schedule():
    # Same update, same schedule (warmup 0.1 * 40 = 4 steps); measured 6.0e-8 (1 ulp).
    logging.getLogger("pytorch_pretrained_bert").setLevel(logging.ERROR)
    gap = ppb_gap(dict(lr=1e-3, warmup=0.1, t_total=40, max_grad_norm=-1),
                  bertopt_with_rebased_schedule(40, 4, lr=1e-3, max_grad_norm=None))
    assert gap < 1e-6, gap


def test_ppb_clipping_per_tensor_is_not_bertopts_global_clip():
    # Per-tensor clip (ppb) vs global-norm clip (Google, bertopt): measured 1.1e-2 after 40 steps.
    gap = ppb_gap(dict(lr=1e-3, warmup=0.1, t_total=40),
                  bertopt_with_rebased_schedule(40, 4, lr=1e-3, max_grad_norm=1.0))
    assert gap > 1e-3, gap


def test_no_deprecation_warning_from_the_drop_ins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bertopt.compat.AdamW([torch.nn.Parameter(torch.ones(1))], no_deprecation_warning=False)
        bertopt.compat.BertAdam([torch.nn.Parameter(torch.ones(1))], lr=1e-3, schedule="none")
