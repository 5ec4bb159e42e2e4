"""The competitors: one full BERT optimizer step each (global-norm clip + Adam + decay).

Every method is built around the same parameters and gradients. ``build`` returns a
zero-argument callable that performs one step. When ``moments`` is given, the method's
optimizer state is pre-filled with those tensors, so that all methods of a timing run
share one set of p, g, m, v: the memory of one model instead of seven, and the same
cache state for everybody. Timing does not depend on the values (no denormals arise:
see ``harness.make_tensors``). When ``moments`` is None the optimizer allocates its own
state, as it would in training (used by the memory measurement).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import bertopt
from bertopt.bench.shapes import decays
from bertopt.optim.native import build as native_build

# BERT's fine-tuning/pre-training hyperparameters.
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 1e-6, 0.01, 1.0

Moments = tuple[list[Tensor], list[Tensor]]
StepFn = Callable[[], None]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    build: Callable[[list[nn.Parameter], list[str], Moments | None], StepFn]
    # Nominal bytes moved per float32 parameter by the algorithm as written (for the table).
    nominal_bytes: int
    slow: bool = False  # a Python loop per tensor: fewer repetitions are enough
    peer: bool = False  # another project's optimizer step: compiled or built first (not in --quick)


def _groups(params: list[nn.Parameter], names: list[str]) -> list[dict]:
    """BERT's two groups: decay, and no decay for LayerNorm and bias (Google's names rule)."""
    decay = [p for p, n in zip(params, names) if decays(n)]
    no_decay = [p for p, n in zip(params, names) if not decays(n)]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _prefill(opt: torch.optim.Optimizer, params, moments: Moments | None, keys=("exp_avg", "exp_avg_sq"), step=None):
    if moments is None:
        return
    for p, m, v in zip(params, *moments):
        opt.state[p] = {"step": step() if step else torch.zeros((), dtype=torch.float32), keys[0]: m, keys[1]: v}


def _torch_adamw(kind: str):
    def build(params, names, moments):
        opt = torch.optim.AdamW(_groups(params, names), lr=LR, betas=BETAS, eps=EPS, **{kind: True})
        _prefill(opt, params, moments)

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
            opt.step()

        return step

    return build


def _bertopt(optimizer: str, foreach: bool | None, fused: bool | None, native: bool = True):
    """A bertopt optimizer ("BertAdam" or "Lamb") with BERT's settings and clipping."""
    def build(params, names, moments):
        cls = getattr(bertopt, optimizer)
        opt = cls(_groups(params, names), lr=LR, betas=BETAS, eps=EPS,
                  max_grad_norm=MAX_GRAD_NORM, foreach=foreach, fused=fused)
        _prefill(opt, params, moments)
        if native:
            return opt.step

        def step():  # the same optimizer on torch's fused kernels
            previous = native_build.use_native(False)
            try:
                opt.step()
            finally:
                native_build.use_native(previous)

        return step

    return build


def _ppb_bert_adam(params, names, moments):
    from pytorch_pretrained_bert.optimization import BertAdam as PPBBertAdam

    logging.getLogger("pytorch_pretrained_bert.optimization").setLevel(logging.ERROR)  # "t_total -1" notice
    # schedule="none": a constant LR, so only the optimizer itself is timed. ppb clips
    # each tensor by its own norm (not the global norm): that is its algorithm.
    opt = PPBBertAdam(_groups(params, names), lr=LR, b1=BETAS[0], b2=BETAS[1], e=EPS,
                      weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, schedule="none")
    _prefill(opt, params, moments, keys=("next_m", "next_v"), step=lambda: 0)

    def step():
        with warnings.catch_warnings():  # its add_(scalar, tensor) overload is deprecated
            warnings.simplefilter("ignore", UserWarning)
            opt.step()

    return step


def _ppb_available() -> str | None:
    try:
        import pytorch_pretrained_bert.optimization  # noqa: F401
    except ImportError:
        return "pytorch-pretrained-bert is not installed (pip install pytorch-pretrained-bert==0.6.2)"
    return None


COMPILED = "compiled"
DEEPSPEED = "deepspeed-cpuadam"

# What building a method cost before it was timed (compile time, result checks), per
# method and size: reported next to the timings, never part of them.
SETUP_NOTES: list[dict] = []


def _adam_reference_step(params, grads, ms, vs, decay_flags, lr):
    """BERT's step on copies, one tensor at a time (bertopt's reference, global clip)."""
    from bertopt.optim import _adam
    from bertopt.optim.clip import clip_coefficient

    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).float()
    coef = clip_coefficient(norm, MAX_GRAD_NORM)
    for p, g, m, v, decays_ in zip(params, grads, ms, vs, decay_flags):
        h = _adam.AdamHyper(lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY if decays_ else 0.0,
                            bias_correction=False, decoupled=True)
        _adam.bert_adam_reference([p], [g], [m], [v], [torch.zeros(())], h, coef)


