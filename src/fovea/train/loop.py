"""The one training loop shared by every method.

Reads top to bottom: set-up (devices, data, method, optimizer, resume), then per step:
schedules -> method.training_step -> backward -> freeze-last-layer / clip -> optimizer step ->
teacher update -> logging, checkpoints and periodic k-NN.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fovea.config.loader import dump_yaml, to_dict
from fovea.config.schema import RunConfig
from fovea.data.loader import EpochBatchSampler, make_train_loader, stop_signals_blocked
from fovea.eval.knn import evaluate_knn
from fovea.hub.backbone import export_backbone
from fovea.methods.base import Method, StepValues
from fovea.methods.registry import build_method, build_train_data
from fovea.methods.registry import multicrop_dataset as make_dataset  # noqa: F401 - used by tests and benchmarks
from fovea.train.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from fovea.train.distributed import all_reduce_mean, any_rank, barrier, cleanup, init_distributed, main_decides
from fovea.train.init_from import backbone_scale, load_init, resolve_init_model
from fovea.train.logging import MetricLogger
from fovea.train.optim import apply_hparams, build_optimizer, clip_gradients, scaled_lr
from fovea.train.runfolder import RunLock, load_resume_checkpoint, open_run_sources, trajectory_diff
from fovea.train.schedules import cosine_schedule, linear_warmup_constant
from fovea.train.signals import RunInterrupted, StopRequest


class ResumeMismatch(ValueError):
    """The checkpoint was trained with a config whose trajectory keys differ from the new one."""


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; nothing of that step was applied or saved."""


