"""The one training loop.

:class:`Trainer` builds a run from an :class:`~metateach.config.ExperimentConfig`
and :meth:`Trainer.fit` reads top to bottom: for every epoch, for every
batch, one student step; then evaluation, logging and a checkpoint. With
``train.episodes``, that is one episode, and fresh students follow. The
loop knows no teaching method by name. A batch's per-sample losses are
taken by the run's teaching strategy (:mod:`metateach.hypergrad`): a plain
step under the teacher's lesson, or a step in which the teacher learns too.

Everything a run needs to continue is in its checkpoint: weights, optimizer
state, the position in the epoch, the epoch's running totals, the best
validation result and the RNG state. Data order and augmentation derive
from (seed, epoch, batch), so a resumed run is the same run.

Under ``torchrun`` every process runs this loop on its shard of each batch
(:mod:`metateach.distributed`); rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from metateach.checkpoint import (
    BEST,
    LAST,
    restore_run,
    run_state,
    save_checkpoint,
)
from metateach.config import ExperimentConfig, config_to_dict, flatten
from metateach.data import Batch, BatchLoader, DataBundle, build_data, derive_seed
from metateach.distributed import all_sum, check_data_parallel, init_world, sharded
from metateach.errors import MetateachError, NonFiniteStep, RunInterrupted, first_line
from metateach.evaluation import evaluate_models, evaluate_peers
from metateach.logging import RunLogger, SilentLogger, log_run_start, prefixed
from metateach.models import model_for
from metateach.optim import optimizer_from_config, schedule_from_config, set_lr
from metateach.plugins import import_plugins
from metateach.progress import EpochTotals, LossAverage, TrainState, episode_seed
from metateach.report.dashboard import loss_curve_series, sample_table, weight_histograms
from metateach.report.diagnostics import TeacherDiagnostics
from metateach.report.plots import plot_run
from metateach.rundir import changed_settings, open_run
from metateach.runtime import keep_freed_memory, resolve_device, seed_everything
from metateach.teacher import TeachingContext, loss_averaging
from metateach.teaching import build_teaching
from metateach.types import StepStats

__all__ = ["Trainer"]


class Trainer:
    """Trains the student of ``cfg``; see the module docstring.

    Args:
        cfg: the experiment.
        data: the data, if already built (to share one bundle between runs).
        quiet: write checkpoints only: no config, log, W&B run or console line (the
            replay that rebuilds the state before a failed step).
    """

    def __init__(
        self, cfg: ExperimentConfig, data: DataBundle | None = None, quiet: bool = False
    ) -> None:
        self.cfg = cfg
        self.quiet = quiet
        # A trainer in a process of its own (a comparison's worker) has not read the config,
        # whose plugins register the names it builds.
        import_plugins(cfg.plugins)
        run = cfg.train
        if run.threads is not None:
            torch.set_num_threads(run.threads)
        if run.keep_freed_memory:
            keep_freed_memory()
        self.world, device = init_world(run.device)
        self.device = resolve_device(device)
        seed_everything(run.seed, run.deterministic, self.device)
        # The folder is this process's until fit() ends: a second run under its name is refused.
        self.run_dir, resumed, self._lock = open_run(cfg, self.world)
        self.data = data if data is not None else build_data(cfg.data, cfg.noise)
        self.model = model_for(cfg.model, self.data).to(self.device)
        self.optimizer = optimizer_from_config(cfg.optim, self.model.parameters())
        self.schedule = schedule_from_config(cfg.schedule, run.epochs, cfg.optim.lr)
        shard = self.world.shard
        self.teaching = build_teaching(
            cfg, self.model, self.optimizer, self.data, self.device, shard
        )
        if self.world.size > 1:
            check_data_parallel(cfg, self.teaching.strategy, self.world)
            # The same initial networks everywhere; from here on, each rank its own draws.
            torch.manual_seed(derive_seed(run.seed, 5, self.world.rank))
        self.val_loader = self.data.eval_loader("val", run.eval_batch_size, self.device, shard)
        self.test_loader = self.data.eval_loader("test", run.eval_batch_size, self.device, shard)

        # Step results pile up on the device and are read only at log points:
        # reading them every step would force a CPU-GPU sync per step.
        self._pending = StepStats.zeros(self.device)
        self._pending_since = time.perf_counter()
        # The running average of the batch losses, a teacher's view of the student's history.
        self.loss_average = LossAverage(loss_averaging(cfg.teacher), self.device)
        self._save_due = False  # a checkpoint waits for the teaching strategy to allow it
        #: A signal that asked the run to stop (:func:`~metateach.runtime.stops_on_signals`): it stops, saved,
        #: at the first step boundary where the teaching strategy can be checkpointed.
        self.stop_signal: int | None = None
        # The teacher's weights on a fixed sample of training data, measured each epoch.
        self.diagnostics = (
            TeacherDiagnostics(
                self.teaching.strategy,
                self.data,
                cfg.logging.diagnostic_samples,
                derive_seed(run.seed, 2),
                run.eval_batch_size,
            )  # fmt: skip
            if cfg.logging.diagnostics and self.teaching.teacher is not None and self.world.main
            else None
        )
        self.state = TrainState()
        if resumed is not None:
            restore_run(self, resumed)
        self.train_loader = self._episode_loader()

        if not self.world.main or quiet:  # rank 0 writes the run folder
            kept = resumed.get("wandb_id") if resumed is not None else None
            self.logger: RunLogger = SilentLogger(self.run_dir, kept)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = config_to_dict(cfg)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.logger = RunLogger(
            self.run_dir,
            resolved,
            cfg.logging,
            self.run_dir.name,
            resume_step=self.state.global_step if resumed is not None else None,
            wandb_id=resumed.get("wandb_id") if resumed is not None else None,
        )
        if resumed is not None and (changes := changed_settings(resumed["config"], resolved)):
            said = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            self._say(f"resumed after step {self.state.global_step} with changed settings: {said}")
            self.logger.log({"trainer/resumed_with_changes": said}, self.state.global_step)

    # ------------------------------------------------------------------ #
    # The loop
    # ------------------------------------------------------------------ #

    def fit(
        self, max_steps: int | None = None, on_step: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """Train until ``train.epochs`` are done; return the last epoch's metrics.

        With ``train.stop_at_target``, a student's training ends (its last
        epoch cut short) at the first evaluation that reaches
        ``train.target_val_acc``. With ``train.episodes``, a fresh student
        follows, taught by the same teacher, until all have trained. With
        ``max_steps``, stop (with a checkpoint) after that many steps in this
        call; a later ``train.resume`` continues exactly from there.
        ``on_step`` is called after every student step (an analysis that
        reads the run as it goes: :mod:`metateach.lab.drift`).
        """
        cfg = self.cfg
        stop_at = None if max_steps is None else self.state.global_step + max_steps
        try:
            if self.state.global_step == 0:
                if self.world.main and not self.quiet:
                    log_run_start(
                        cfg, self.data, self.model, self.device, self.run_dir, self.logger
                    )
                # The start is a checkpoint too: a run stopped (or diverged) before its first
                # epoch ends resumes, or is replayed, from there.
                self._save_due = True
                self._save_if_due()
            while True:  # one student an episode
                if self._train_student(stop_at, on_step):
                    return self.state.latest()  # paused at max_steps, with a checkpoint
                if self.state.episode + 1 >= cfg.train.episodes:
                    return self._finish()
                self._next_episode()
        finally:
            self.close()

    def close(self) -> None:
        """Release the run's W&B run and folder (fit does, however it ends): a trainer built only to be read."""
        if not self.state.finished:  # stopped early or failed; a finished run closed its logger
            self.logger.close()
        if self._lock is not None:
            self._lock.release()

    def _train_student(self, stop_at: int | None, on_step: Callable[[], None] | None) -> bool:
        """Train this episode's student through its epochs; True if paused at ``stop_at`` instead."""
        cfg, state = self.cfg, self.state
        steps_per_epoch = len(self.train_loader)
        while state.epoch < cfg.train.epochs and not state.stopped:
            self.model.train()
            episode = f"episode {state.episode + 1}/{cfg.train.episodes} " * (
                cfg.train.episodes > 1
            )
            bar = tqdm(
                total=steps_per_epoch, initial=state.batch, unit="batch", leave=False,
                desc=f"{episode}epoch {state.epoch + 1}/{cfg.train.epochs}", dynamic_ncols=True,
                # None: only on a terminal.
                disable=None if cfg.train.progress and self.world.main else True,
            )  # fmt: skip
            self._pending_since = time.perf_counter()
            for batch in self.train_loader.epoch(state.epoch, start=state.batch):
                self._set_lr(state.epoch + state.batch / steps_per_epoch)
                try:
                    self._pending += self.train_step(batch)
                except NonFiniteStep:
                    bar.close()
                    self._stop_diverged()
                state.totals.seen += self.train_loader.global_size(state.batch)
                state.batch += 1
                state.step += 1
                if on_step is not None:
                    on_step()
                bar.update()
                if state.step % cfg.logging.every_steps == 0:
                    self._log_running_loss(bar)
                evaluate = cfg.train.eval_every_steps
                if evaluate and state.step % evaluate == 0 and state.batch < steps_per_epoch:
                    self._evaluate_progress()  # the epoch's end evaluates anyway
                    if state.stopped:
                        break
                every = cfg.train.checkpoint_every_steps
                stopping = stop_at is not None and self.state.global_step >= stop_at
                signalled = self.stop_signal is not None
                self._save_due |= stopping or signalled or (bool(every) and state.step % every == 0)
                if self._save_if_due() and (stopping or signalled):
                    bar.close()
                    if signalled:
                        self._stop_signalled()
                    return True
            bar.close()
            self._end_epoch()
        return False

    def train_step(self, batch: Batch) -> Tensor:
        """One student step (and the teacher's, when due) by the teaching strategy.

        Returns its :class:`~metateach.types.StepStats`, stacked on the device.
        """
        state = self.state
        with sharded(self.world):
            stats = self.teaching.strategy.step(batch, self.context())
        if self.world.size > 1:  # the global batch's numbers, the same on every rank
            (stats,) = all_sum([stats])
        batch_loss = stats[0] / self.train_loader.global_size(state.batch)
        self.loss_average.update(batch_loss, state.step)
        return stats

    def evaluate(self, loader: BatchLoader) -> tuple[float, float]:
        """The student's mean cross-entropy and accuracy over a split, in eval mode."""
        return evaluate_models([self.model], loader)[0]

    # ------------------------------------------------------------------ #
    # Epoch ends, checkpoints, the end of the run
    # ------------------------------------------------------------------ #

    def context(self) -> TeachingContext:
        """Where the student is in its training, for the teacher."""
        state = self.state
        return TeachingContext(
            step=state.step,
            epoch=state.epoch,
            total_steps=self.cfg.train.epochs * len(self.train_loader),
            avg_train_loss=self.loss_average.value,
            best_val_acc=max(state.best_val_acc, 0.0),
            episode=state.episode,
            grad_norm=self.teaching.strategy.problem.grad_norm,
        )

    def _end_epoch(self) -> None:
        state = self.state
        totals = self._collect()
        val_loss, val_acc = self.evaluate(self.val_loader)
        test_loss, test_acc = self.evaluate(self.test_loader)
        if not state.evals or state.evals[-1][0] != state.step:  # not measured just now
            self._note_evaluation(val_acc)
        if val_acc > state.best_val_acc:
            state.best_val_acc, state.best_epoch, state.test_acc_at_best = (
                val_acc,
                state.epoch + 1,
                test_acc,
            )
            self.save(BEST, weights_only=True)
        seen = max(totals.seen, 1)
        metrics = {
            "trainer/epoch": state.epoch + 1,
            "trainer/samples_learned": state.learned,
            "trainer/samples_examined": state.examined,
            "train/loss": totals.loss_sum / seen,
            "train/acc": totals.correct / seen,
            "train/clean_acc": totals.clean_correct / seen,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "test/loss": test_loss,
            "test/acc": test_acc,
            "test/acc_at_best_val": state.test_acc_at_best,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "eval/val_acc": val_acc,
            "perf/samples_per_s": totals.seen / max(totals.seconds, 1e-9),
            **self._target_metrics(),
            **evaluate_peers(
                self.model,
                self.teaching.strategy.networks(),
                {"val": self.val_loader, "test": self.test_loader},
            ),
            **self.teaching.strategy.pop_metrics(epoch=True),
            **self._teacher_metrics(),
            **(self.diagnostics.measure(self.context()) if self.diagnostics else {}),
        }
        if self.cfg.train.episodes > 1:
            metrics["trainer/episode"] = state.episode + 1
        state.history.append(metrics)
        self.logger.log(metrics, self.state.global_step)
        if self.diagnostics is not None and self.diagnostics.snapshot is not None:
            self.logger.log_media(self._sample_media(state.epoch + 1), self.state.global_step)
        episode = f"episode {state.episode + 1}  " * (self.cfg.train.episodes > 1)
        self._say(
            f"{episode}epoch {metrics['trainer/epoch']:>3}/{self.cfg.train.epochs}  "
            f"train loss {metrics['train/loss']:.4f} acc {100 * metrics['train/acc']:.2f}%  "
            f"val acc {100 * val_acc:.2f}%  test acc {100 * test_acc:.2f}%  "
            f"lr {metrics['train/lr']:.4g}  {metrics['perf/samples_per_s']:.0f} samples/s"
        )
        state.epoch, state.batch, state.totals = state.epoch + 1, 0, EpochTotals()
        self._save_due = True
        self._save_if_due()

    def _evaluate_progress(self) -> None:
        """A validation between epoch ends (``train.eval_every_steps``)."""
        _, val_acc = self.evaluate(self.val_loader)
        self._note_evaluation(val_acc)
        self.logger.log(
            {"eval/val_acc": val_acc, "trainer/samples_learned": self.state.learned},
            self.state.global_step,
        )

    def _note_evaluation(self, val_acc: float) -> None:
        """Record an evaluation, and say so if it is the first to reach ``train.target_val_acc``."""
        state, run = self.state, self.cfg.train
        self._collect()  # brings state.learned up to this step
        if state.note_evaluation(val_acc, run.target_val_acc, run.stop_at_target):
            target = run.target_val_acc
            self._say(
                f"validation accuracy {100 * val_acc:.2f}% reached the target {100 * target:g}% "
                f"at step {state.step}, after {state.learned} samples learned from"
            )

    def _target_metrics(self) -> dict[str, int | None]:
        """:meth:`_target_record` once the target is reached (epoch records carry no None)."""
        return self.state.target_record() if self.state.target_step is not None else {}

    def _save_if_due(self) -> bool:
        """Save ``last.pt`` if one is due and the teaching strategy allows it now; say whether it did.

        A teacher in the middle of a differentiable window cannot be saved; the
        checkpoint waits for the window's end (a resumed run replays the steps
        since the previous one, exactly).
        """
        if not (self._save_due and self.teaching.strategy.can_checkpoint()):
            return False
        self.save(LAST)
        self._save_due = False
        return True

    def _next_episode(self) -> None:
        """End this student's episode (the teacher learns from it), then start a fresh student.

        The new student and its optimizer are initialized in place (the
        teaching strategy holds them) from the episode's own seed, which also
        orders its data; the teacher, its optimizer and the strategy go on.
        """
        self._end_of_run()
        run = self.cfg.train
        self.state = self.state.next_episode()
        seed_everything(episode_seed(run.seed, self.state.episode), run.deterministic, self.device)
        fresh = model_for(self.cfg.model, self.data)
        self.model.load_state_dict(fresh.state_dict())
        self.optimizer.load_state_dict(
            optimizer_from_config(self.cfg.optim, fresh.parameters()).state_dict()
        )
        self.train_loader = self._episode_loader()
        self.loss_average.value.zero_()
        self.teaching.strategy.problem.grad_norm = None
        self._save_due = True
        self._save_if_due()

    def _episode_loader(self) -> BatchLoader:
        """The training batches of the episode in progress, in its own order."""
        run = self.cfg.train
        return self.data.train_loader(
            run.batch_size,
            episode_seed(run.seed, self.state.episode),
            self.device,
            self.world.shard,
        )

    def _end_of_run(self) -> None:
        """The strategy's end of a student's training (a policy-gradient teacher learns), logged.

        With ``train.episodes``, the episode's record joins ``state.episodes``.
        """
        state = self.state
        strategy = self.teaching.strategy
        strategy.end_of_run(state.history, self.context())
        metrics: dict[str, float] = strategy.pop_metrics()
        if self.cfg.train.episodes > 1:
            metrics = {**state.episode_record(), **metrics}
            state.episodes.append(metrics)
        if metrics:
            self.logger.log(metrics, self.state.global_step)

    def _finish(self) -> dict[str, float]:
        state = self.state
        if not state.finished:  # once, even when a finished run is resumed
            self._end_of_run()
            state.finished = True
            self._save_due = True
            self._save_if_due()
        metrics = state.latest()
        self.logger.summary(
            state.summary(self.data.noise.realized_rate, self.cfg.train.target_val_acc is not None)
        )
        if not self.world.main:
            self.logger.close()
            return metrics
        if self.diagnostics is not None:
            self.diagnostics.save(self.context(), self.run_dir / "diagnostics")
        if self.cfg.logging.plots:
            run, figures = self.run_dir, {}
            if self.diagnostics is not None:
                drawn = self.diagnostics.draw(
                    self.context(), state.history, run.name, run / "diagnostics"
                )
                figures = {f"diagnostics/{name}": path for name, path in drawn.items()}
            drawn = plot_run(state, self.cfg.train.target_val_acc, run.name, run)
            figures |= {f"plots/{name}": path for name, path in drawn.items()}
            for name, path in figures.items():
                self.logger.log_image(name, path, state.global_step)
        if (curves := loss_curve_series(state.history)) is not None:
            self.logger.log_media({"teacher/loss_curves": curves}, state.global_step)
        self.logger.close()
        return metrics

    def save(self, name: str, weights_only: bool = False) -> Path:
        """Checkpoint the run to ``<run>/checkpoints/<name>`` (see :func:`~metateach.checkpoint.run_state`)."""
        self._collect()
        state = run_state(self, weights_only)  # every rank: the random states are gathered
        path = self.run_dir / "checkpoints" / name
        if not self.world.main:
            return path
        save_checkpoint(path, state)
        if self.cfg.logging.checkpoint_artifacts:
            latest = self.state.latest()
            self.logger.log_checkpoint(path, {
                "step": self.state.global_step,
                "epoch": self.state.epoch,
                **{k: latest[k] for k in ("val/acc", "test/acc") if k in latest},
                "val/best_acc": self.state.best_val_acc,
                "config": flatten(config_to_dict(self.cfg)),
            })  # fmt: skip
        return path

    # ------------------------------------------------------------------ #
    # Small helpers
    # ------------------------------------------------------------------ #

    def _collect(self) -> EpochTotals:
        """Add the device-side step results to the epoch totals (a sync point); stop on a non-finite loss."""
        stats = StepStats.read(self._pending)
        self._pending.zero_()
        now = time.perf_counter()
        totals = self.state.add(stats, seconds=now - self._pending_since)
        self._pending_since = now
        if not torch.isfinite(torch.tensor(stats.loss_sum)):
            raise MetateachError(
                f"the training loss became non-finite by step {self.state.step} "
                f"(epoch {self.state.epoch + 1}); lower optim.lr or check the data"
            )
        return totals

    def _stop_signalled(self) -> NoReturn:
        """A signal asked the run to stop, and its state is saved: say how to go on."""
        assert self.stop_signal is not None
        name = signal.Signals(self.stop_signal).name
        raise RunInterrupted(
            self.stop_signal,
            f"stopped by {name} after step {self.state.step} (epoch {self.state.epoch + 1}); "
            f"the state is saved: continue with train.resume={self.run_dir}",
        )

    def _stop_diverged(self) -> NoReturn:
        """The student's gradient at this step is not finite: save the state just before it, and stop.

        By then the step has moved what comes before the student's own update
        (a teacher's update, the validation stream, random draws, BatchNorm's
        statistics), so that state is rebuilt: :meth:`_replay_to` runs the
        run again from its last checkpoint, quietly, and pauses where this
        step began. That checkpoint is kept beside it: a run that diverged
        over several steps is better continued from there.
        """
        if self.quiet:  # the replay itself met the step: it could not pause before it
            raise NonFiniteStep("the replay could not pause before the failing step")
        state = self.state
        step = state.step + 1
        self.logger.log({"step/nonfinite": step}, state.global_step + 1)
        last = self.run_dir / "checkpoints" / LAST
        kept, unsaved = self._replay_to(state.global_step, step)
        if unsaved is not None:
            saved = (
                f"the state just before it could not be rebuilt ({unsaved}), so the last good state "
                f"is the one saved in {last}"
            )
        elif kept is None:
            saved = f"the state before it is saved in {last}"
        else:
            saved = (
                f"the state before it is saved in {last}, and the checkpoint it was rebuilt from "
                f"(step {kept[0]}) is kept as {kept[1]}"
            )
        raise MetateachError(
            f"the training loss became non-finite at step {step} (epoch {state.epoch + 1}, batch "
            f"{state.batch + 1}) and its step was not taken; {saved}; continue from a checkpoint "
            f"with a lower learning rate: train.resume=<checkpoint> optim.lr=<lower> "
            "train.resume_with_changes=[optim.lr] (or check the data)"
        )

    def _replay_to(
        self, global_step: int, failing: int
    ) -> tuple[tuple[int, Path] | None, str | None]:
        """Rebuild the run at ``global_step`` from its last checkpoint and save it there as ``last.pt``.

        The replay is a second, quiet trainer that resumes the run folder (a
        resumed run is the same run) and pauses after the steps in between.
        Returns the checkpoint replayed from (its step and where it is kept
        now; None if no step needed replaying), and why ``last.pt`` could not
        be brought to ``global_step`` (None when it was).
        """
        self.logger.close()
        if self._lock is not None:  # the replay takes the folder's lock
            self._lock.release()
            self._lock = None
        cfg = copy.deepcopy(self.cfg)
        cfg.train.resume = str(self.run_dir)
        replay = Trainer(cfg, self.data, quiet=True)
        since = replay.state.global_step
        if since == global_step:
            return None, None
        last = self.run_dir / "checkpoints" / LAST
        kept = last.with_name(f"step{since}.pt")
        if replay.world.main:
            kept.unlink(missing_ok=True)
            try:  # the next save replaces last.pt by a rename: a second link to it stays
                os.link(last, kept)
            except OSError:  # a file system without hard links
                shutil.copyfile(last, kept)
        self._say(
            f"replaying steps {since + 1}-{global_step} from the checkpoint at step {since}, to "
            f"save the state before step {failing}"
        )
        try:
            replay.fit(max_steps=global_step - since)
        except NonFiniteStep:  # last.pt is still the checkpoint it started from
            kept.unlink(missing_ok=True)
            return None, "the teacher's differentiable window was open there"
        except MetateachError as e:
            kept.unlink(missing_ok=True)
            return None, first_line(e)
        return (since, kept), None

    def _log_running_loss(self, bar: tqdm) -> None:
        totals = self._collect()
        loss = totals.loss_sum / max(totals.seen, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}")
        step_metrics = self.teaching.strategy.pop_metrics()
        metrics = {"step/train_loss": loss, "step/lr": lr, **prefixed("step/", step_metrics)}
        self.logger.log(metrics, self.state.global_step)

    def _sample_media(self, epoch: int) -> dict[str, Any]:
        """The diagnostic sample in W&B: the weights' histograms, and at ``logging.table_epochs``
        the per-sample table."""
        assert self.diagnostics is not None and self.diagnostics.snapshot is not None
        snapshot, settings = self.diagnostics.snapshot, self.cfg.logging
        media = weight_histograms(snapshot)
        epochs = self.cfg.train.epochs
        if epoch in {e if e > 0 else epochs + 1 + e for e in settings.table_epochs}:
            media["teacher/samples"] = sample_table(
                snapshot, self.diagnostics.indices, self.data, settings.table_images
            )
        return media

    def _teacher_metrics(self) -> dict[str, float]:
        """The teacher's own metrics, and its learning rate when it learns by an optimizer."""
        teacher, optimizer = self.teaching.teacher, self.teaching.optimizer
        metrics = {} if teacher is None else prefixed("teacher/", teacher.metrics())
        if optimizer is not None:
            metrics["teacher/lr"] = optimizer.param_groups[0]["lr"]
        return metrics

    def _say(self, line: str) -> None:
        """A line on the console, from rank 0 alone (and not from a quiet replay)."""
        if self.world.main and not self.quiet:
            tqdm.write(line)

    def _set_lr(self, epoch: float) -> None:
        set_lr(self.optimizer, self.cfg.optim.lr * self.schedule(epoch))
