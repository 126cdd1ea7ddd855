"""The training loop: AdamW steps on a task's batches, periodic evaluation, checkpoints, resume.

One step draws ``grad_accum`` micro-batches of ``batch_size`` sequences of ``seq_len`` tokens
from the task (reformer.data.task: text windows, images or the synthetic duplication task),
accumulates the gradients of their mean losses (under bf16 autocast if asked), clips the
global gradient norm and takes one AdamW step at the scheduled learning rate
(reformer.training.optim).

The task chooses the model (``Task.head``; reformer.heads.build_model): the language model,
or for the classify, listops and mlm tasks a classifier or masked LM on the same trunk, fed
``(input_ids, attention_mask, labels)``; the seq2seq task trains the encoder-decoder. Their
evaluation reports the loss per example (per masked or target token) in bits and the accuracy
(metrics.evaluate_head).

Decisions:
- Exact resume: the checkpoint holds the weights, the optimizer moments, the step and elapsed
  time (all the schedule depends on), the global torch RNG state (fresh LSH rotations and
  dropout masks are drawn from it) and the data sampler's generator. Evaluation runs under a
  forked, fixed-seed RNG so it does not move the training stream. So a run stopped after k
  steps and resumed reproduces the uninterrupted run's losses exactly (on the same machine).
- A trainer seeds the global torch RNG with ``seed`` before building the model, so the
  initial weights and the stream of rotations are a function of the seed.
- A checkpoint is one step folder switched in by one rename (reformer.training.checkpoint),
  so a kill at any moment leaves a complete one, and resume loads the newest. The Trainer
  locks its run directory: a second run there would interleave metrics and checkpoints.
- Stopping (steps, time budget, Ctrl-C, SIGTERM; agreed across processes):
  reformer.training.stopping.
- The library never prints: progress goes to a :class:`Callback` (the CLI draws a tqdm bar).

Many processes (``torchrun``; reformer.parallel): every process runs this loop on its own
device with ``world`` = its place. Each draws its own slice of every global micro-batch
(reformer.data.task), so a step trains on world x batch_size x grad_accum windows; the model is
wrapped in DDP or sharded per block with FSDP2, and micro-batches before the last skip the
gradient communication. Rank 0 alone locks the run directory and writes config, metrics, plot
and checkpoints; the CLI shows the bar on rank 0 only. Checkpoints keep the one-process format
(weights and AdamW moments gathered whole) plus every rank's RNG state.

RNG policy: every process seeds with ``seed`` before building the model, so the initial weights
are the same everywhere; then ranks other than 0 re-seed their global RNG with
``seed + rank * 2**32``, so dropout masks and LSH rotations differ between processes while rank
0 continues the one-process stream. Evaluation seeds each held-out sequence by its index, so
its figure does not depend on how the sequences are split across processes.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from reformer.config import ReformerConfig
from reformer.data.task import Task, build_task
from reformer.heads import build_model
from reformer.model import ReformerTrunk
from reformer.parallel.data_parallel import (
    finish_gradients,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    shard_optimizer_state,
    unwrap,
    wrap,
)
from reformer.parallel.world import World
from reformer.training import checkpoint as ckpt
from reformer.training import rundir
from reformer.training.config import RunConfig, TrainConfig, check_device
from reformer.training.metrics import (
    LN2,
    MetricsLog,
    autocast,
    evaluate_head,
    evaluate_sequences,
    plot_metrics,
)
from reformer.training.optim import build_optimizer, lr_at, progress, set_lr
from reformer.training.reports import Callback, EvalReport, RunResult, StepReport
from reformer.training.resume import (
    check_resumable,
    merge_for_resume,
    rank_seed,
    rng_state,
    set_rng_state,
)
from reformer.training.stopping import StopControl


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device ``name`` means here; under torchrun, CUDA is the local rank's GPU."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; pass --device cpu")
    if world is not None and world.distributed and name.startswith("cuda"):
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


class Trainer:
    """A training run bound to its run directory. Build with :meth:`create` or :meth:`resume`.

    The directory is locked (one run at a time) from construction until :meth:`run_loop`
    returns or :meth:`close`; a second run there gets a ValueError naming the first.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, run_dir: str | Path, run: RunConfig, *, resume: bool = False,
                 world: World | None = None) -> None:
        self.run_dir, self.run, cfg = Path(run_dir), run, run.training  # RunConfig checked
        self.world = world or World()
        self.device = resolve_device(cfg.device, self.world)
        # Under sequence parallelism every process reads the same batches (and cuts its slice).
        self.sequence = cfg.parallel == "sequence" and self.world.distributed
        data_rank, data_world = (0, 1) if self.sequence else (self.world.rank, self.world.size)
        self.task: Task = build_task(cfg.task_spec(data_rank, data_world))
        if self.sequence and self.task.head != "lm":
            raise ValueError(f"parallel='sequence' trains language models only; the "
                             f"{cfg.task} task trains a {self.task.head} head: use ddp")
        if self.task.head == "seq2seq" and cfg.parallel == "fsdp" and self.world.distributed:
            raise ValueError("parallel='fsdp' does not shard the encoder-decoder yet; train "
                             "the seq2seq task with parallel='ddp'")
        if self.sequence and self.task.extra_metrics is not None:
            raise ValueError(f"parallel='sequence' cannot evaluate the {cfg.task} task (its "
                             "metrics need every position's logits in one process); use ddp")
        if run.model.vocab_size < self.task.vocab_size:
            raise ValueError(f"vocab_size={run.model.vocab_size} cannot hold the {cfg.task} "
                             f"task's {self.task.vocab_size} symbols; use vocab_size="
                             f"{self.task.vocab_size}")
        self._lock = rundir.RunLock(self.run_dir)  # rank 0's, held until run_loop returns
        try:
            self._open(resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, resume: bool) -> None:
        """Under the lock: build the model, load the newest checkpoint or start afresh."""
        self.world.on_main(lambda: self._claim_run_dir(resume))
        torch.manual_seed(self.run.training.seed)
        module = build_model(self.run.model, self.task.head, self.task.n_classes,
                             self.run.training.pooling, self.run.training.head_hidden,
                             self.run.training.pool_width)
        state = ckpt.load_checkpoint(self.run_dir, module) if resume else None
        self.init_step = None  # the step of the trunk that init_from started this run from
        if state is None and self.run.training.init_from is not None:
            if self.task.head == "seq2seq":
                raise ValueError("init_from starts one trunk (a language model, classifier or "
                                 "masked LM); the seq2seq task's encoder-decoder has two: "
                                 "leave init_from unset")
            self.init_step = ckpt.load_trunk(self.run.training.init_from, module)
        module.to(self.device)
        self.model = wrap(module, self.run.training.parallel, self.device) \
            if self.world.distributed else module
        self.optimizer = build_optimizer(unwrap(self.model), self.run.training)
        self.metrics = MetricsLog(self.run_dir / ckpt.METRICS_FILE)
        self.step, self.elapsed_s, self.evals = 0, 0.0, []
        self._stop = StopControl(self.world, self.device)
        if state is not None:
            self._restore(state)
        elif self.world.rank > 0:
            torch.manual_seed(rank_seed(self.run.training.seed, self.world.rank))
        self.world.on_main(lambda: ckpt.write_config(self.run_dir, self.run))

    def _claim_run_dir(self, resume: bool) -> None:
        """Rank 0: lock the run directory and clear what a new run or a killed save left."""
        self._lock.acquire()  # see rundir.RunLock
        if not resume:  # again: another run may have used the folder since create() looked
            rundir.check_new_run_dir(self.run_dir)
            (self.run_dir / ckpt.METRICS_FILE).unlink(missing_ok=True)
        ckpt.remove_stale(self.run_dir)

    @property
    def module(self) -> ReformerTrunk:
        """The ReformerLM or the task's head (inside DDP's wrapper; sharded in place under
        FSDP2)."""
        return unwrap(self.model)

    def close(self) -> None:
        """Unlock the run directory (run_loop does so when it returns)."""
        self._lock.release()

    @classmethod
    def create(cls, run_dir: str | Path, run: RunConfig, world: World | None = None) -> Trainer:
        """A new run in ``run_dir``: a new or empty folder, or a run without a checkpoint.

        Refuses a folder of other files (no config.json) before writing anything there.
        """
        world = world or World()
        world.on_main(lambda: rundir.check_new_run_dir(Path(run_dir)))
        return cls(run_dir, run, world=world)

    @classmethod
    def resume(cls, run_dir: str | Path, model: ReformerConfig | None = None,
               changes: dict[str, Any] | None = None, world: World | None = None) -> Trainer:
        """Continue the run saved in ``run_dir`` from its newest complete checkpoint.

        Args:
            model: the model config asked for now (None: the saved one); it must match.
            changes: training fields set explicitly now. Those in RESUMABLE_FIELDS (steps,
                max_minutes, ...) replace the saved values; the others must match them.
        """
        run_dir = Path(run_dir)
        saved = ckpt.read_config(run_dir)
        if not ckpt.has_checkpoint(run_dir):
            raise ValueError(f"{run_dir} holds no checkpoint yet, so there is nothing to "
                             "resume; start it again without --resume")
        return cls(run_dir, merge_for_resume(run_dir, saved, model, changes or {}), resume=True,
                   world=world)

    # --------------------------------------------------------------------- the loop
    def request_stop(self, reason: str) -> None:
        """Stop after the current step (and save a checkpoint)."""
        self._stop.request(reason)

    def run_loop(self, callback: Callback | None = None, handle_signals: bool = False
                 ) -> RunResult:
        """Train until ``steps``, ``max_minutes`` or a stop request; returns how it ended.

        The run directory stays locked until it returns.
        """
        cb, cfg = callback or Callback(), self.run.training
        if self.world.is_main:
            self._lock.acquire()
        signals = self._stop.signals(lambda reason: cb.on_stop_requested(self, reason)) \
            if handle_signals else contextlib.nullcontext()
        try:
            return self._loop(cb, cfg, signals)
        finally:
            self._lock.release()

    def _loop(self, cb: Callback, cfg: TrainConfig,
              signals: contextlib.AbstractContextManager) -> RunResult:
        with signals:
            start = time.monotonic() - self.elapsed_s
            if self.step == 0 and not self.evals:
                self._evaluate(cb)
                self.elapsed_s = time.monotonic() - start
            reason, step_time = None, 0.0
            while reason is None:
                reason = self._stop.reason(cfg, self.step, self.elapsed_s, step_time)
                if reason is not None:
                    break
                loss, dt = self._train_step()
                self.elapsed_s = time.monotonic() - start
                step_time = dt if not step_time else 0.9 * step_time + 0.1 * dt
                self._report_step(cb, loss, dt, step_time)
                if self.step % cfg.eval_every == 0:
                    self._evaluate(cb)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(cb, "periodic")
                self.elapsed_s = time.monotonic() - start
            if reason in ("steps", "time") and (not self.evals or self.evals[-1].step != self.step):
                self._evaluate(cb)
            self.save_checkpoint(cb, reason)
            return RunResult(self.run_dir, self.step, reason, self.evals)

    def _train_step(self) -> tuple[float, float]:
        """One optimiser step; returns (mean loss in nats over all processes, seconds)."""
        cfg = self.run.training
        t0 = time.perf_counter()
        self.model.train()
        set_lr(self.optimizer, lr_at(cfg, self.step, self.elapsed_s))
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(cfg.grad_accum):
            batch = [None if t is None else t.to(self.device) for t in self.task.next_batch()]
            # Only the last micro-batch's backward communicates (all-reduce, reduce-scatter).
            with gradient_sync(self.model, i == cfg.grad_accum - 1):
                with autocast(self.device, cfg.precision):
                    loss = self._loss(batch)
                (loss / cfg.grad_accum).backward()
            total += loss.item()
        finish_gradients(self.model)
        loss_value = self.world.all_sum([total], self.device)[0] / (cfg.grad_accum
                                                                     * self.world.size)
        if not math.isfinite(loss_value):
            raise self._diverged(loss_value)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss_value, time.perf_counter() - t0

    def _loss(self, batch: list[torch.Tensor | None]) -> torch.Tensor:
        """The mean loss of one micro-batch: (input_ids, labels) for the language model,
        (input_ids, attention_mask, labels) for a head."""
        if self.task.head == "lm":
            inputs, labels = batch  # (B, L) each
            return self.model(inputs, labels=labels, return_logits=False).loss
        if self.task.head == "seq2seq":
            inputs, mask, targets, labels = batch  # (B, S), (B, S), (B, T), (B, T)
            return self.model(inputs, targets, attention_mask=mask, labels=labels,
                              return_logits=False).loss
        inputs, mask, labels = batch
        return self.model(inputs, attention_mask=mask, labels=labels).loss

    def _diverged(self, loss: float) -> ValueError:
        """The error for a non-finite loss: what to change, and what is on disk."""
        cfg, last = self.run.training, ckpt.latest_checkpoint(self.run_dir)
        fp32 = " or train in fp32" if cfg.precision == "bf16" else ""
        saved = (f"the checkpoint of step {last.step} in {self.run_dir} is intact" if last
                 else "no checkpoint has been saved yet")
        return ValueError(f"the loss became {loss} at step {self.step + 1}; lower the learning "
                          f"rate (lr={cfg.lr}){fp32}; {saved}")

    def _report_step(self, cb: Callback, loss: float, dt: float, step_time: float) -> None:
        cfg = self.run.training
        eta = (cfg.steps - self.step) * step_time
        if cfg.max_minutes is not None:
            eta = min(eta, max(0.0, 60.0 * cfg.max_minutes - self.elapsed_s))
        report = StepReport(step=self.step, steps=cfg.steps, loss=loss, bpc=loss / LN2,
                            lr=self.optimizer.param_groups[0]["lr"],
                            tokens_per_s=self.tokens_per_step / dt, elapsed_s=self.elapsed_s,
                            eta_s=eta, progress=progress(cfg, self.step, self.elapsed_s))
        if self.world.is_main:
            self.metrics.append({"kind": "train", "step": report.step, "loss": loss,
                                 "bpc": report.bpc, "lr": report.lr,
                                 "tokens": self.step * self.tokens_per_step,
                                 "tokens_per_s": report.tokens_per_s,
                                 "elapsed_s": round(self.elapsed_s, 3)})
        cb.on_step(self, report)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimiser step over all processes."""
        return self.run.training.tokens_per_step * (1 if self.sequence else self.world.size)

    # ------------------------------------------------------------ evaluation, saving
    def evaluate(self) -> EvalReport:
        """Held-out bits per token (per example for the classifiers), with the model's rounds
        and each of eval_n_hashes; the heads' accuracy in ``metrics``."""
        cfg = self.run.training
        if self.task.head != "lm":
            held_out, head = self.task.eval_set(), self.task.head
            first, metrics = evaluate_head(self.module, head, held_out, seed=cfg.seed,
                                           precision=cfg.precision, world=self.world)
            extra = {r: evaluate_head(self.module, head, held_out, n_hashes=r, seed=cfg.seed,
                                      precision=cfg.precision, world=self.world)[0]
                     for r in cfg.eval_n_hashes}
            return EvalReport(step=self.step, val_bpc=first, by_n_hashes=extra, metrics=metrics)
        inputs, labels = self.task.eval_set()
        # Sequence parallelism: all processes evaluate each sequence together.
        model, world = (self.model, None) if self.sequence else (self.module, self.world)
        bpc, metrics = evaluate_sequences(model, inputs, labels, seed=cfg.seed,
                                          precision=cfg.precision, extra=self.task.extra_metrics,
                                          world=world)
        extra = {r: evaluate_sequences(model, inputs, labels, n_hashes=r, seed=cfg.seed,
                                       precision=cfg.precision, world=world)[0]
                 for r in cfg.eval_n_hashes}
        return EvalReport(step=self.step, val_bpc=bpc, by_n_hashes=extra, metrics=metrics)

    def _evaluate(self, cb: Callback) -> None:
        report = self.evaluate()
        self.evals.append(report)
        if not self.world.is_main:
            cb.on_eval(self, report)
            return
        self.metrics.append({"kind": "eval", "step": report.step, "val_bpc": report.val_bpc,
                             "val_bpc_n_hashes": {str(k): v
                                                  for k, v in report.by_n_hashes.items()},
                             **{f"val_{k}": v for k, v in report.metrics.items()}})
        self.refresh_plot()
        cb.on_eval(self, report)

    def refresh_plot(self) -> None:
        title = f"{self.run_dir.name}: {self.run.preset or 'custom'} preset, " \
                f"context {self.run.training.seq_len:,}"
        plot_metrics(self.metrics.read(), self.run_dir / ckpt.PLOT_FILE, title,
                     unit=self.task.unit)

    def save_checkpoint(self, cb: Callback | None = None, reason: str = "") -> None:
        """Save the weights and the trainer state of the current step as one atomic checkpoint
        (see reformer.training.checkpoint); locks the run directory if it is not yet.

        Every process must call it: sharded tensors are gathered whole, every rank's RNG state
        is collected, and rank 0 writes."""
        weights = full_model_state(self.model)
        optimizer = full_optimizer_state(self.optimizer)
        ranks = self.world.gather(rng_state(self.device))
        state = {"step": self.step, "elapsed_s": self.elapsed_s, "optimizer": optimizer,
                 "rng": {**ranks[0], "ranks": ranks}, "world": self.world.size,
                 "data": {"sampler": self.task.state_dict(),
                          "fingerprint": self.task.fingerprint()},
                 "evals": [[e.step, e.val_bpc, list(e.by_n_hashes.items()), e.metrics]
                           for e in self.evals]}

        def write() -> None:
            self._lock.acquire()
            ckpt.save_checkpoint(self.run_dir, weights, state)

        self.world.on_main(write)
        if cb is not None:
            cb.on_checkpoint(self, reason)

    def _restore(self, state: dict[str, Any]) -> None:
        """The trainer state of a loaded checkpoint (its weights are in the model already)."""
        check_resumable(self.run_dir, state, self.task.fingerprint(), self.world.size)
        data = state["data"]
        self.optimizer.load_state_dict(state["optimizer"])
        shard_optimizer_state(self.optimizer)
        self.task.load_state_dict(data["sampler"])
        set_rng_state(state["rng"].get("ranks", [state["rng"]])[self.world.rank], self.device)
        self.step, self.elapsed_s = state["step"], state["elapsed_s"]
        self.evals = [EvalReport(s, v, dict(extra), *metrics)  # older states: no metrics
                      for s, v, extra, *metrics in state["evals"]]
        if self.world.is_main:
            self.metrics.truncate_after(self.step)