def _compiled_bert_step(params, grads, exp_avgs, exp_avg_sqs, decayed, decayed_params, lr):
    """A foreach BERT step as one would write it for torch.compile: TF-style global clip,
    Adam without bias correction, eps outside the sqrt, decoupled decay; ``lr`` a tensor."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = MAX_GRAD_NORM * torch.minimum(1.0 / norm, torch.tensor(1.0 / MAX_GRAD_NORM))
    g = torch._foreach_mul(grads, coef)
    torch._foreach_mul_(exp_avgs, BETAS[0])
    torch._foreach_add_(exp_avgs, g, alpha=1 - BETAS[0])
    torch._foreach_mul_(exp_avg_sqs, BETAS[1])
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - BETAS[1])
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, EPS)
    u = torch._foreach_div(exp_avgs, denom)
    torch._foreach_add_([u[i] for i in decayed], decayed_params, alpha=WEIGHT_DECAY)
    torch._foreach_mul_(u, lr)
    torch._foreach_sub_(params, u)


def _compiled(params, names, moments):
    """``torch.compile`` (inductor) of ``_compiled_bert_step``. Compiled once at build time
    (reported in SETUP_NOTES, not timed); its first step is checked against bertopt's
    reference on copies before anything is timed."""
    decay_flags = [decays(n) for n in names]
    decayed = [i for i, d in enumerate(decay_flags) if d]
    if moments is None:
        moments = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])
    ms, vs = moments
    lr = torch.tensor(LR)
    fn = torch.compile(_compiled_bert_step)
    data = [p.detach() for p in params]
    grads = [p.grad for p in params]
    decayed_params = [data[i] for i in decayed]

    def step():
        with torch.no_grad():
            fn(data, grads, ms, vs, decayed, decayed_params, lr)

    before = [[t.clone() for t in ts] for ts in (data, ms, vs)]
    t0 = time.perf_counter()
    step()  # compiles
    compile_s = time.perf_counter() - t0
    ref_p, ref_m, ref_v = before
    _adam_reference_step(ref_p, [g.clone() for g in grads], ref_m, ref_v, decay_flags, LR)
    diff = max(float((a - b).abs().max()) if a.numel() else 0.0
               for xs, ys in ((ref_p, data), (ref_m, ms), (ref_v, vs)) for a, b in zip(xs, ys))
    del before, ref_p, ref_m, ref_v
    SETUP_NOTES.append({"method": "compiled", "params": sum(p.numel() for p in params),
                        "compile_s": round(compile_s, 2), "max_abs_diff_vs_reference": diff})
    if not diff <= 1e-6:  # parameters of order 0.02, lr 1e-4: a wrong update differs by ~1e-4
        raise RuntimeError(f"the compiled step differs from bertopt's reference by {diff:.3g}")
    return step


def _deepspeed_cpuadam(params, names, moments):
    """torch's ``clip_grad_norm_`` + DeepSpeed's CPU Adam (AdamW mode, no bias correction)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    t0 = time.perf_counter()
    opt = DeepSpeedCPUAdam(_groups(params, names), lr=LR, betas=BETAS, eps=EPS, adamw_mode=True,
                           bias_correction=False)
    SETUP_NOTES.append({"method": "deepspeed-cpuadam", "params": sum(p.numel() for p in params),
                        "build_or_load_s": round(time.perf_counter() - t0, 2)})
    _prefill(opt, params, moments)

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
        opt.step()

    return step


def _deepspeed_available() -> str | None:
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError
    except ImportError:
        return ("deepspeed is not installed (pip install deepspeed ninja py-cpuinfo; DS_ACCELERATOR=cpu; "
                "see benchmarks/README.md)")
    return None


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("torch-adamw-fused", "torch clip_grad_norm_ + AdamW(fused=True)", _torch_adamw("fused"), 40),
        Method("torch-adamw-foreach", "torch clip_grad_norm_ + AdamW(foreach=True)", _torch_adamw("foreach"), 40),
        Method("ppb-bertadam", "pytorch-pretrained-bert 0.6.2 BertAdam (per-tensor clip)", _ppb_bert_adam, 40, slow=True),
        Method("bertopt-reference", "bertopt BertAdam(foreach=False): one tensor at a time",
               _bertopt("BertAdam", foreach=False, fused=False), 32, slow=True),
        Method("bertopt-foreach", "bertopt BertAdam(foreach=True)", _bertopt("BertAdam", foreach=True, fused=None), 32),
        Method("bertopt-fused-torch", "bertopt BertAdam(fused=True) on torch's fused kernel (grad_scale)",
               _bertopt("BertAdam", foreach=None, fused=True, native=False), 36),
        Method("bertopt-fused", "bertopt BertAdam(fused=True): native CPU kernel (the default)",
               _bertopt("BertAdam", foreach=None, fused=True), 32),
        # LAMB needs the whole update u before p may change (r = ||p|| / ||u||): a second pass.
        Method("bertopt-lamb-foreach", "bertopt Lamb(foreach=True)", _bertopt("Lamb", foreach=True, fused=None), 44),
        Method("bertopt-lamb-fused-torch", "bertopt Lamb(fused=True) on torch's fused Adam kernel + a workspace",
               _bertopt("Lamb", foreach=None, fused=True, native=False), 60),
        Method("bertopt-lamb-fused", "bertopt Lamb(fused=True): native CPU kernel (the default)",
               _bertopt("Lamb", foreach=None, fused=True), 44),
        # The strongest peers: the compiler, and DeepSpeed's hand-written CPU Adam.
        Method(COMPILED, "torch.compile (inductor) of a foreach BERT step: TF global clip, no bias correction, "
               "decoupled decay, LR as a tensor", _compiled, 40, peer=True),
        Method(DEEPSPEED, "torch clip_grad_norm_ + DeepSpeedCPUAdam(adamw_mode=True, bias_correction=False)",
               _deepspeed_cpuadam, 40, peer=True),
    ]
}