@dataclass
class Plan:
    """Step counts derived from the config and the data set size."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    checkpoint_every: int
    eval_every: int
    peak_lr: float


def make_plan(cfg: RunConfig, n_images: int, world: int) -> Plan:
    """Turn epoch-based durations into step counts for this data set and world size."""
    spe = EpochBatchSampler.steps_per_epoch(n_images, cfg.data.batch_size, world)
    if spe == 0:
        raise ValueError(f"data set has {n_images} images, fewer than one global batch "
                         f"({cfg.data.batch_size} x {world} ranks); lower data.batch_size")
    o = cfg.optim
    unit = o.epoch_length or spe  # steps per schedule "epoch" (DINOv2 counts 1250-step epochs)
    total = o.max_steps or max(1, round(o.epochs * unit))
    ep = lambda e: int(round(e * unit))  # noqa: E731
    return Plan(spe, total, min(ep(o.warmup_epochs), total), ep(cfg.dino.warmup_teacher_temp_epochs),
                ep(o.freeze_last_layer_epochs), cfg.train.checkpoint_every_steps or spe,
                cfg.eval.every_steps or ep(cfg.eval.every_epochs), scaled_lr(o, cfg.data.batch_size * world))


def auto_prototypes(n_images: int) -> int:
    """K for ``dino.out_dim=0``: a power of two near N/16, within [1024, 65536].

    Small sets get small K (the ln K plateau of DINO on small data, METHODS.md section 1):
    60k images -> 4096, 1.28M (ImageNet) -> 65536.
    """
    k = 2 ** round(math.log2(max(n_images, 1) / 16))
    return int(min(65536, max(1024, k)))


def auto_momentum(total_steps: int) -> float:
    """Initial teacher momentum for ``optim.momentum_teacher=0``: the teacher's horizon
    1/(1-m) is about a tenth of the run, clamped to [0.95, 0.996] (0.996 = DINO's long runs)."""
    return float(min(0.996, max(0.95, 1.0 - 10.0 / max(total_steps, 1))))


def resolve_auto(cfg: RunConfig, n_images: int, world: int) -> RunConfig:
    """Replace 'auto' (0) values by concrete ones, so the written config.yaml is explicit."""
    cfg = copy.deepcopy(cfg)
    if cfg.dino.out_dim == 0:
        cfg.dino.out_dim = auto_prototypes(n_images)
    if cfg.optim.momentum_teacher == 0:
        spe = max(EpochBatchSampler.steps_per_epoch(n_images, cfg.data.batch_size, world), 1)
        cfg.optim.momentum_teacher = auto_momentum(cfg.optim.max_steps or round(cfg.optim.epochs * spe))
    return cfg


def in_highres(cfg: RunConfig, plan: Plan, step: int) -> bool:
    """True when ``step`` is in the last ``highres.steps`` steps (the high-resolution phase)."""
    return cfg.highres.steps > 0 and step >= plan.total_steps - cfg.highres.steps


def step_values(cfg: RunConfig, plan: Plan, step: int) -> StepValues:
    """All scheduled hyper-parameters at ``step`` (per-iteration schedules, METHODS.md section 0)."""
    o, d = cfg.optim, cfg.dino
    start_lr = o.start_lr * plan.peak_lr / o.lr if o.lr else 0.0  # scaled like the peak lr
    if o.momentum_schedule == "linear":  # I-JEPA
        momentum = o.momentum_teacher + (o.momentum_teacher_end - o.momentum_teacher) * min(
            step / max(plan.total_steps - 1, 1), 1.0)
    else:
        momentum = cosine_schedule(step, plan.total_steps, o.momentum_teacher, o.momentum_teacher_end)
    return StepValues(
        step=step, epoch=step / plan.steps_per_epoch,
        lr=cosine_schedule(step, plan.total_steps, plan.peak_lr, o.min_lr, plan.warmup_steps, start_lr),
        weight_decay=cosine_schedule(step, plan.total_steps, o.weight_decay, o.weight_decay_end),
        momentum=momentum,
        teacher_temp=linear_warmup_constant(step, plan.teacher_temp_warmup_steps, d.warmup_teacher_temp, d.teacher_temp),
        freeze_last_layer=step < plan.freeze_last_layer_steps)


class Trainer:
    """Holds the state of one run; :meth:`fit` trains to the end and returns the results dict."""

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.info, self.device = init_distributed(cfg.train.device)
        self.sources = open_run_sources(cfg)  # every source probed before any work (errors name the key)
        self.source = self.sources["data.train"]
        cfg, self.init_changes = resolve_init_model(cfg)  # train.init_from: its architecture
        self.cfg = cfg = resolve_auto(cfg, len(self.source), self.info.world)
        self.out = Path(cfg.output_dir or f"runs/{cfg.name or cfg.method}")
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = RunLock(self.out)
        self.stop = StopRequest().install()  # from here SIGTERM / SIGINT only ask the run to stop
        self.saved_step = -1  # step of the newest checkpoint written or resumed from
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
        self.dataset, self.collate = build_train_data(cfg, self.source)
        self.plan = make_plan(cfg, len(self.source), self.info.world)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.method: Method = build_method(cfg).to(self.device)
        self.results: dict = {"knn": {}}
        if cfg.train.init_from and resume_path is None:
            self.results["init_from"] = report = load_init(self.method, cfg.train.init_from)
            if self.info.is_main:
                for line in self.init_changes:
                    print(f"[fovea] init_from architecture: {line}", flush=True)
                print(f"[fovea] init_from {cfg.train.init_from}: " + ", ".join(f"{k} {v}" for k, v in report.items())
                      + (f"; fresh heads trained alone for {cfg.optim.head_warmup_steps} steps"
                         if self._head_warmup(report) else ""), flush=True)
        if self.info.world > 1 and self.device.type == "cuda":
            # head BatchNorm (dino.use_bn) normalises over the global batch, as one process would
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.optimizer = build_optimizer(self.method.student, cfg.optim)
        self.params = [p for p in self.method.student.parameters() if p.requires_grad]
        self.frozen_ids = {id(p) for p in self.method.last_layer_params()}
        self.clip_groups = self.method.clip_groups()
        if self.info.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.method.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.method.set_student_wrapper(ddp)
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.step = 0
        self.skipped = 0
        self.logger = MetricLogger(self.out, enabled=self.info.is_main)
        torch.manual_seed(cfg.train.seed + 1 + self.info.rank)  # per-rank stream for drop-path etc.
        if resume_path is not None:
            self._resume(Path(resume_path))

    # ----------------------------------------------------------------- checkpoints
    def _resume(self, path: Path) -> None:
        ckpt = self.__dict__.pop("_loaded", None) or load_checkpoint(path)
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = self.saved_step = int(ckpt["step"])
        self.skipped = int(ckpt.get("skipped", 0))
        self.results = ckpt.get("results", self.results)
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.logger.truncate_after(self.step)
        if self.info.is_main:
            print(f"[fovea] resumed from {path} at step {self.step}/{self.plan.total_steps}", flush=True)

    def save(self, final: bool = False) -> None:
        """Atomically write ``last.pt`` (and a step copy) with everything needed to resume exactly."""
        rng = [rng_state()]
        self.saved_step = self.step
        if self.info.world > 1:
            gathered: list = [None] * self.info.world
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        if not self.info.is_main:
            return
        state = {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "rng": rng, "skipped": self.skipped, "results": self.results,
                 "config": to_dict(self.cfg), "world": self.info.world}
        save_atomic(state, self.ckpt_dir / "last.pt")
        if self.cfg.train.keep_checkpoints > 0 and not final:
            save_atomic(state, self.ckpt_dir / f"step_{self.step:08d}.pt")
            olds = sorted(self.ckpt_dir.glob("step_*.pt"))[:-self.cfg.train.keep_checkpoints]
            for o in olds:
                o.unlink(missing_ok=True)

    # ----------------------------------------------------------------- evaluation
    def knn(self, tag: str) -> dict | None:
        """k-NN of the evaluation backbone on the configured labelled splits (main rank)."""
        c = self.cfg
        if c.data.eval_train is None or c.data.eval_test is None:
            return None
        res = None
        if self.info.is_main:
            t0 = time.time()
            kinds = list(dict.fromkeys([c.eval.knn.features, *c.eval.knn.report]))
            res = evaluate_knn(self.method.eval_backbone(), self.sources["data.eval_train"],
                               self.sources["data.eval_test"], c.eval.knn.ks, c.eval.knn.temperature, kinds,
                               c.data.eval_size or c.crops.global_size, self.device, c.eval.batch_size,
                               min(c.data.num_workers, 2), c.crops.mean, c.crops.std, c.train.progress,
                               c.eval.knn.widths)
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
    def train_step(self, batch: dict, sv: StepValues) -> dict[str, float]:
        """One optimizer step on ``batch``; returns the logged scalars of this rank."""
        o = self.cfg.optim
        warm = self._head_warmup() if self.cfg.train.init_from else 0
        apply_hparams(self.optimizer, sv.lr, sv.weight_decay,
                      backbone_scale(sv.step, warm, o.backbone_warmup_steps, o.backbone_lr_mult))
        if sv.step < warm:  # the fresh heads learn on the frozen backbone with the teacher = the student
            sv = dataclasses.replace(sv, momentum=0.0)
        batch = {k: to_device(v, self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, logs = self.method.training_step(batch, sv)
        self._check_finite(loss, logs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sv.freeze_last_layer:
            for p in self.params:
                if id(p) in self.frozen_ids:
                    p.grad = None
        gnorm = clip_gradients(self.params, self.cfg.optim.clip_grad, self.cfg.optim.clip_mode, self.clip_groups)
        self.optimizer.step()
        self.method.update_teacher(sv.momentum)
        out = {k: float(v) for k, v in logs.items()}
        out.update({"grad_norm": gnorm, "lr": sv.lr, "wd": sv.weight_decay, "momentum": sv.momentum,
                    "teacher_temp": sv.teacher_temp})
        return out

    def _head_warmup(self, report: dict | None = None) -> int:
        """Steps of the head warm-up: ``optim.head_warmup_steps`` when ``train.init_from`` left a head fresh."""
        report = report if report is not None else self.results.get("init_from")
        if not report or not any(v != "loaded" for k, v in report.items() if k.endswith("_head")):
            return 0
        return self.cfg.optim.head_warmup_steps

    def _check_finite(self, loss: torch.Tensor, logs: dict) -> None:
        """Raise :class:`NonFiniteLoss` naming the step and every non-finite loss term (on every rank when
        any rank has one, so no rank waits in the backward's all-reduce); nothing is applied or saved."""
        terms = {k: v for k, v in logs.items() if k.startswith("loss/") and isinstance(v, torch.Tensor)}
        vals = torch.stack([loss.detach().float().reshape(())] + [v.detach().float().reshape(()) for v in terms.values()])
        bad = not bool(torch.isfinite(vals).all())
        if not any_rank(bad, self.info):
            return
        named = [f"{k}={float(v):g}" for k, v in terms.items() if not torch.isfinite(v).all()]
        if len(named) > 1:  # the total follows from its terms
            named = [n for n in named if not n.startswith("loss/total=")]
        what = ", ".join(named) if named else (f"total loss={float(loss):g}" if bad else "on another rank")
        last = (f"the last good checkpoint {self.ckpt_dir / 'last.pt'} (step {self.saved_step}) is untouched"
                if self.saved_step >= 0 else "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite loss at step {self.step + 1}/{self.plan.total_steps}: {what}; "
                            f"nothing of this step was applied and {last}. Lower optim.lr, raise "
                            "dino.teacher_temp, or use train.precision=fp32")

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
        """The signal that asked this run to stop (0: none), agreed over ranks."""
        sig = self.stop.signum
        if self.info.world > 1:
            t = torch.tensor([sig], dtype=torch.int64, device=self.info.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            sig = int(t)
        return sig

    def _fit(self) -> dict:
        """Train to ``plan.total_steps`` (resuming if a checkpoint exists); returns the results."""
        c, plan = self.cfg, self.plan
        if self.info.is_main:
            print(f"[fovea] run folder: {self.out.resolve()}\n[fovea] data: {self.source.name} "
                  f"({len(self.source)} images), {plan.steps_per_epoch} steps/epoch x "
                  f"{plan.total_steps / plan.steps_per_epoch:.2f} epochs = {plan.total_steps} steps, global batch "
                  f"{c.data.batch_size * self.info.world}, device {self.device}, ranks {self.info.world}", flush=True)
        if self.step == 0 and c.eval.at_start and "start" not in self.results["knn"] and not self.stop.signum:
            self.knn("start")
        self.method.train()
        bar = tqdm(total=plan.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (c.train.progress and self.info.is_main))
        t_start, n_imgs, t_last = time.time(), 0, time.time()
        while self.step < plan.total_steps:
            epoch, pos = divmod(self.step, plan.steps_per_epoch)
            highres = in_highres(c, plan, self.step)  # crop sizes of this phase; schedules run on unchanged
            dataset = build_train_data(c, self.source, highres=True)[0] if highres else self.dataset
            loader = make_train_loader(dataset, c.data.batch_size, self.info.rank, self.info.world,
                                       c.train.seed, epoch, pos, c.data.num_workers,
                                       pin_memory=self.device.type == "cuda", collate_fn=self.collate)
            stopped = self._stop_requested()
            with stop_signals_blocked():  # workers start with SIGTERM / SIGINT held, then ignore them
                batches = iter([] if stopped else loader)
            for batch in batches:
                self.skipped += int(batch["skipped"])
                sv = step_values(c, plan, self.step)
                logs = self.train_step(batch, sv)
                self.step += 1
                n_imgs += c.data.batch_size * self.info.world
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
                    self.knn(f"step{self.step}")
                    self.method.train()
                stopped = self._stop_requested()
                if stopped or self.step >= plan.total_steps or in_highres(c, plan, self.step) != highres:
                    break  # stop request, end, or the high-res phase starts (a new loader, new crop sizes)
            if stopped:
                bar.close()
                if self.saved_step != self.step:
                    self.save()
                raise RunInterrupted(stopped, self.step, str(self.ckpt_dir / "last.pt"))
        bar.close()
        train_minutes = (time.time() - t_start) / 60
        self.results.update({"steps": self.step, "skipped_images": self.skipped,
                             "train_minutes_this_session": round(train_minutes, 2)})
        # the trained model is on disk before any final evaluation, which then cannot lose it
        self.save(final=True)
        if self.info.is_main:
            bb = self.method.eval_backbone()
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

    def _knn_kind(self, res: dict) -> str:
        """The configured k-NN feature kind, or mean_patch where the backbone has no CLS token."""
        kind = self.cfg.eval.knn.features
        return kind if kind in res["features"] else "mean_patch"

    def _knn_shown(self, res: dict) -> list[tuple[str, dict]]:
        """(kind, accuracies) printed for a k-NN result: the main kind, then its truncations ``KIND@w``."""
        kind = self._knn_kind(res)
        return [(k, v) for k, v in res["features"].items() if k == kind or k.startswith(kind + "@")]

    def _summary(self, minutes: float) -> None:
        c, knn = self.cfg, self.results["knn"]
        lines = [f"[fovea] done: {self.step} steps, {minutes:.1f} min of training in this session"]
        if self.skipped:
            lines.append(f"[fovea] skipped {self.skipped} unreadable images (replaced by the next readable one)")
        for tag in ("start", "end"):
            for kind, accs in (self._knn_shown(knn[tag]) if tag in knn else []):
                lines.append(f"[fovea] k-NN {tag:5s} ({kind}): "
                             + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
        lines += [f"[fovea] resolved config: {self.out / 'config.yaml'}",
                  f"[fovea] checkpoint:      {self.ckpt_dir / 'last.pt'}",
                  f"[fovea] backbone:        {self.out / 'backbone.safetensors'}",
                  f"[fovea] metrics:         {self.out / 'metrics.jsonl'} (TensorBoard: {self.out / 'tensorboard'})",
                  f"[fovea] results:         {self.out / 'results.json'}"]
        print("\n".join(lines), flush=True)


def to_device(v: object, device: torch.device) -> object:
    """Move a tensor, or the tensors of a list, to ``device`` (other values unchanged)."""
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (list, tuple)):
        return [to_device(x, device) for x in v]
    return v


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training for ``cfg``; returns the results dict."""
    return Trainer(cfg).fit()

