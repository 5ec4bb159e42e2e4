"""bertopt's optimizer and schedule handed to transformers.Trainer (issue 5, item 4).

A tiny random BertForSequenceClassification and a few synthetic rows: seconds on CPU.
The question each test answers: does Trainer really run *our* recipe, step for step?
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import bertopt  # noqa: E402

ROWS, SEQ, BATCH = 8, 6, 8  # one batch per step: the whole data set, so no sampler order matters
STEPS, WARMUP, LR = 6, 2, 1e-2


def tiny_model(seed: int = 0):
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic forward
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, 40, (ROWS, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (ROWS,), generator=g)

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


def trainer_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
        max_grad_norm=0.0,  # let BertAdam's TF-style clip be the only one
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def google_lr(step: int) -> float:
    """Google's schedule, written out independently of bertopt.schedules."""
    if step < WARMUP:
        return LR * step / WARMUP
    return LR * (1 - min(step, STEPS) / STEPS)


def run_trainer(tmp_path, **arg_overrides):
    model = tiny_model()
    optimizer, scheduler = bertopt.create_optimizer(model, LR, num_train_steps=STEPS, num_warmup_steps=WARMUP)
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, **arg_overrides),
                                   train_dataset=TinyDataset(), optimizers=(optimizer, scheduler))
    return trainer, optimizer, scheduler


def test_trainer_steps_with_bertadam_and_the_bert_schedule(tmp_path):
    trainer, optimizer, scheduler = run_trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    # Trainer wraps the optimizer (accelerate's AcceleratedOptimizer) but steps ours.
    assert isinstance(optimizer, bertopt.BertAdam)
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer
    assert trainer.lr_scheduler is scheduler

    # Trainer logs the LR of the update it just made: update k (0-based) used google_lr(k).
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
    assert [entry["learning_rate"] for entry in logs] == pytest.approx(
        [google_lr(k) for k in range(STEPS)], rel=1e-12, abs=0.0)
    assert logs[0]["learning_rate"] == 0.0  # Google's warmup starts at 0

    # BertAdam's own per-parameter state exists and counts every update.
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            assert float(state["step"]) == STEPS
            assert state["exp_avg_sq"].abs().sum() > 0
    # Every parameter that gets a gradient moved (word embeddings of unused ids excepted).
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert {n for n in before if "word_embeddings" not in n} <= moved


def manual_bert_training(num_steps: int = STEPS):
    """The same recipe without Trainer: the plain loop from bertopt's docs."""
    model = tiny_model()
    optimizer, scheduler = bertopt.create_optimizer(model, LR, num_train_steps=STEPS, num_warmup_steps=WARMUP)
    data = TinyDataset()
    batch = {key: torch.stack([data[i][key] for i in range(ROWS)]) for key in data[0]}
    model.train()
    norms = []
    for _ in range(num_steps):
        model(**batch).loss.backward()
        optimizer.step()
        norms.append(float(optimizer.last_grad_norm))
        scheduler.step()
        optimizer.zero_grad()
    return model, norms


def test_trainer_with_max_grad_norm_zero_matches_the_manual_loop(tmp_path):
    trainer, optimizer, _ = run_trainer(tmp_path)
    trainer.train()
    manual, manual_norms = manual_bert_training()
    for (name, p), q in zip(trainer.model.named_parameters(), manual.parameters()):
        # Float rounding differs slightly (Trainer divides the summed loss by the item count);
        # a real recipe difference (clip, bias correction) would show at ~1e-3 after 6 updates.
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    # Trainer's logged grad_norm is the pre-clip norm BertAdam measured for the same update.
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert logged == pytest.approx(manual_norms, rel=1e-5)


def test_trainer_default_max_grad_norm_clips_before_bertadam(tmp_path):
    """With Trainer's default max_grad_norm=1.0, torch's clip_grad_norm_ runs first, so BertAdam
    only ever sees a norm <= 1 and its own (TF-style) clip never acts. Documented in docs/trainer.md."""
    model = tiny_model()
    # A large LR makes the gradient norm exceed 1 within a few steps.
    optimizer, scheduler = bertopt.create_optimizer(model, 1.0, num_train_steps=STEPS, num_warmup_steps=WARMUP)
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, max_grad_norm=1.0),
                                   train_dataset=TinyDataset(), optimizers=(optimizer, scheduler))
    seen_by_bertadam = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen_by_bertadam.append(float(opt.last_grad_norm)))
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert max(logged) > 1.5, "the test needs a step whose raw gradient norm exceeds 1"
    assert max(seen_by_bertadam) <= 1.0 + 1e-6
    for raw, seen in zip(logged, seen_by_bertadam):
        if raw > 1.0:  # torch's formula: g * 1 / (norm + 1e-6)
            assert seen == pytest.approx(raw / (raw + 1e-6), rel=1e-5)


def test_max_grad_norm_none_is_rejected_by_this_transformers(tmp_path):
    """Documented fact: Trainer compares ``max_grad_norm > 0``; use 0.0, not None, to disable it."""
    try:
        trainer, _, _ = run_trainer(tmp_path, max_grad_norm=None)
        trainer.train()
    except TypeError:
        return
    pytest.fail("transformers now accepts max_grad_norm=None: update docs/trainer.md")


def test_trainer_checkpoint_resume_restores_bertadam_and_the_schedule(tmp_path):
    """Trainer saves optimizer.state_dict()/scheduler.state_dict() (loaded back with weights_only=True);
    a run resumed from checkpoint-3 ends where the uninterrupted run ends."""
    whole, _, _ = run_trainer(tmp_path / "whole")
    whole.train()

    first, _, _ = run_trainer(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()

    resumed, optimizer, scheduler = run_trainer(tmp_path / "resumed")  # fresh model, optimizer, scheduler
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert float(optimizer.state[next(iter(resumed.model.parameters()))]["step"]) == STEPS
    assert scheduler.last_epoch == STEPS
    for (name, p), q in zip(resumed.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    resumed_lrs = [e["learning_rate"] for e in resumed.state.log_history if "learning_rate" in e]
    assert resumed_lrs[-3:] == pytest.approx([google_lr(k) for k in (3, 4, 5)], rel=1e-12)


class BertoptTrainer(transformers.Trainer):
    """For setups where Trainer must build the optimizer itself (model_init, FSDP): docs/trainer.md."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = bertopt.param_groups(model or self.model, weight_decay=self.args.weight_decay)
            self.optimizer = bertopt.BertAdam(groups, lr=self.args.learning_rate, max_grad_norm=1.0)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            # args.warmup_steps: an int, or a fraction < 1 that transformers rounds UP (Google: down)
            self.lr_scheduler = bertopt.bert_schedule(optimizer or self.optimizer, num_training_steps,
                                                      self.args.get_warmup_steps(num_training_steps))
        return self.lr_scheduler


def test_trainer_subclass_builds_the_same_recipe_from_training_arguments(tmp_path):
    args = trainer_args(tmp_path, learning_rate=LR, weight_decay=0.01, warmup_steps=WARMUP)
    trainer = BertoptTrainer(model=tiny_model(), args=args, train_dataset=TinyDataset())
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), bertopt.BertAdam)
    manual, _ = manual_bert_training()
    for (name, p), q in zip(trainer.model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_example_script_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--tiny", "--out", str(tmp_path)])
    assert results["test_accuracy"] == 1.0  # the synthetic task is separable by one word
