"""The checkpoint payload of a training run, both ways: :func:`save` builds it (model, optimizer,
scheduler, loss scaler, every rank's RNG states, the loop state) and :func:`restore` loads it into
a new run. The file format (manifests, hashes, atomic writes, retention) is :mod:`bertopt.train.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from bertopt.train import checkpoint as ckpt
from bertopt.train.job import TrainingError
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
    saved = loaded.state
    try:
        ckpt.set_training_state(run.model, run.optimizer, saved["model"], saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        if run.amp.scaler.is_enabled() and "scaler" in saved:
            run.amp.scaler.load_state_dict(saved["scaler"])
        ckpt.restore_rng_state(saved["rng"][ctx.rank % len(saved["rng"])])
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
    if ctx.is_main:
        for reason in loaded.skipped:
            print(f"warning: skipped a checkpoint that failed verification: {reason}", flush=True)
        print(f"resumed from {loaded.info.manifest_path} (step {state.step})", flush=True)
    return state


def save(run: Training, state: LoopState) -> Path | None:
    """An atomic checkpoint of the step just finished (collective: every rank calls it)."""
    model_state, optim_state = ckpt.get_training_state(run.model, run.optimizer)
    rng_states = run.ctx.all_gather_object(ckpt.capture_rng_state())
    path = None
    if run.ctx.is_main:
        loop = state.state_dict() | {"world_size": run.ctx.world_size}
        if hasattr(run.optimizer, "skipped_steps"):
            loop["optimizer_skipped_steps"] = int(run.optimizer.skipped_steps)
        payload = {"model": model_state, "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
                   "rng": rng_states, "loop": loop}
        if run.amp.scaler.is_enabled():
            payload["scaler"] = run.amp.scaler.state_dict()
        meta = {"run": run.job.run_info, "world_size": run.ctx.world_size}
        if hasattr(run.task, "data_position"):
            meta["data_position"] = run.task.data_position(state.step)
        try:
            path = ckpt.save_checkpoint(run.checkpoint_dir, state.step, payload, meta=meta,
                                        keep=run.config.keep_checkpoints).manifest_path
        except OSError as exc:
            previous = ckpt.latest_checkpoint(run.checkpoint_dir)
            kept = f"The checkpoint of step {previous.step} is intact" if previous else "No earlier checkpoint exists"
            raise TrainingError(
                f"could not write the checkpoint of step {state.step} to {run.checkpoint_dir}: {exc}. "
                f"{kept}; free disk space or choose another --out, then run again with --resume"
            ) from exc
    run.ctx.barrier()
    return path


def intact(last_checkpoint: Path | None, checkpoint_dir: Path, *, sentence_start: bool = False) -> str:
    """'the last checkpoint (...) is intact' or 'no checkpoint was written yet', for error messages."""
    if last_checkpoint is None:
        latest = ckpt.latest_checkpoint(checkpoint_dir)
        last_checkpoint = latest.manifest_path if latest else None
    text = "no checkpoint was written yet" if last_checkpoint is None else \
        f"the last checkpoint ({last_checkpoint}) is intact"
    return text[0].upper() + text[1:] if sentence_start else text
