"""The training recipe: setup, train, cleanup. Never branches on the backend's name.

One optimizer step is dtrain/training/step.py's `train_step` (shared with the memory profiler): the
gradient of the mean token loss over the global batch, whatever the split into ranks and
micro-batches, so one process and N ranks give the same loss and the same update.

Preemption: SIGTERM or SIGUSR1 on any rank, or the job's deadline (training.time_limit, SLURM's end
time; dtrain/training/stopping.py) is acted on at the next safe point: a step boundary, the next batch of an
evaluation (the resumed run redoes that step's evaluation), the end of the save in progress, the
next batch of the generation eval. All ranks agree (one all-reduce), write a training checkpoint
(rank 0 also writes `<output.dir>/PREEMPTED`) and the process exits with PREEMPT_EXIT = 75
(EX_TEMPFAIL: "requeue me"; `training.resume=auto` continues bit-exactly). Launched directly
(srun, `python -m dtrain`) the job sees 75; torchrun reports its own failure (exit 1) instead, so
test for the PREEMPTED file there. A step whose loss or gradient norm is not finite updates
nothing and is counted (training.nonfinite, nonfinite_max).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dtrain import backends, data as data_lib, faults, loggers as loggers_lib
from dtrain.backends import collectives, env as dist
from dtrain.config import schema as config_lib
from dtrain.config.schema import Config
from dtrain.data.chat import run_template
from dtrain.loggers import curve, flops
from dtrain.lora import ops as lora, peft_format as adapter
from dtrain.model import hub, sources, templates
from dtrain.model.tokenizer import corpus_file, has_tokenizer, load_tokenizer
from dtrain.storage import files, outdir
from dtrain.training import checkpoint, preempt, reference, step as step_lib, step_options as step_opts, stopping

log = logging.getLogger("dtrain")
PREEMPT_EXIT = preempt.EXIT_CODE


@dataclass
class RunState:
    step: int = 0


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = dist.detect(cfg.backend.device, cfg.backend.dist_backend)
        self.out = Path(cfg.output.dir)
        self.state = RunState()
        self.backend = backends.create(cfg, self.env)
        self._saved_step = -1  # last step whose checkpoint this process wrote (or resumed from)
        self.stops = stopping.Stops(self.backend, cfg)
        self.nonfinite = stopping.NonFinite(cfg)
        self._pending: dict | None = None  # the metrics row of a step whose evaluation a preemption cut
        self.loggers: loggers_lib.MultiLogger | None = None  # rank 0 only
        self._mfu: tuple[float, float] | None = None  # (flops per token, peak FLOP/s): CUDA only
        self.objective = step_lib.objective(cfg)

    # ---- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        setup_logging(env.is_main)
        torch.manual_seed(cfg.training.seed + env.rank)  # dropout differs per rank, as in DDP
        self._prepare_out()
        self._resolve_hub_ids()
        tok_dir = cfg.data.tokenizer or (cfg.model.path if cfg.model.path and has_tokenizer(cfg.model.path) else None)
        self.tokenizer = load_tokenizer(tok_dir, corpus_file(cfg.data.path), cfg.model.trust_remote_code)
        template = run_template(cfg.data, self.tokenizer)
        self.chat = (template, templates.stop_ids(self.tokenizer, template))  # kept with the adapter
        self.backend.build()  # before the data: a model the config cannot build fails first, in one line
        self._check_vocab()
        wait = self.backend.long_barrier(cfg.data.prepare_timeout_s)  # not backend.timeout_s: tokenizing takes long
        data = data_lib.prepare(cfg.data, self.tokenizer, cfg.training.seed, env.is_main, wait)
        self.train_data, self.eval_data = data.train, data.eval
        t = cfg.training
        lengths = self.train_data.row_lengths() if cfg.data.group_by_length else None
        self.plan = data_lib.BatchPlan(
            len(self.train_data), t.micro_batch_size, t.grad_accum, env.world_size, t.seed, lengths
        )
        data_lib.check_plan(self.plan, "training")
        self.total_steps = data_lib.total_steps(t.max_steps, t.epochs, self.plan)
        self.backend.setup_optimizer(self.total_steps)
        self.state.step = checkpoint.maybe_resume(self.backend, self.cfg, self.out, self.plan, self.tokenizer)
        if self.state.step:
            self._saved_step = self.state.step
            self._pending = checkpoint.read_state(self.out, self.state.step).get("pending_row")
        peak = flops.peak_flops(self.backend.device, cfg.logging.peak_tflops)
        if peak is not None:
            self._mfu = (flops.flops_per_token(self.backend.model, cfg.data.seq_len), peak)
        if env.is_main:
            config_lib.save(cfg, self.out / "config.yaml")
            self.tokenizer.save_pretrained(self.out / "tokenizer")
            templates.write_settings(self.out / "tokenizer", *self.chat)  # the template the data was rendered with
            self._log_start(data.skipped)
            self.loggers = loggers_lib.create(cfg, self.out, self.state.step)

    def _prepare_out(self) -> None:
        """Create output.dir; with output.overwrite, remove the earlier run's files (rank 0)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise config_lib.ConfigError(f"output.dir = '{self.out}': cannot create it ({e.strerror})") from None
        if self.cfg.output.overwrite:
            collectives.together(self.backend, lambda: outdir.clear_run(self.out), what="clearing the run directory")

    def _resolve_hub_ids(self) -> None:
        """The other ranks read the snapshot rank 0 resolved (it downloaded before joining the process
        group, so it is complete): from its cache, shared across nodes (docs/hub.md). A rank that
        cannot find it ends every rank, not only itself."""
        cfg = self.cfg
        if self.env.world_size > 1 and any(
            hub.is_hub_id(v) or hub.commit_of(v) for v in (cfg.model.path, cfg.data.tokenizer)
        ):
            collectives.together(
                self.backend,
                lambda: sources.resolve_named_models(cfg, download=False),
                every_rank=True,
                what="reading rank 0's Hub snapshot from this rank's HF cache (the ranks need one shared cache)",
            )

    def _check_vocab(self) -> None:
        vocab = self.backend.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise config_lib.ConfigError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}"
            )

    def _log_start(self, skipped: int) -> None:
        for line in step_opts.describe(self.backend.model, self.cfg) + reference.describe(self.cfg):
            log.info("%s", line)
        trainable, total = lora.count_parameters(self.backend.model)
        log.info("trainable params: %s / %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        lengths = self.train_data.row_lengths().float()
        mean = float(lengths.mean()) if len(self.train_data) else 0.0
        log.info(
            "data: %d train / %d eval rows of at most %d tokens (mean %.0f; a micro-batch is cut to its "
            "longest row), %d record(s) skipped; %d steps on %d rank(s)",
            len(self.train_data),
            len(self.eval_data),
            self.cfg.data.seq_len,
            mean,
            skipped,
            self.total_steps,
            self.env.world_size,
        )

    # ---- train ------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to the last step; returns the process exit code (0, or PREEMPT_EXIT)."""
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not self.env.is_main,
            desc="train",
            dynamic_ncols=True,
        )
        try:
            code = self._steps(bar, self.loggers)
            if code is None:
                code = self._finish(self.loggers)
        finally:
            bar.close()
            self._close_loggers()
        if code is not None:
            return code
        from dtrain.memory import measure

        memory = measure.summary_line(measure.snapshot(self.backend))  # collective: every rank
        if self.env.is_main:
            log.info("done: adapter in %s, metrics in %s", self.out / "adapter", self.out / outdir.METRICS)
            log.info("memory at end of run: %s", memory)
            if self.cfg.logging.loss_curve and curve.write_loss_curve(
                self.out / outdir.METRICS, self.out / "loss_curve.png"
            ):
                log.info("loss curve in %s", self.out / "loss_curve.png")
        return 0

    def _steps(self, bar, metrics) -> int | None:
        """The optimizer steps; PREEMPT_EXIT when a signal or the deadline stopped them (checkpoint
        written at the safe point reached: a step boundary, or the next batch of an evaluation)."""
        try:
            if self.state.step == 0 and self._evaluates():
                self._write_metrics({"step": 0, **self.evaluate_all()}, metrics)  # the base's own loss
        except preempt.Preempted:
            return self._preempt(at_start=True)
        if self._pending is not None:  # resumed from a checkpoint taken inside that step's evaluation
            row, self._pending = self._pending, None
            if (code := self._after_step_or_stop(row, metrics)) is not None:
                return code
        while self.state.step < self.total_steps:
            row = self._train_step()
            self.state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            self.stops.deadline.saw("step", row["step_time_s"])
            self.stops.armed = True
            if (code := self._after_step_or_stop(row, metrics)) is not None:
                return code
        return None

    def _after_step_or_stop(self, row: dict, metrics) -> int | None:
        stop = self.nonfinite.seen(row, row.pop("nonfinite", ""))
        try:
            self._after_step(row, metrics)
        except preempt.Preempted:
            return self._preempt(pending=row)
        if stop:
            raise stopping.TrainingStopped(stop)
        return self._preempt() if self.stops.check() else None

    def _finish(self, metrics) -> int | None:
        """The last checkpoint, the adapter, the generation eval; PREEMPT_EXIT when stopped between them."""
        final = adapter.gather_adapter(self.backend, self.cfg.lora.adapter_name)  # once, for both saves
        self._save(tensors=final)
        self._saved_step = self.state.step
        if self.stops.check():
            return self._preempt()
        adapter.save_adapter(self.backend, self.cfg, self.out / "adapter", tensors=final, chat=self.chat)
        if self.cfg.training.eval_generate:
            stopped: list[bool] = []

            def gen_eval() -> None:
                try:
                    self._generation_eval(metrics)
                except preempt.Preempted:
                    stopped.append(True)

            collectives.together(self.backend, gen_eval, what="generation eval")
            if self.stops.check(local=bool(stopped) or preempt.requested()):
                return self._preempt()
        return None

    def _save(self, **kw) -> Path | None:
        start = time.perf_counter()
        path = checkpoint.save_training(
            self.backend, self.cfg, self.out, self.state.step, self.plan, tokenizer=self.tokenizer, **kw
        )
        self.stops.deadline.saw("save", time.perf_counter() - start)
        return path

    def _preempt(self, pending: dict | None = None, at_start: bool = False) -> int:
        """Checkpoint this step (unless written already) on every rank, then PREEMPT_EXIT. `pending`:
        the metrics row of a step whose evaluation was cut short: the resumed run redoes it."""
        step, where = self.state.step, " during evaluation" if pending is not None or at_start else ""
        if at_start:  # nothing trained yet: nothing to save; a resume starts at step 0
            checkpoint.mark_preempted(self.backend, self.out, step, saved=False)
        elif self._saved_step == step and pending is None:  # this step's checkpoint is in place
            checkpoint.mark_preempted(self.backend, self.out, step)
        else:
            self._save(preempted=True, extra={"pending_row": pending} if pending is not None else None)
        if self.env.is_main:  # "preempted: checkpoint at step N written" is what job scripts grep for
            log.warning(
                "preempted: %s (%s%s); exit %d to requeue",
                "nothing to save before the first step" if at_start else f"checkpoint at step {step} written",
                self.stops.reason,
                where,
                PREEMPT_EXIT,
            )
        return PREEMPT_EXIT

    def _generation_eval(self, metrics) -> None:
        """Exact match of the saved adapter on held-out prompts (rank 0, one process, the base
        loaded whole: for models that fit one device); `eval_generations.jsonl` per record."""
        from dtrain.inference import evaluate, generate

        cfg = self.cfg
        records = evaluate.read_jsonl(Path(cfg.data.eval_path), cfg.training.eval_generate)
        model, tok = generate.load(cfg.model.path, [str(self.out / "adapter")], device=str(self.backend.device))
        result = evaluate.exact_match(
            generate.Generator(model, tok),
            records,
            generate.Sampling(max_new_tokens=64),
            f"data.eval_path = '{cfg.data.eval_path}'",
            stop=self.stops.local,
        )
        files.write_text_atomic(
            self.out / "eval_generations.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records),
        )
        self._write_metrics({"step": self.state.step, "eval_exact_match": result.accuracy}, metrics)
        log.info("exact match on %d held-out prompts: %d (%.1f%%)", result.total, result.correct, 100 * result.accuracy)

    def _close_loggers(self) -> None:
        if self.loggers is not None:
            self.loggers.close()
            self.loggers = None

    def step_batches(self, step: int) -> tuple[list[dict], int]:
        """This rank's micro-batches of optimizer step `step` (the seeded plan's picks: training and
        the memory profiler take the same ones) and their real tokens."""
        picks = [self.plan.indices(step, m, self.env.rank) for m in range(self.cfg.training.grad_accum)]
        return [self.train_data.take(idx) for idx in picks], sum(self.train_data.real_tokens(idx) for idx in picks)

    def _train_step(self) -> dict:
        start = time.perf_counter()
        batches, real = self.step_batches(self.state.step)
        poison = faults.nan_loss(self.state.step + 1, self.env.rank, self.env.world_size)
        result = step_lib.train_step(self.backend, batches, real, objective=self.objective, poison=poison)
        time.sleep(faults.step_delay())  # 0 unless a test plants slow_step (dtrain/faults.py)
        elapsed = time.perf_counter() - start
        positions = result["positions"]  # what was computed: rows cut to the micro-batch's longest
        row = {
            "step": self.state.step + 1,
            "loss": result["loss"],
            "lr": result["lr"],
            "grad_norm": result["grad_norm"],
            "tokens_per_s": result["real_tokens"] / elapsed,
            "padding_fraction": 1 - result["real_tokens"] / max(positions, 1),
            "step_time_s": elapsed,
            **{k: result[k] for k in self.objective.metric_names},
            "nonfinite": result["nonfinite"],
        }
        if self._mfu is not None:
            row["mfu"] = flops.mfu(self._mfu[0], positions, elapsed, self.env.world_size, self._mfu[1])
        return row

    def _evaluates(self) -> bool:
        return bool(self.cfg.training.eval_every) and len(self.eval_data) > 0

    def _write_metrics(self, row: dict, metrics) -> None:
        if metrics:
            metrics.log(row, row["step"])
        if "eval_loss" in row and self.env.is_main:
            log.info("step %d: eval loss %.4f", row["step"], row["eval_loss"])

    def _after_step(self, row: dict, metrics) -> None:
        step, t = self.state.step, self.cfg.training
        if self._evaluates() and (step % t.eval_every == 0 or step == self.total_steps):
            row.update(self.evaluate_all())  # every eval_every steps, and after the last
        if t.memory_every and step % t.memory_every == 0:
            from dtrain.memory import measure

            row["memory"] = measure.snapshot(self.backend)
        if step % t.log_every == 0 or "eval_loss" in row or "nonfinite" in row:
            self._write_metrics(row, metrics)
        if t.save_every and step % t.save_every == 0 and step < self.total_steps and self._saved_step != step:
            if self._save() is not None:
                self._saved_step = step

    def evaluate(self) -> float:
        """Mean loss on the held-out split (per token, or per pair for dpo; same for every rank count)."""
        return self.evaluate_all()["eval_loss"]

    @torch.no_grad()
    def evaluate_all(self) -> dict[str, float]:
        """eval_loss and the objective's metrics (eval_rewards/chosen, ...) on the held-out split."""
        n, mb, world = len(self.eval_data), self.cfg.training.micro_batch_size, self.env.world_size
        names = self.objective.metric_names
        sums = torch.zeros(2 + len(names), dtype=torch.float64)  # loss, units, metrics
        start_t = time.perf_counter()
        with self.backend.evaluating():
            rounds = min(self.cfg.training.eval_batches, -(-n // (mb * world)))
            if self.env.is_main:
                log.info("step %d: evaluating, %d batch(es) per rank", self.state.step, rounds)
            for i in range(rounds):  # every rank runs the same number of forwards (sharded collectives)
                if self.stops.check():  # a safe point: preempt.Preempted on every rank
                    raise preempt.Preempted()
                start = (i * world + self.env.rank) * mb
                idx = torch.arange(start, min(start + mb, n)) if start < n else torch.tensor([0])
                batch = self.eval_data.take(idx)
                total, extra = self.objective.loss(self.backend, batch)
                if start < n:
                    units = torch.tensor([float(self.objective.count(batch))], dtype=torch.float64)
                    sums += torch.cat([total.detach().double().cpu().reshape(1), units, extra])
        self.stops.deadline.saw("eval", time.perf_counter() - start_t)
        sums = self.backend.all_reduce_sum(sums)
        means = (sums / max(float(sums[1]), 1.0)).tolist()
        return {"eval_loss": means[0], **{f"eval_{k}": v for k, v in zip(names, means[2:])}}

    def cleanup(self) -> None:
        self._close_loggers()  # a run that failed before train() still ends its logger runs
        self.backend.close()


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def run(cfg: Config) -> int:
    """setup -> train -> cleanup; the exit code of the run."""
    preempt.install()  # idempotent; `dtrain train` installed it already before the heavy imports
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