BASELINE = "torch-adamw-fused"
PPB = "ppb-bertadam"
FAST_PATH = "bertopt-fused"
LAMB_FAST_PATH = "bertopt-lamb-fused"  # its target: <= 1.35x FAST_PATH on the same tensors
# FAST_PATH's targets against its peers: at least this much faster, per-round medians.
PEER_TARGETS = {COMPILED: 1.10, BASELINE: 1.3, DEEPSPEED: 1.3}


def unavailable_reason(name: str) -> str | None:
    if name == PPB:
        return _ppb_available()
    if name in (TRANSFORMERS_ADAMW, TRANSFORMERS_ADAMW_STEP):
        return _transformers_adamw_available()
    if name == DEEPSPEED:
        return _deepspeed_available()
    return None


def select(names: list[str] | None) -> list[Method]:
    """Methods by name (all by default), in the registry's order; unknown names raise."""
    if not names:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {', '.join(METHODS)}; unknown: {', '.join(unknown)}")
    return [m for m in METHODS.values() if m.name in names]


# --- bertopt.compat's drop-ins against the originals they replace ----------------------
# transformers' AdamW (removed in 4.50) has no clipping of its own: its rows clip with
# torch's clip_grad_norm_ first, as Trainer does, so they are full steps like the rest.
# The drop-ins keep the originals' updates (per-tensor clipping for ppb's BertAdam).

TRANSFORMERS_ADAMW = "transformers-adamw"
TRANSFORMERS_ADAMW_STEP = "transformers-adamw-step"


def _transformers_adamw_available() -> str | None:
    try:
        from transformers import AdamW  # noqa: F401
    except ImportError:
        return ("transformers.AdamW is not importable (removed in transformers 4.50); run this method in a "
                "venv with transformers<=4.49 (benchmarks/results/compat/README.md)")
    return None


def _adamw_with_clip(make_optimizer, clip: bool = True):
    """clip_grad_norm_ (torch, global, as Trainer does) + a transformers-style AdamW, BERT settings.

    ``clip=False``: the optimizer's step() alone, to compare the two updates without the
    clipping they share."""
    def build(params, names, moments):
        opt = make_optimizer(_groups(params, names))
        _prefill(opt, params, moments, step=lambda: 0)  # transformers keeps the step as an int
        if not clip:
            return opt.step

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
            opt.step()

        return step

    return build


def _transformers_adamw(groups):
    from transformers import AdamW

    return AdamW(groups, lr=LR, betas=BETAS, eps=EPS, correct_bias=False, no_deprecation_warning=True)


def _compat_adamw(groups):
    from bertopt.compat import AdamW

    return AdamW(groups, lr=LR, betas=BETAS, eps=EPS, correct_bias=False)


def _compat_bert_adam(params, names, moments):
    """bertopt.compat.BertAdam exactly as the ppb-bertadam row runs pytorch-pretrained-bert's."""
    from bertopt.compat import BertAdam

    opt = BertAdam(_groups(params, names), lr=LR, b1=BETAS[0], b2=BETAS[1], e=EPS,
                   weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, schedule="none")
    _prefill(opt, params, moments, keys=("next_m", "next_v"), step=lambda: 0)
    return opt.step


METHODS.update({
    m.name: m
    for m in [
        # bytes: the update 28 (read p, g, m, v; write p, m, v), the decay pass after it 8,
        # clip_grad_norm_ 12 (read g for the norm, rewrite g)
        Method(TRANSFORMERS_ADAMW, "clip_grad_norm_ + transformers 4.49 AdamW(correct_bias=False): a loop over tensors",
               _adamw_with_clip(_transformers_adamw), 48, slow=True),
        Method("compat-adamw", "clip_grad_norm_ + bertopt.compat.AdamW(correct_bias=False) (fused, the default)",
               _adamw_with_clip(_compat_adamw), 48),
        Method(TRANSFORMERS_ADAMW_STEP, "transformers 4.49 AdamW(correct_bias=False).step() alone (no clipping)",
               _adamw_with_clip(_transformers_adamw, clip=False), 36, slow=True),
        Method("compat-adamw-step", "bertopt.compat.AdamW(correct_bias=False).step() alone (no clipping)",
               _adamw_with_clip(_compat_adamw, clip=False), 36),
        Method("compat-bertadam", "bertopt.compat.BertAdam: pytorch-pretrained-bert's update (fused, the default)",
               _compat_bert_adam, 32),
    ]
})
