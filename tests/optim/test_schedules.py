"""bertopt.schedules against the code each schedule claims to reproduce.

Tolerances (stated once, used below):
* Google's TF schedule is computed by TF in float32; ours is float64. We agree with a
  float32 transcription within 2 float32 ulps of the peak LR (abs 2**-22 * lr), and
  with the same formula in float64 within 1e-15 * lr.
* transformers' schedules: exact (==) where the arithmetic is the same operations,
  otherwise within 1e-12 relative (+1e-15 absolute for values near 0).
* pytorch-pretrained-bert 0.6.2 computes progress = step / t_total and divides by the
  warmup fraction, a different rounding order: within 1e-12 relative (+1e-15 absolute).
"""

from __future__ import annotations

import io
import math
import os
import pickle

import numpy as np
import pytest
import torch

from bertopt import schedules as S

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REL, ABS = 1e-12, 1e-15


def make_optimizer(lrs=(1e-3,)):
    """A tiny SGD optimizer with one param group (one nn.Linear) per LR."""
    return torch.optim.SGD([{"params": torch.nn.Linear(3, 2).parameters(), "lr": lr} for lr in lrs], lr=lrs[0])


def run_lrs(scheduler, steps):
    """LR of every group at steps 0..steps-1, stepping the optimizer as in training."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return out


# ----------------------------------------------------------------------------------------
# Google's BERT schedule


def tf_bert_lr_float32(step, init_lr, num_train_steps, num_warmup_steps):
    """google-research/bert optimization.create_optimizer, line by line, in float32."""
    f32 = np.float32
    learning_rate = f32(init_lr)
    # tf.train.polynomial_decay(lr, step, T, end_learning_rate=0.0, power=1.0, cycle=False)
    global_step = min(f32(step), f32(num_train_steps))
    p = global_step / f32(num_train_steps)
    learning_rate = (learning_rate - f32(0.0)) * np.power(f32(1.0) - p, f32(1.0)) + f32(0.0)
    if num_warmup_steps:
        warmup_percent_done = f32(step) / f32(num_warmup_steps)
        warmup_learning_rate = f32(init_lr) * warmup_percent_done
        is_warmup = f32(step < num_warmup_steps)
        learning_rate = (f32(1.0) - is_warmup) * learning_rate + is_warmup * warmup_learning_rate
    return float(learning_rate)


def tf_bert_lr_float64(step, init_lr, num_train_steps, num_warmup_steps):
    if num_warmup_steps and step < num_warmup_steps:
        return init_lr * (step / num_warmup_steps)
    return init_lr * (1.0 - min(step, num_train_steps) / num_train_steps)


@pytest.mark.parametrize("init_lr,total,warmup", [(5e-5, 1000, 100), (2e-5, 337, 33), (1e-4, 50, 0), (0.1, 7, 7)])
def test_google_style_matches_tensorflow_formula(init_lr, total, warmup):
    scheduler = S.bert_schedule(make_optimizer((init_lr,)), total, warmup, style="google")
    lrs = [row[0] for row in run_lrs(scheduler, total + 10)]
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(tf_bert_lr_float32(step, init_lr, total, warmup), rel=0, abs=2**-22 * init_lr)
        assert lr == pytest.approx(tf_bert_lr_float64(step, init_lr, total, warmup), rel=0, abs=1e-15 * init_lr)
    assert lrs[0] == (0.0 if warmup else init_lr)
    assert all(lr == 0.0 for lr in lrs[total:])


def test_google_style_drops_at_end_of_warmup_and_rebased_does_not():
    total, warmup, lr = 1000, 100, 1.0
    google = S.bert_schedule(make_optimizer((lr,)), total, warmup).schedule
    rebased = S.bert_schedule(make_optimizer((lr,)), total, warmup, style="rebased").schedule
    assert google(warmup - 1) == pytest.approx(0.99, rel=1e-15)
    assert google(warmup) == pytest.approx(0.9, rel=1e-15)  # 1 - W/T: the drop
    assert google(warmup + 1) == pytest.approx(1 - 101 / 1000, rel=1e-15)
    assert rebased(warmup) == 1.0
    assert rebased(warmup + 1) == pytest.approx(899 / 900, rel=1e-15)
    assert google(total) == rebased(total) == 0.0


def test_default_warmup_is_googles_int_of_proportion():
    for total, proportion in [(1005, 0.1), (70, 0.1), (333, 0.06)]:
        scheduler = S.bert_schedule(make_optimizer(), total, warmup_proportion=proportion)
        assert scheduler.schedule.num_warmup_steps == int(total * proportion)
    assert S.bert_schedule(make_optimizer(), 1000).schedule.num_warmup_steps == 100


def test_base_lr_of_each_param_group_is_respected():
    scheduler = S.bert_schedule(make_optimizer((1.0, 0.25, 3e-5)), 40, 8)
    for step, row in enumerate(run_lrs(scheduler, 45)):
        m = scheduler.schedule(step)
        assert row == [1.0 * m, 0.25 * m, 3e-5 * m]
        assert row == scheduler.lr_at(step)


def test_nvidia_lamb_poly_schedule_is_reachable():
    """NVIDIA DeepLearningExamples BERT PolyWarmUpScheduler: warmup fraction, then (1 - step/T) ** 0.5."""
    total, warmup_fraction = 400, 0.2843
    schedule = S.polynomial_schedule(make_optimizer(), total, warmup_fraction * total, power=0.5).schedule
    for step in range(total + 1):
        progress = step / total
        expected = progress / warmup_fraction if progress < warmup_fraction else (1.0 - progress) ** 0.5
        assert schedule(step) == pytest.approx(expected, rel=REL, abs=ABS)
    assert schedule(total + 100) == 0.0  # NVIDIA's formula would take the root of a negative number here


# ----------------------------------------------------------------------------------------
# transformers


TRANSFORMERS_CASES = {
    # name: (ours(opt, T, W), transformers(tr, opt, T, W), exact)
    "linear": (lambda o, t, w: S.bert_schedule(o, t, w, style="rebased"),
               lambda tr, o, t, w: tr.get_linear_schedule_with_warmup(o, w, t), True),
    "polynomial": (lambda o, t, w: S.polynomial_schedule(o, t, w, style="rebased", power=2.0, end_factor=1e-7 / 3e-4),
                   lambda tr, o, t, w: tr.get_polynomial_decay_schedule_with_warmup(o, w, t, lr_end=1e-7, power=2.0),
                   False),
    "cosine": (lambda o, t, w: S.cosine_schedule(o, t, w),
               lambda tr, o, t, w: tr.get_cosine_schedule_with_warmup(o, w, t), True),
    "cosine-1.5-cycles": (lambda o, t, w: S.cosine_schedule(o, t, w, num_cycles=1.5),
                          lambda tr, o, t, w: tr.get_cosine_schedule_with_warmup(o, w, t, num_cycles=1.5), True),
    "cosine-min-lr": (lambda o, t, w: S.cosine_schedule(o, t, w, end_factor=0.1),
                      lambda tr, o, t, w: tr.get_cosine_with_min_lr_schedule_with_warmup(o, w, t, min_lr_rate=0.1),
                      False),
    "hard-restarts": (lambda o, t, w: S.cosine_with_hard_restarts_schedule(o, t, w, num_cycles=3),
                      lambda tr, o, t, w: tr.get_cosine_with_hard_restarts_schedule_with_warmup(o, w, t, num_cycles=3),
                      True),
    "constant": (lambda o, t, w: S.constant_schedule(o, t, w),
                 lambda tr, o, t, w: tr.get_constant_schedule_with_warmup(o, w), True),
    **{
        f"wsd-{shape}": (
            lambda o, t, w, shape=shape: S.wsd_schedule(o, t, w, num_decay_steps=30, decay_shape=shape),
            lambda tr, o, t, w, shape=shape: tr.get_wsd_schedule(o, w, 30, num_training_steps=t, decay_type=shape),
            True,
        )
        for shape in ("linear", "cosine", "1-sqrt")
    },
}


@pytest.mark.parametrize("warmup", [12, 0])
@pytest.mark.parametrize("name", sorted(TRANSFORMERS_CASES))
def test_matches_transformers(name, warmup):
    tr = pytest.importorskip("transformers.optimization")
    ours, theirs, exact = TRANSFORMERS_CASES[name]
    # transformers' polynomial lr_end is absolute, so it only fits one base LR.
    total, lrs = 120, ((3e-4,) if name == "polynomial" else (3e-4, 3e-4 / 7))
    got = run_lrs(ours(make_optimizer(lrs), total, warmup), total + 15)
    want = run_lrs(theirs(tr, make_optimizer(lrs), total, warmup), total + 15)
    if name.startswith("cosine"):
        # transformers lets the cosine run on past T; ours holds its value at T.
        got, want = got[: total + 1], want[: total + 1]
    if exact:
        assert got == want
    else:
        np.testing.assert_allclose(got, want, rtol=REL, atol=ABS * lrs[0])


def test_inverse_sqrt_matches_transformers():
    tr = pytest.importorskip("transformers.optimization")
    for warmup, timescale in [(40, None), (0, None), (25, 100)]:
        mine = S.inverse_sqrt_schedule(make_optimizer(), 500, warmup, timescale=timescale)
        reference = tr.get_inverse_sqrt_schedule(make_optimizer(), warmup, timescale=timescale)
        assert run_lrs(mine, 600) == run_lrs(reference, 600)
    # timescale == warmup is the Transformer paper's sqrt(W / step)
    schedule = S.inverse_sqrt_schedule(make_optimizer(), 500, 40).schedule
    assert schedule(160) == pytest.approx(0.5, rel=1e-15)


# ----------------------------------------------------------------------------------------
# pytorch-pretrained-bert 0.6.2


@pytest.mark.parametrize("total,warmup_fraction", [(1000, 0.1), (333, 0.15), (90, 0.0)])
def test_matches_pytorch_pretrained_bert(total, warmup_fraction):
    ppb = pytest.importorskip("pytorch_pretrained_bert.optimization")
    warmup = warmup_fraction * total  # fractional when t_total * warmup is not whole (49.95 here)
    opt = make_optimizer()
    pairs = [
        (S.bert_schedule(opt, total, warmup, style="rebased"), ppb.WarmupLinearSchedule(warmup_fraction, total), True),
        (S.constant_schedule(opt, total, warmup), ppb.WarmupConstantSchedule(warmup_fraction, total), True),
        (S.cosine_schedule(opt, total, warmup), ppb.WarmupCosineSchedule(warmup_fraction, total), False),
        (S.cosine_schedule(opt, total, warmup, num_cycles=1.25),
         ppb.WarmupCosineSchedule(warmup_fraction, total, cycles=1.25), False),
        (S.cosine_with_hard_restarts_schedule(opt, total, warmup, num_cycles=3),
         ppb.WarmupCosineWithHardRestartsSchedule(warmup_fraction, total, cycles=3), False),
    ]
    for ours, theirs, defined_past_end in pairs:
        # ppb's cosines restart (or rise) at and past t_total; ours end there (see module docstring).
        last = total + 20 if defined_past_end else total - 1
        for step in range(last + 1):
            assert ours.schedule(step) == pytest.approx(theirs.get_lr(step, nowarn=True), rel=REL, abs=ABS), (
                type(theirs).__name__, step)


# ----------------------------------------------------------------------------------------
# state: pickling, weights_only loading, exact resume


def all_schedulers(lrs=(1e-3,), total=60, warmup=9):
    """Every named schedule, each on its own optimizer."""
    kwargs = {"bert": dict(style="google"), "polynomial": dict(power=0.5, end_factor=0.1),
              "wsd": dict(decay_shape="1-sqrt", end_factor=0.05), "cosine": dict(num_cycles=0.75)}
    return {name: S.get_schedule(name, make_optimizer(lrs), total, warmup, **kwargs.get(name, {}))
            for name in S.SCHEDULE_NAMES}


@pytest.mark.parametrize("name", S.SCHEDULE_NAMES)
def test_resume_from_state_dict_is_exact(name):
    total, stop, lrs = 60, 23, (1e-3, 2e-4)
    uninterrupted = run_lrs(all_schedulers(lrs, total)[name], total + 5)

    first = all_schedulers(lrs, total)[name]
    run_lrs(first, stop)
    buffer = io.BytesIO()
    torch.save({"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain values only: no pickled classes

    optimizer = make_optimizer(lrs)
    # Built with different settings on purpose: the saved schedule must win.
    resumed = S.get_schedule(name, optimizer, total * 3, 0)
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    assert resumed.schedule == first.schedule
    assert run_lrs(resumed, total + 5 - stop) == uninterrupted[stop:]


def test_state_dict_and_schedules_pickle():
    for name, scheduler in all_schedulers().items():
        state = scheduler.state_dict()
        assert pickle.loads(pickle.dumps(state)) == state
        schedule = pickle.loads(pickle.dumps(scheduler.schedule))
        assert schedule == scheduler.schedule
        assert [schedule(k) for k in range(70)] == [scheduler.schedule(k) for k in range(70)]


def test_stateful_run_equals_pure_function():
    for name, scheduler in all_schedulers((0.5, 0.01)).items():
        for step, row in enumerate(run_lrs(scheduler, 75)):
            assert row == scheduler.lr_at(step), (name, step)


def test_numpy_step_counts_give_plain_state():
    scheduler = S.bert_schedule(make_optimizer(), np.int64(100), np.int64(10))
    fields = scheduler.state_dict()["schedule"]
    assert type(fields["num_train_steps"]) is int and type(fields["num_warmup_steps"]) is int


# ----------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda o: S.bert_schedule(o, 0), "num_train_steps"),
        (lambda o: S.bert_schedule(o, -10, 0), "num_train_steps"),
        (lambda o: S.bert_schedule(o, 10.5, 1), "num_train_steps"),
        (lambda o: S.bert_schedule(o, 100, -1), "num_warmup_steps"),
        (lambda o: S.bert_schedule(o, 100, math.nan), "num_warmup_steps"),
        (lambda o: S.bert_schedule(o, 100, 101), "longer than training"),
        (lambda o: S.bert_schedule(o, 100, warmup_proportion=1.5), "warmup_proportion"),
        (lambda o: S.bert_schedule(o, 100, style="tf"), "style"),
        (lambda o: S.polynomial_schedule(o, 100, 10, style="nvidia"), "style"),
        (lambda o: S.polynomial_schedule(o, 100, 10, power=0), "power"),
        (lambda o: S.polynomial_schedule(o, 100, 10, power=-0.5), "power"),
        (lambda o: S.polynomial_schedule(o, 100, 10, end_factor=1.5), "end_factor"),
        (lambda o: S.cosine_schedule(o, 100, 10, num_cycles=0), "num_cycles"),
        (lambda o: S.cosine_with_hard_restarts_schedule(o, 100, 10, num_cycles=-1), "num_cycles"),
        (lambda o: S.inverse_sqrt_schedule(o, 100, 10, timescale=0), "timescale"),
        (lambda o: S.wsd_schedule(o, 100, 50, num_decay_steps=60), "num_decay_steps"),
        (lambda o: S.wsd_schedule(o, 100, 10, decay_shape="exp"), "decay_shape"),
        (lambda o: S.wsd_schedule(o, 100, 10, decay_proportion=2), "decay_proportion"),
        (lambda o: S.get_schedule("noam", o, 100), "unknown schedule 'noam'"),
        (lambda o: S.get_schedule("cosine", o, 100, 10, power=2), "does not take"),
        (lambda o: S.bert_schedule(o, 100).schedule(-1), "step"),
        (lambda o: S.bert_schedule(o, 100).load_state_dict({"schedule": {"kind": "Nope"}}), "unknown schedule kind"),
        (lambda o: S.ScheduledLR(o, lambda step: 1.0), "schedule"),
    ],
)
def test_impossible_settings_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build(make_optimizer())
