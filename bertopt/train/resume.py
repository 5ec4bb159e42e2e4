"""The checkpoint payload of a training run, both ways: :func:`save` builds it (model, optimizer,
scheduler, loss scaler, every rank's RNG states, the loop state) and :func:`restore` loads it into
a new run. The file format (manifests, hashes, atomic writes, retention) is :mod:`bertopt.train.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from bertopt.train import checkpoint as ckpt
from bertopt.train.job import LossSpike, TrainingError
from bertopt.train.state import LoopState, Training


def restore(run: Training) -> LoopState:
    """The state to start from: a fresh one, or the checkpoint ``--resume`` names, loaded into
    the model, optimizer, scheduler, loss scaler and RNGs (CheckpointError if it does not fit)."""
    resume, ctx = run.config.resume, run.ctx
    if resume is None:
        return LoopState()
    path = Path(resume)
    if str(resume) == "auto":
        if not ckpt.list_checkpoints(run.checkpoint_dir):
            if ctx.is_main:
                print(f"--resume: no checkpoint in {run.checkpoint_dir} yet; starting from step 0", flush=True)
            return LoopState()
        path = run.checkpoint_dir
    try:
        loaded = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"cannot resume: {exc}. {ckpt.RESUME_ADVICE}") from exc
    ckpt.check_compatible(loaded.info.meta, run.job.run_info, run.job.resume_must_match, loaded.info.manifest_path)
    state = _load_into(run, loaded)
    if ctx.is_main:
        for reason in loaded.skipped:
            print(f"warning: skipped a checkpoint that failed verification: {reason}", flush=True)
        print(f"resumed from {loaded.info.manifest_path} (step {state.step})", flush=True)
    return state


def _load_into(run: Training, loaded: ckpt.LoadedCheckpoint) -> LoopState:
    """Load a verified checkpoint into the model, optimizer, scheduler, loss scaler and this
    rank's RNGs; return its loop state (CheckpointError if it does not fit)."""
    saved = loaded.state
    try:
        if saved["optimizer"]:
            ckpt.set_training_state(run.model, run.optimizer, saved["model"], saved["optimizer"])
        else:  # saved before the first step (see save): the optimizer had no state yet
            ckpt.set_training_state(run.model, None, saved["model"], None)
            run.optimizer.state.clear()
        run.scheduler.load_state_dict(saved["scheduler"])
        if not saved["optimizer"]:  # the LR lives in the optimizer's state: the schedule's of step 0
            for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_last_lr()):
                group["lr"] = lr
        if run.amp.scaler.is_enabled() and "scaler" in saved:
            run.amp.scaler.load_state_dict(saved["scaler"])
        ckpt.restore_rng_state(saved["rng"][run.ctx.rank % len(saved["rng"])])
        state = LoopState.from_state_dict(saved["loop"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ckpt.CheckpointError(
            f"{loaded.info.manifest_path}: the checkpoint verifies but does not fit this model and optimizer "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}); it belongs to a different "
            "model or program. Resume with the settings it was made with, or start a new run in another "
            "--out directory"
        ) from exc
    if "optimizer_skipped_steps" in saved["loop"] and hasattr(run.optimizer, "skipped_steps"):
        # torch's distributed state-dict helpers drop the optimizer's own extra fields
        run.optimizer.skipped_steps = int(saved["loop"]["optimizer_skipped_steps"])
    return state


def rewind(run: Training, state: LoopState, reason: str) -> LoopState:
    """After a loss spike at step ``state.step`` (``--on-spike rewind``): the state of the newest
    checkpoint from before the spike's window, which skips the window's data steps from now on.

    Crash-safe in this order: the checkpoints newer than the one restored are deleted (they hold
    the spike), then the restored step is saved again with the rewind recorded. A run killed
    before that save resumes from the old checkpoint, meets the same spike at the same step (the
    detector's history is in the checkpoint) and rewinds the same way; killed after it, it resumes
    from the new one. LossSpike after ``--max-rewinds`` rewinds, or with no checkpoint to go back to.
    """
    config, ctx, spike = run.config, run.ctx, state.spike
    detected, start = state.step, state.spike.elevated_since or state.step
    where = intact(state.last_checkpoint, run.checkpoint_dir)
    if len(spike.rewinds) >= config.max_rewinds:
        done = ", ".join(f"{e['detected_step']}->{e['restored_step']}" for e in spike.rewinds) or "none"
        raise LossSpike(
            f"the training loss spiked at step {detected} ({reason}), and the rewinds that --max-rewinds "
            f"{config.max_rewinds} allows were used up (detected step -> restored step: {done}); {where}. The run is "
            "unstable: lower --lr (or --spike-lr-factor below 1), check the data, then resume with --resume, "
            "or allow more with --max-rewinds")
    candidates = [c for c in ckpt.list_checkpoints(run.checkpoint_dir) if c.step < start]
    loaded = None
    for info in reversed(candidates):
        try:
            loaded = ckpt.load_checkpoint(info.manifest_path)
            break
        except ckpt.CheckpointError as exc:
            if ctx.is_main:
                print(f"warning: skipped a checkpoint that failed verification: {exc}", flush=True)
    if loaded is None:
        raise LossSpike(
            f"the training loss spiked at step {detected} ({reason}), but no checkpoint from before step {start} "
            f"is left in {run.checkpoint_dir} to rewind to; {where}. Keep more with --keep-checkpoints or save more "
            "often with --save-every, or train with --on-spike off")
    skip_from, skip_to = spike.data_step(start - 1), spike.data_step(detected - 1) + 1
    ctx.barrier()  # every rank has chosen before rank 0 deletes
    if ctx.is_main:
        for info in reversed(ckpt.list_checkpoints(run.checkpoint_dir)):
            if info.step > loaded.info.step:  # manifest first: a half-deleted checkpoint is simply absent
                info.manifest_path.unlink(missing_ok=True)
                info.payload_path.unlink(missing_ok=True)
    restored = _load_into(run, loaded)
    # what this process did (and the time it spent) stays; the training state is the checkpoint's
    restored.resumed_from, restored.first_step_s, restored.train_time = state.resumed_from, state.first_step_s, \
        state.train_time
    restored.spike.skipped, restored.spike.rewinds = spike.skipped, spike.rewinds
    restored.spike.skip(skip_from, skip_to)
    scale = spike.lr_scale * config.spike_lr_factor
    _scale_lr(run, scale / loaded.state["loop"].get("spike", {}).get("lr_scale", 1.0))
    restored.spike.lr_scale = scale
    restored.spike.rewinds = [*spike.rewinds, {
        "rewind": len(spike.rewinds) + 1, "detected_step": detected, "restored_step": loaded.info.step,
        "spike_started_step": start, "skipped_data_steps": [skip_from, skip_to],
        "batches_skipped": skip_to - skip_from, "reason": reason, "lr_scale": scale}]
    restored.last_checkpoint = save(run, restored) or restored.last_checkpoint
    return restored


