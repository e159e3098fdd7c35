"""The one training loop shared by every method; it knows no method (their specs tell it what differs).

Reads top to bottom: set-up (devices, data, method, optimizer, resume), then per step
(:class:`~fovea.train.step.Stepper`): schedules -> method.training_step -> backward ->
method.after_backward -> clip -> optimizer step -> method.after_step (EMA, snapshots) -> logging,
checkpoints and periodic k-NN.
"""
from __future__ import annotations

import copy
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fovea.config.loader import dump_yaml, to_dict
from fovea.config.schema import RunConfig
from fovea.core.checkpoint import load_checkpoint, rng_state, set_rng_state
from fovea.core.distributed import (agreed_max, all_reduce_mean, any_rank, barrier, cleanup, init_distributed,
                                    main_decides)
from fovea.core.logging import MetricLogger
from fovea.data.loader import make_train_loader, set_epoch, stop_signals_blocked
from fovea.eval.knn import evaluate_knn_sharded
from fovea.hub.backbone import export_backbone
from fovea.methods.registry import spec_for
from fovea.errors import ConfigError
from fovea.train.init_from import load_init, resolve_init_model
from fovea.train.budget import budget_steps, resumed_length
from fovea.train.plan import make_plan, resolve_auto, step_batch
from fovea.train.ckptio import load_full, load_sharded, read_meta, resolve_format, save_full, save_sharded
from fovea.train.runfolder import RunLock, load_resume_checkpoint, open_run_sources, step_checkpoints, trajectory_diff
from fovea.train.sharding import full_copy, resolve_strategy
from fovea.train.signals import RunInterrupted, StopRequest
from fovea.train.step import NonFiniteLoss, Stepper, build_stepper

__all__ = ["NonFiniteLoss", "ResumeMismatch", "Trainer", "fit_budget", "train"]


def run_folder(cfg: RunConfig) -> Path:
    """The run's folder: ``output_dir``, else ``runs/<name or method>``."""
    return Path(cfg.output_dir or f"runs/{cfg.name or cfg.method}")


class ResumeMismatch(ValueError):
    """The checkpoint was trained with a config whose trajectory keys differ from the new one."""


class Trainer:
    """Holds the state of one run; :meth:`fit` trains to the end and returns the results dict."""

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.info, self.device = init_distributed(cfg.train.device)
        self.sources = open_run_sources(cfg)  # every source probed before any work (errors name the key)
        self.source = self.sources["data.train"]
        cfg, self.init_changes = resolve_init_model(cfg)  # train.init_from: its architecture
        self.cfg = cfg = resolve_auto(cfg, len(self.source), self.info.world)
        self.out = run_folder(cfg)
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = RunLock(self.out)
        self.stop = StopRequest().install()  # from here SIGTERM / SIGINT only ask the run to stop
        self.saved_step = -1  # step of the newest checkpoint written or resumed from
        self.t_start, self.eval_seconds, self.imgs_seen = 0.0, 0.0, 0  # this session's training clock
        self.next_mark, self.mark_due, self.out_of_time = 0, False, False  # eval.at_minutes, train.max_minutes
        self.marks = sorted(cfg.eval.at_minutes)
        try:
            resume_path = main_decides(self.info, self._claim_folder)
            self._build(resume_path)
        except BaseException:
            self.stop.restore()
            self.lock.release()
            raise

    def _claim_folder(self) -> str | None:
        """Main rank: lock the run folder, pick the checkpoint to resume from and check its config against
        the new one, and only then write config.yaml. Returns the checkpoint path (None: fresh start)."""
        self.lock.acquire()
        ckpt, path = load_resume_checkpoint(self.ckpt_dir) if self.cfg.train.resume else (None, None)
        if ckpt is not None:
            diff = trajectory_diff(ckpt.get("config", {}), to_dict(self.cfg), ckpt.get("world"), self.info.world)
            if diff and not self.cfg.train.resume_force:
                raise ResumeMismatch(
                    f"{path} was trained with a different config; these keys change the trajectory: "
                    + "; ".join(diff) + ". Use the original values, train.resume_force=true to continue anyway, "
                    "train.resume=false to start over, or another output_dir")
            if diff:
                print("[fovea] warning: resuming with a different config (train.resume_force=true): "
                      + "; ".join(diff), flush=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_yaml(self.cfg))
        self._loaded = ckpt  # read once: _resume uses it on this rank
        return None if path is None else str(path)

    def _build(self, resume_path: str | None) -> None:
        cfg = self.cfg
        self.spec = spec_for(cfg.method)
        self.phase = ""
        self.dataset, self.collate = self.spec.train_data(cfg, self.source, self.phase)
        self.plan = make_plan(cfg, len(self.source), self.info.world)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        method = self.spec.build(cfg).to(self.device)
        self.results: dict = {"knn": {}}
        if cfg.train.init_from and resume_path is None:
            self.results["init_from"] = report = load_init(method, cfg.train.init_from)
            if self.info.is_main:
                for line in self.init_changes:
                    print(f"[fovea] init_from architecture: {line}", flush=True)
                print(f"[fovea] init_from {cfg.train.init_from}: " + ", ".join(f"{k} {v}" for k, v in report.items())
                      + (f"; fresh heads trained alone for {cfg.optim.head_warmup_steps} steps"
                         if self._head_warmup(report) else ""), flush=True)
        if self.info.world > 1 and self.device.type == "cuda":
            # head BatchNorm (dino.use_bn) normalises over the global batch, as one process would
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.strategy = resolve_strategy(cfg.train.strategy, self.info.world)
        if self.strategy == "fsdp" and cfg.train.precision == "fp16":
            raise ValueError("train.precision=fp16 is not supported with train.strategy=fsdp (its gradient scaler "
                             "would need the overflow check of every shard); use train.precision=bf16, or ddp")
        self.ckpt_format = resolve_format(cfg.train.checkpoint_format, self.strategy == "fsdp")
        self.stepper: Stepper = build_stepper(cfg, self.plan, self.device, self.info, method)
        self.method, self.optimizer = self.stepper.method, self.stepper.optimizer
        if self.strategy == "ddp":
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.method.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.method.set_student_wrapper(ddp)
        self.step = 0
        self.skipped = 0
        self._loader: DataLoader | None = None
        self.logger = MetricLogger(self.out, enabled=self.info.is_main)
        torch.manual_seed(cfg.train.seed + 1 + self.info.rank)  # per-rank stream for drop-path etc.
        if resume_path is not None:
            self._resume(Path(resume_path))
        self.stepper.head_warmup = self._head_warmup() if cfg.train.init_from else 0

    # ----------------------------------------------------------------- checkpoints
    def _resume(self, path: Path) -> None:
        sharded = path.is_dir()  # a torch.distributed.checkpoint folder; full checkpoints are files
        ckpt = self.__dict__.pop("_loaded", None) or (read_meta(path) if sharded else load_checkpoint(path))
        if sharded:
            load_sharded(self.method, self.optimizer, path)  # every rank reads its shards, resharded
        else:
            load_full(self.method, self.optimizer, ckpt)
        if self.stepper.scaler is not None and ckpt.get("scaler"):
            self.stepper.scaler.load_state_dict(ckpt["scaler"])
        self.step = self.saved_step = int(ckpt["step"])
        self.skipped = int(ckpt.get("skipped", 0))
        self.results = ckpt.get("results", self.results)
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.logger.truncate_after(self.step)
        if self.info.is_main:
            print(f"[fovea] resumed from {path} at step {self.step}/{self.plan.total_steps}", flush=True)
            old_world, old = int(ckpt.get("world") or 1), ckpt.get("config", {})
            if old_world != self.info.world:
                ob, oa = old.get("data", {}).get("batch_size"), old.get("train", {}).get("accumulate", 1)
                print(f"[fovea] the checkpoint was written by {old_world} rank(s) x batch {ob} x {oa} accumulated; "
                      f"now {self.info.world} x {self.cfg.data.batch_size} x {self.cfg.train.accumulate}: the same "
                      "global batch (Sinkhorn-Knopp, KoLeo and head BatchNorm see each rank's micro-batches)",
                      flush=True)

    @property
    def last_path(self) -> Path:
        """Where the newest checkpoint of this run goes: ``last.pt``, or the sharded folder ``last.dcp``."""
        return self.ckpt_dir / ("last.dcp" if self.ckpt_format == "sharded" else "last.pt")

    def save(self, final: bool = False) -> None:
        """Atomically write ``last.pt`` (or the sharded ``last.dcp``) and a step copy, with everything needed
        to resume exactly (every rank calls it)."""
        rng = [rng_state()]
        self.saved_step = self.step
        if self.info.world > 1:
            gathered: list = [None] * self.info.world
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        run_state = {"step": self.step, "rng": rng, "skipped": self.skipped, "results": self.results,
                     "config": to_dict(self.cfg), "world": self.info.world,
                     "scaler": self.stepper.scaler.state_dict() if self.stepper.scaler is not None else None}
        keep = self.cfg.train.keep_checkpoints > 0 and not final
        suffix = ".dcp" if self.ckpt_format == "sharded" else ".pt"
        copy = self.ckpt_dir / f"step_{self.step:08d}{suffix}" if keep else None
        if self.ckpt_format == "sharded":
            save_sharded(self.method, self.optimizer, run_state, self.ckpt_dir / "last.dcp", self.info, copy)
        else:
            save_full(self.method, self.optimizer, run_state, self.ckpt_dir / "last.pt", self.info, copy)
        if self.info.is_main:
            stale = self.ckpt_dir / ("last.pt" if self.ckpt_format == "sharded" else "last.dcp")
            if stale.exists():  # a run that changed format: resume must not pick the older one
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            if keep:
                for o in step_checkpoints(self.ckpt_dir)[self.cfg.train.keep_checkpoints:]:
                    shutil.rmtree(o, ignore_errors=True) if o.is_dir() else o.unlink(missing_ok=True)

    # ----------------------------------------------------------------- evaluation
    def knn(self, tag: str) -> dict | None:
        """k-NN of the evaluation backbone on the configured labelled splits: every rank extracts its share of
        the features, rank 0 votes, logs and returns the results (None on the other ranks)."""
        c = self.cfg
        if c.data.eval_train is None or c.data.eval_test is None:
            return None
        t0 = time.time()
        kinds = list(dict.fromkeys([c.eval.knn.features, *c.eval.knn.report]))
        res = evaluate_knn_sharded(full_copy(self.method.eval_backbone(), self.device), self.sources["data.eval_train"],
                                   self.sources["data.eval_test"], c.eval.knn.ks, c.eval.knn.temperature, kinds,
                                   c.data.eval_size or c.crops.global_size, self.device, c.eval.batch_size,
                                   min(c.data.num_workers, 2), c.crops.mean, c.crops.std,
                                   c.train.progress and self.info.is_main, c.eval.knn.widths)
        if res is not None and self.info.is_main:
            res["seconds"] = round(time.time() - t0, 1)
            res["step"] = self.step
            self.results["knn"][tag] = res
            flat = {f"knn/{kind}/{k}": v for kind, accs in res["features"].items() for k, v in accs.items()}
            self.logger.log(self.step, flat)
            for i, (kind, accs) in enumerate(self._knn_shown(res)):
                print(f"[fovea] k-NN ({tag}, step {self.step}, {kind}): "
                      + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items())
                      + (f"  [{res['seconds']}s]" if i == 0 else ""), flush=True)
        barrier(self.info)
        return res

    # ----------------------------------------------------------------- training
    def _step_context(self) -> str:
        """What :class:`NonFiniteLoss` says of the checkpoints."""
        if self.saved_step >= 0:
            return f" and the last good checkpoint {self.last_path} (step {self.saved_step}) is untouched"
        return " and no checkpoint was written yet"

    def _head_warmup(self, report: dict | None = None) -> int:
        """Steps of the head warm-up: ``optim.head_warmup_steps`` when ``train.init_from`` left a head fresh."""
        report = report if report is not None else self.results.get("init_from")
        if not report or not any(v != "loaded" for k, v in report.items() if k.endswith("_head")):
            return 0
        return self.cfg.optim.head_warmup_steps

    def fit(self) -> dict:
        """Train to ``plan.total_steps`` (resuming if a checkpoint exists); returns the results.

        SIGTERM / SIGINT stop after the current step with ``last.pt`` written (:class:`RunInterrupted`);
        the lock on the run folder is released however the run ends."""
        try:
            return self._fit()
        finally:
            self.stop.restore()
            self.logger.close()
            self.lock.release()

    def _stop_requested(self) -> int:
        """The signal that asked this run to stop (0: none), agreed over ranks. Also agrees on the main rank's
        clock: whether a k-NN mark of ``eval.at_minutes`` (``self.mark_due``) or ``train.max_minutes``
        (``self.out_of_time``) has passed."""
        minutes = self._train_minutes() if self.info.is_main else 0.0
        marks = self.marks
        due = int(self.next_mark < len(marks) and minutes >= marks[self.next_mark])
        late = int(self.cfg.train.max_minutes > 0 and minutes >= self.cfg.train.max_minutes)
        flags = [self.stop.signum, due, late]
        if self.info.world > 1:
            t = torch.tensor(flags, dtype=torch.int64, device=self.info.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = [int(v) for v in t.tolist()]
        self.mark_due, self.out_of_time = bool(flags[1]), bool(flags[2])
        return flags[0]

    def _train_minutes(self) -> float:
        """Minutes of training in this session, evaluations excluded."""
        return (time.time() - self.t_start - self.eval_seconds) / 60 if self.t_start else 0.0

    def _timed_knn(self, tag: str) -> None:
        """A k-NN during training whose time does not count as training time."""
        t0 = time.time()
        res = self.knn(tag)
        self.eval_seconds += time.time() - t0
        if res is not None and self.info.is_main:
            res["train_minutes"] = round(self._train_minutes(), 3)
            res["images_per_s"] = round(self.imgs_seen / max(self._train_minutes() * 60, 1e-9), 2)
        self.method.train()

    def _fit(self) -> dict:
        """Train to ``plan.total_steps`` (resuming if a checkpoint exists); returns the results."""
        c, plan = self.cfg, self.plan
        if self.info.is_main:
            print(f"[fovea] run folder: {self.out.resolve()}\n[fovea] data: {self.source.name} "
                  f"({len(self.source)} images), {plan.steps_per_epoch} steps/epoch x "
                  f"{plan.total_steps / plan.steps_per_epoch:.2f} epochs = {plan.total_steps} steps, global batch "
                  f"{step_batch(c) * self.info.world}"
                  + (f" ({c.data.batch_size} x {self.info.world} ranks x {c.train.accumulate} accumulated)"
                     if c.train.accumulate > 1 else "")
                  + f", device {self.device}, ranks {self.info.world}"
                  + (f" ({self.strategy.upper()})" if self.strategy != "none" else ""), flush=True)
            if c.train.strategy == "fsdp" and self.strategy == "none":
                print("[fovea] train.strategy=fsdp on one process: nothing to shard, the model stays whole "
                      "(launch with torchrun to shard it)", flush=True)
        if main_decides(self.info, lambda: self.step == 0 and c.eval.at_start and "start" not in self.results["knn"]
                        and not self.stop.signum):  # decided once for all ranks: each takes part in the k-NN
            self.knn("start")
        self.method.train()
        bar = tqdm(total=plan.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (c.train.progress and self.info.is_main))
        t_start, n_imgs, t_last = time.time(), 0, time.time()
        self.t_start, self.eval_seconds, self.imgs_seen = t_start, 0.0, 0
        while self.step < plan.total_steps:
            epoch, pos = divmod(self.step, plan.steps_per_epoch)
            phase = self.spec.phase(c, plan, self.step)  # e.g. the high-res phase's crops; schedules run on
            if phase != self.phase:
                self.phase = phase
                self.dataset, self.collate = self.spec.train_data(c, self.source, phase)
                self._loader = None  # new crops: new workers
            if self._loader is None:
                self._loader = make_train_loader(self.dataset, step_batch(c), self.info.rank, self.info.world,
                                                 c.train.seed, epoch, pos, c.data.num_workers,
                                                 pin_memory=self.device.type == "cuda", collate_fn=self.collate)
            loader = set_epoch(self._loader, epoch, pos)  # the workers persist from epoch to epoch
            stopped = self._stop_requested()
            with stop_signals_blocked():  # workers start with SIGTERM / SIGINT held, then ignore them
                batches: Iterator[dict] = iter([] if stopped else loader)
            for batch in batches:
                self.skipped += int(batch["skipped"])
                sv = self.stepper.values(self.step)
                logs = self.stepper.step(batch, sv, self._step_context)
                self.step += 1
                n_imgs += step_batch(c) * self.info.world
                self.imgs_seen += step_batch(c) * self.info.world
                bar.update(1)
                if self.step % c.train.log_every_steps == 0 or self.step == plan.total_steps:
                    logs = all_reduce_mean(logs, self.info)
                    now = time.time()
                    logs["images_per_s"] = n_imgs / max(now - t_last, 1e-9)
                    logs["epoch"] = self.step / plan.steps_per_epoch
                    logs["skipped_images"] = self.skipped
                    n_imgs, t_last = 0, now
                    self.logger.log(self.step, logs)
                    main_loss = next((v for k, v in logs.items() if k.startswith("loss/")), float("nan"))
                    bar.set_postfix(loss=f"{main_loss:.4f}", lr=f"{sv.lr:.2e}",
                                    ips=f"{logs['images_per_s']:.0f}")
                if self.step % plan.checkpoint_every == 0 and self.step < plan.total_steps:
                    self.save()
                if plan.eval_every and self.step % plan.eval_every == 0 and self.step < plan.total_steps:
                    self._timed_knn(f"step{self.step}")
                stopped = self._stop_requested()
                # eval.at_minutes (agreed over ranks); a mark at train.max_minutes is the end evaluation's
                while self.mark_due and not self.out_of_time and self.step < plan.total_steps:
                    mark = self.marks[self.next_mark]
                    self.next_mark += 1
                    self._timed_knn(f"min{mark:g}")
                    stopped = self._stop_requested()
                if self.out_of_time:
                    break  # train.max_minutes: the end of this session's training
                if stopped or self.step >= plan.total_steps or self.spec.phase(c, plan, self.step) != phase:
                    break  # stop request, end, or a new data phase (a new loader, e.g. new crop sizes)
            if stopped:
                bar.close()
                self._loader = None
                if self.saved_step != self.step:
                    self.save()
                raise RunInterrupted(stopped, self.step, str(self.last_path))
            if self.out_of_time:
                if self.info.is_main:
                    print(f"[fovea] train.max_minutes={c.train.max_minutes:g} reached at step {self.step}/"
                          f"{plan.total_steps}: ending here (the same command resumes)", flush=True)
                self.results["stopped"] = {"reason": "train.max_minutes", "step": self.step}
                break
        bar.close()
        self._loader = None  # the data workers exit before the final evaluation
        train_minutes = (time.time() - t_start) / 60
        self.results.update({"steps": self.step, "skipped_images": self.skipped,
                             "train_minutes_this_session": round(train_minutes, 2),
                             "train_minutes_without_eval": round(self._train_minutes(), 3)})
        # the trained model is on disk before any final evaluation, which then cannot lose it
        self.save(final=self.step >= plan.total_steps)
        bb = full_copy(self.method.eval_backbone(), self.device)  # gathered on every rank under FSDP
        if self.info.is_main:
            export_backbone(bb, self.out,
                            extra={"crops": {"mean": c.crops.mean, "std": c.crops.std,
                                             "global_size": c.crops.global_size}, "source_run": str(self.out),
                                   "eval_features": "cls" if bb.cls_token is not None else "mean_patch"})
        self.stop.restore()  # from here on a signal stops at once: nothing of the training is left unsaved
        if c.eval.at_end:
            self.knn("end")
        if self.info.is_main:
            (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
            self._summary(train_minutes)
        self.logger.close()
        if c.eval.final and self.info.is_main:
            from fovea.eval.report import run_final_eval
            run_final_eval(self.out, c.eval.final, self.step, min(c.data.num_workers, 2), c.eval.batch_size,
                           c.train.progress)
            print(f"[fovea] evaluation report: {self.out / 'eval' / 'report.md'}", flush=True)
        cleanup()
        return self.results

    def probe_rate(self, warm: int, timed: int) -> float:
        """Images per second of this run's training steps, the loader included: ``timed`` steps after ``warm``
        untimed ones, on the first batches of the run's data order (agreed over ranks: the slowest). The weights
        move, so the caller discards this trainer (:func:`fit_budget`)."""
        c = self.cfg
        self.method.train()
        loader = make_train_loader(self.dataset, step_batch(c), self.info.rank, self.info.world, c.train.seed, 0, 0,
                                   c.data.num_workers, pin_memory=self.device.type == "cuda", collate_fn=self.collate)
        done, epoch, t0, stopped = 0, 0, time.time(), False
        while done < warm + timed:
            with stop_signals_blocked():
                batches: Iterator[dict] = iter(set_epoch(loader, epoch, 0))
            for batch in batches:
                if done == warm:
                    barrier(self.info)
                    t0 = time.time()
                self.stepper.step(batch, self.stepper.values(done), self._step_context)
                done += 1
                stopped = any_rank(bool(self.stop.signum), self.info)
                if done == warm + timed or stopped:
                    break
            if stopped:
                return 0.0  # a stop request on some rank: the caller stops too
            epoch += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = agreed_max(time.time() - t0, self.info)
        return timed * step_batch(c) * self.info.world / max(elapsed, 1e-9)

    def _knn_kind(self, res: dict) -> str:
        """The configured k-NN feature kind, or mean_patch where the backbone has no CLS token."""
        kind = self.cfg.eval.knn.features
        return kind if kind in res["features"] else "mean_patch"

    def _knn_shown(self, res: dict) -> list[tuple[str, dict]]:
        """(kind, accuracies) printed for a k-NN result: the main kind, then its truncations ``KIND@w``."""
        kind = self._knn_kind(res)
        return [(k, v) for k, v in res["features"].items() if k == kind or k.startswith(kind + "@")]

    def _summary(self, minutes: float) -> None:
        knn = self.results["knn"]
        evals = self.eval_seconds / 60  # the k-NN runs of eval.at_minutes / eval.every_epochs during training
        lines = [f"[fovea] done: {self.step} steps, {minutes - evals:.1f} min of training in this session"
                 + (f" (+ {evals:.1f} min of k-NN during it)" if evals >= 0.05 else "")]
        if self.skipped:
            lines.append(f"[fovea] skipped {self.skipped} unreadable images (replaced by the next readable one)")
        for tag in ("start", "end"):
            for kind, accs in (self._knn_shown(knn[tag]) if tag in knn else []):
                lines.append(f"[fovea] k-NN {tag:5s} ({kind}): "
                             + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
        lines += [f"[fovea] resolved config: {self.out / 'config.yaml'}",
                  f"[fovea] checkpoint:      {self.last_path}",
                  f"[fovea] backbone:        {self.out / 'backbone.safetensors'}",
                  f"[fovea] metrics:         {self.out / 'metrics.jsonl'} (TensorBoard: {self.out / 'tensorboard'})",
                  f"[fovea] results:         {self.out / 'results.json'}"]
        print("\n".join(lines), flush=True)


#: untimed steps of the ``train.budget_minutes`` probe before its timed ones (allocation, the loader's start)
BUDGET_WARM_STEPS = 5


def fit_budget(cfg: RunConfig) -> RunConfig:
    """``train.budget_minutes``: the run's length in steps for this machine (a new config with ``optim.max_steps``
    set). A resumed run keeps the length its first session chose (from its ``config.yaml``); otherwise a probe
    trainer, built as the run's own in a folder that is removed afterwards, times ``train.budget_probe_steps``
    steps and the budget left after the probe is filled at that rate. The run itself then starts from its seed:
    it is the run ``optim.max_steps=N`` would give."""
    t = cfg.train
    if cfg.optim.max_steps:
        raise ConfigError(f"train.budget_minutes={t.budget_minutes:g} and optim.max_steps={cfg.optim.max_steps} both "
                          "set the run's length: set one of them")
    if t.budget_probe_steps < 1:
        raise ConfigError(f"train.budget_probe_steps must be >= 1, got {t.budget_probe_steps}")
    out = run_folder(cfg)
    cfg = copy.deepcopy(cfg)
    info, _ = init_distributed(t.device)  # the run's process group (the trainers find it made)
    kept = main_decides(info, lambda: resumed_length(out)) if t.resume else None
    if kept is not None:
        cfg.optim.max_steps = kept
        if info.is_main:
            print(f"[fovea] train.budget_minutes={t.budget_minutes:g}: resuming, the run keeps its "
                  f"optim.max_steps={kept} from {out / 'config.yaml'}", flush=True)
        return cfg
    t0 = time.time()
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.output_dir = str(out / "budget_probe")
    probe_cfg.optim.max_steps = BUDGET_WARM_STEPS + t.budget_probe_steps
    probe_cfg.train.resume, probe_cfg.train.progress, probe_cfg.train.budget_minutes = False, False, 0.0
    probe = Trainer(probe_cfg)
    try:
        rate = probe.probe_rate(BUDGET_WARM_STEPS, t.budget_probe_steps)
        spe, world = probe.plan.steps_per_epoch, probe.info.world
        signum = probe.stop.signum
    finally:
        probe.stop.restore()
        probe.logger.close()
        probe.lock.release()
    del probe
    if info.is_main:
        shutil.rmtree(out / "budget_probe", ignore_errors=True)
    if signum or not rate:  # a stop request during the probe (on this rank or another)
        if info.is_main:
            print("[fovea] stopped during the train.budget_minutes speed probe: nothing was trained", flush=True)
        signal.raise_signal(signum or signal.SIGTERM)  # the default action: the process ends as that signal says
    probe_s = agreed_max(time.time() - t0, info)
    steps = budget_steps(t.budget_minutes, probe_s, rate, step_batch(cfg) * world)
    cfg.optim.max_steps = steps
    if info.is_main:
        print(f"[fovea] train.budget_minutes={t.budget_minutes:g}: {rate:.1f} img/s over {t.budget_probe_steps} "
              f"timed steps (the probe took {probe_s:.0f} s of the budget) -> optim.max_steps={steps} "
              f"({steps / spe:.2f} epochs of {spe} steps)", flush=True)
    return cfg


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training for ``cfg``; returns the results dict."""
    if cfg.train.budget_minutes > 0:
        cfg = fit_budget(cfg)
    return Trainer(cfg).fit()