def _scale_lr(run: Training, factor: float) -> None:
    """Multiply the learning rate, now and for the rest of the schedule, by ``factor``."""
    if factor == 1.0:
        return
    for group in run.optimizer.param_groups:
        group["lr"] *= factor
    if hasattr(run.scheduler, "base_lrs"):
        run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]


def save(run: Training, state: LoopState) -> Path | None:
    """An atomic checkpoint of the step just finished (collective: every rank calls it). Before the
    first step (``--on-spike rewind`` saves one) the optimizer has no state, and none is saved: torch's
    state-dict helper would make some with a step of zero gradients, which counts as a step."""
    if state.step == 0:
        model_state, optim_state = ckpt.get_model_state(run.model), {}
    else:
        model_state, optim_state = ckpt.get_training_state(run.model, run.optimizer)
    rng_states = run.ctx.all_gather_object(ckpt.capture_rng_state())
    path = None
    if run.ctx.is_main:
        payload = build_payload(model_state, optim_state, run.optimizer, run.scheduler, rng_states, state,
                                run.ctx.world_size)
        if run.amp.scaler.is_enabled():
            payload["scaler"] = run.amp.scaler.state_dict()
        meta = {"run": run.job.run_info, "world_size": run.ctx.world_size}
        if hasattr(run.task, "data_position"):
            meta["data_position"] = run.task.data_position(state.spike.data_step(state.step))
        # while a spike may be building, keep the checkpoint from before it: prune nothing
        keep = 0 if state.spike.elevated_since is not None else run.config.keep_checkpoints
        try:
            path = ckpt.save_checkpoint(run.checkpoint_dir, state.step, payload, meta=meta,
                                        keep=keep).manifest_path
        except OSError as exc:
            previous = ckpt.latest_checkpoint(run.checkpoint_dir)
            kept = f"The checkpoint of step {previous.step} is intact" if previous else "No earlier checkpoint exists"
            raise TrainingError(
                f"could not write the checkpoint of step {state.step} to {run.checkpoint_dir}: {exc}. "
                f"{kept}; free disk space or choose another --out, then run again with --resume"
            ) from exc
    run.ctx.barrier()
    return path


def build_payload(model_state: dict, optim_state: dict, optimizer, scheduler, rng_states: list, state: LoopState,
                  world_size: int) -> dict:
    """What a checkpoint holds (:func:`restore` reads it back): model, optimizer, scheduler, every
    rank's RNG states and the loop state."""
    loop = state.state_dict() | {"world_size": world_size}
    if hasattr(optimizer, "skipped_steps"):
        loop["optimizer_skipped_steps"] = int(optimizer.skipped_steps)
    return {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng_states,
            "loop": loop}


def starting_checkpoint(directory: Path, model, optimizer, scheduler, step: int, run_info: dict) -> Path:
    """A checkpoint of a run that starts at ``step`` with this model, optimizer and scheduler (as
    they are), written by one process: ``--resume`` continues from it as from any checkpoint
    (``bertopt import-tf`` writes Google's run this way). The RNG states are this process's."""
    model_state, optim_state = ckpt.get_training_state(model, optimizer)
    payload = build_payload(model_state, optim_state, optimizer, scheduler, [ckpt.capture_rng_state()],
                            LoopState(step=step), 1)
    return ckpt.save_checkpoint(directory, step, payload, meta={"run": run_info, "world_size": 1}).manifest_path


def intact(last_checkpoint: Path | None, checkpoint_dir: Path, *, sentence_start: bool = False) -> str:
    """'the last checkpoint (...) is intact' or 'no checkpoint was written yet', for error messages."""
    if last_checkpoint is None:
        latest = ckpt.latest_checkpoint(checkpoint_dir)
        last_checkpoint = latest.manifest_path if latest else None
    text = "no checkpoint was written yet" if last_checkpoint is None else \
        f"the last checkpoint ({last_checkpoint}) is intact"
    return text[0].upper() + text[1:] if sentence_start else text
