"""The run configuration: one dataclass per section, with defaults.

Defaults are the published DINO (ViT-S/16, ImageNet) values from METHODS.md; presets in
``fovea/presets`` override what differs. Every key is documented in ``fovea train --help``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fovea.data.augment import CropsConfig
from fovea.data.sources import SourceConfig
from fovea.models.vit import ViTConfig


@dataclass
class DINOConfig:
    """DINO head and loss (the ``dino`` section)."""

    out_dim: int | None = field(default=None, metadata={"auto": True})  # K prototypes; null = auto from the data set size (65536 at ImageNet scale)
    hidden_dim: int = 2048  # head MLP hidden width
    bottleneck_dim: int = 256  # head output width before the prototypes
    nlayers: int = 3  # head MLP layers
    norm_last_layer: bool = True  # fix the prototypes' weight-norm gain to 1 (False: learn it; steadier for ViT-S)
    use_bn: bool = False  # BatchNorm in the head MLP (DINO's use_bn_in_head); synced over GPUs, per rank on CPU
    student_temp: float = 0.1  # student softmax temperature tau_s
    teacher_temp: float = 0.04  # final teacher temperature
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0
    warmup_teacher_temp_epochs: float = 0.0  # epochs of linear teacher-temperature warm-up
    center_momentum: float = 0.9  # EMA momentum of the teacher centre (centering=ema)
    centering: Literal["ema", "sinkhorn"] = "ema"  # teacher centering: ema (DINO centre) | sinkhorn (Sinkhorn-Knopp, DINOv2)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations (centering=sinkhorn)
    loss_weight: float = 1.0  # weight of the DINO CLS term in the total loss


@dataclass
class IBOTConfig:
    """iBOT masked-patch loss (the ``ibot`` section, METHODS.md section 2)."""

    enabled: bool = False  # add the iBOT patch loss (student global crops masked, teacher unmasked)
    loss_weight: float = 1.0  # weight of the patch term in the total loss
    mask_prob: float = 0.5  # probability that a global crop is masked
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # masked fraction r ~ U(low, high)
    mask_min_block: int = 4  # smallest block (in patches) of the block masking
    mask_type: Literal["block", "inverse_block", "cyclic"] = "block"  # block (BEiT blocks) | inverse_block (visible part one rectangle) | cyclic (inverse_block + roll, Franca)
    mask_roll: bool = False  # also roll block / inverse_block masks by a uniform 2-D offset with wrap-around (cyclic always rolls)
    separate_head: bool = True  # own patch head (DINOv2 large, Franca); false = share the DINO head (iBOT)
    out_dim: int | None = field(default=None, metadata={"auto": True})  # patch-head prototypes K; null = dino.out_dim (ignored when sharing the head)
    hidden_dim: int | None = field(default=None, metadata={"auto": True})  # patch-head MLP width; null = dino.hidden_dim
    bottleneck_dim: int | None = field(default=None, metadata={"auto": True})  # patch-head bottleneck; null = dino.bottleneck_dim
    centering: Literal["same", "ema", "sinkhorn"] = "same"  # same (as dino.centering) | ema | sinkhorn
    center_momentum: float = 0.9  # EMA momentum of the patch centre (centering=ema)


@dataclass
class MatryoshkaConfig:
    """Nested Matryoshka heads for the DINO and iBOT losses (the ``matryoshka`` section, Franca)."""

    enabled: bool = False  # replace the DINO (and iBOT) heads by nested heads, one per width; loss = weighted sum over levels
    widths: list[int] = field(default_factory=list)  # nesting widths d_m in (0, D]; [] = D/16, D/8, D/4, D/2, D
    input: Literal["slice", "linear"] = "slice"  # per-level input: slice (x[..., :d_m], nested backbone features) | linear (learned Linear(D, d_m), released code)
    l2_norm: bool = True  # L2-normalise the bottleneck before the prototypes (the released Franca head does not)
    loss_weights: list[float] = field(default_factory=list)  # per-level weights, narrowest first; [] = 1 each (plain sum)


@dataclass
class KoLeoConfig:
    """KoLeo regulariser on the student's backbone CLS of each global crop (the ``koleo`` section)."""

    weight: float = 0.0  # loss weight; 0 = off (DINOv2: 0.1)


@dataclass
class GramConfig:
    """Gram anchoring (the ``gram`` section, DINOv3, METHODS.md section 5b)."""

    enabled: bool = False  # add the Gram term: student patch similarities vs a frozen snapshot of the EMA teacher
    weight: float = 2.0  # weight of the term from gram.start on (0 before it)
    highres_weight: float | None = field(default=None, metadata={"auto": True})  # weight in the high-resolution phase; null = gram.weight (DINOv3: 1.5)
    start: int = 0  # step at which the Gram teacher is first taken from the EMA teacher and the term starts
    refresh_every: int = 10000  # the Gram teacher is re-taken from the EMA teacher every N steps after gram.start (0 = never)
    teacher_size: int | None = field(default=None, metadata={"auto": True})  # the Gram teacher's own global-crop size (same boxes, larger; DINOv3: 2x); null = the student's crops


@dataclass
class DistillConfig:
    """Distillation of a frozen teacher into a smaller student (the ``distill`` section, METHODS.md 3 and 5c)."""

    teacher: str = ""  # the frozen teacher: run folder, imported folder, backbone.safetensors, checkpoint or released file
    target: Literal["features", "heads"] = "features"  # features: the student's CLS and patch tokens, through a learned projection, regress the teacher's normalised ones | heads: the teacher's frozen DINO (+ iBOT) heads give the targets of the student's own heads (DINOv2; the teacher must have heads)
    loss: Literal["cosine", "smooth_l1"] = "cosine"  # cosine (1 - cos) | smooth_l1 (beta 1, on L2-normalised tokens)
    patch_weight: float = 1.0  # weight of the patch-token term (the CLS term has weight 1); target=features (heads: ibot.loss_weight)
    teacher_size: int | None = field(default=None, metadata={"auto": True})  # the teacher's input size (its crops resized); null = the student's


@dataclass
class HighResConfig:
    """High-resolution phase at the end of training (the ``highres`` section, DINOv2 adaptation)."""

    steps: int = 0  # the last N steps use the sizes below (0 = off); schedules continue unchanged
    global_size: int | None = field(default=None, metadata={"auto": True})  # global crop size in the phase (e.g. 518); null = crops.global_size
    local_size: int | None = field(default=None, metadata={"auto": True})  # local crop size in the phase; null = crops.local_size


@dataclass
class IJEPAConfig:
    """I-JEPA masks, predictor and loss (the ``ijepa`` section; METHODS.md section 5)."""

    num_targets: int = 4  # M target blocks per image
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])  # target block area, fraction of the patch grid
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])  # target block aspect ratio (height/width) range
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])  # context block area range (before removing targets)
    context_aspect: list[float] = field(default_factory=lambda: [1.0, 1.0])  # context block aspect ratio range
    min_context: int = 10  # resample the masks until the context keeps at least this many patches
    equalize: Literal["pad", "subsample"] = "pad"  # equal-length batches: pad (attention mask) | subsample (random subsets, batch minimum)
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # RandomResizedCrop area range of the single view
    flip_p: float = 0.0  # horizontal flip probability of the single view (I-JEPA: none)
    pred_dim: int = 384  # predictor width
    pred_depth: int = 12  # predictor blocks
    pred_heads: int | None = field(default=None, metadata={"auto": True})  # predictor attention heads; null = the encoder's
    loss: Literal["l2", "smooth_l1"] = "l2"  # l2 (paper) | smooth_l1 (released code, beta 1)


@dataclass
class DataConfig:
    """Training images, loader settings and labelled splits for k-NN (the ``data`` section)."""

    train: SourceConfig = field(default_factory=SourceConfig)
    eval_train: SourceConfig | None = None  # labelled bank for periodic / final k-NN
    eval_test: SourceConfig | None = None
    batch_size: int = 64  # per rank
    num_workers: int = 4  # data-loading worker processes per rank
    eval_size: int | None = field(default=None, metadata={"auto": True})  # input size of eval views; null = crops.global_size


@dataclass
class OptimConfig:
    """Optimizer and schedules (the ``optim`` section). Durations are in epochs (floats allowed)."""

    epochs: float = 100.0  # training length in epochs (fractions allowed)
    max_steps: int | None = field(default=None, metadata={"auto": True})  # set: the run's length in steps (overrides epochs); null = epochs x steps per epoch
    lr: float = 5e-4  # base lr, scaled by `lr_scaling`
    lr_scaling: Literal["linear256", "sqrt1024", "none"] = "linear256"  # linear256 (DINO: lr*B/256) | sqrt1024 (DINOv2) | none
    min_lr: float = 1e-6  # final lr of the cosine schedule
    warmup_epochs: float = 10.0  # linear lr warm-up from `start_lr`, in epochs
    start_lr: float = 0.0  # lr at step 0 of the warm-up (I-JEPA: 2e-4), scaled like `lr`
    weight_decay: float = 0.04  # initial weight decay (cosine schedule)
    weight_decay_end: float = 0.4  # final weight decay
    momentum_teacher: float | None = field(default=None, metadata={"auto": True})  # null = auto from the run length (0.996 for long runs)
    momentum_teacher_end: float = 1.0  # final teacher momentum
    momentum_schedule: Literal["cosine", "linear"] = "cosine"  # teacher momentum schedule: cosine (DINO) | linear (I-JEPA)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    clip_grad: float = 3.0  # 0 = off
    clip_mode: Literal["per_param", "global", "per_module"] = "per_param"  # per_param (DINO v1) | global | per_module (DINOv2/Franca: backbone, DINO head, iBOT head each to clip_grad)
    freeze_last_layer_epochs: float = 1.0  # prototypes get no update during these first epochs
    epoch_length: int | None = field(default=None, metadata={"auto": True})  # set: an "epoch" in the durations above is this many steps (DINOv2: 1250); null = one data pass
    layer_decay: float = 1.0  # layer-wise lr decay: block i gets lr * decay^(depth - i); 1 = off (DINOv2: 0.9)
    patch_embed_lr_mult: float = 1.0  # extra lr multiplier of the patch embedding (DINOv2: 0.2)
    head_warmup_steps: int = 0  # with train.init_from and fresh heads: first N steps train only the heads (backbone lr 0; the teacher's backbone is the student's)
    head_warmup_teacher: Literal["ema", "student"] = "ema"  # teacher heads during the head warm-up: ema (the usual momentum) | student (copied each step; collapses DINO's EMA-centred heads)
    backbone_lr_mult: float = 1.0  # backbone lr = lr x this (continued pretraining: a low backbone lr)
    backbone_warmup_steps: int = 0  # after the head warm-up, the backbone lr rises linearly over these steps (0 = at once)


@dataclass
class KNNConfig:
    """Frozen-feature k-NN (the ``eval.knn`` section)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # numbers of neighbours reported
    temperature: float = 0.07  # vote weights exp(sim / T)
    widths: list[int] = field(default_factory=list)  # also report truncated features x[..., :w] as KIND@w (Matryoshka); [] = full only
    features: Literal["cls", "mean_patch", "both"] = "cls"  # cls | mean_patch | both (reported: every kind listed in eval.knn.report)
    report: list[str] = field(default_factory=lambda: ["cls"])  # feature kinds computed at each k-NN


@dataclass
class EvalConfig:
    """When to evaluate during training (the ``eval`` section)."""

    knn: KNNConfig = field(default_factory=KNNConfig)  # k-NN settings
    at_start: bool = False  # k-NN of the initial model (before any step)
    every_epochs: float = 0.0  # 0 = only at the end
    every_steps: int = 0  # > 0: k-NN every N steps (overrides every_epochs)
    at_end: bool = True  # k-NN after the last step
    at_minutes: list[float] = field(default_factory=list)  # k-NN when the training time of this session (evaluations excluded) passes each of these minutes (quality per CPU-minute)
    batch_size: int = 256  # feature-extraction batch size
    final: list[str] = field(default_factory=list)  # `fovea eval all` protocols run after training (knn, linear, logreg, fewshot, pictures); report in RUN/eval


@dataclass
class TrainConfig:
    """Run control (the ``train`` section)."""

    seed: int = 0  # seed of weights, data order and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (autocast with a gradient scaler, for GPUs without bf16: V100, T4)
    activation_checkpointing: bool = False  # recompute each student block's activations in the backward (less memory, ~1/3 more compute)
    compile: bool = False  # torch.compile each student block (the first steps compile; little gain on CPU)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # several ranks: ddp (replicated weights, the auto choice) | fsdp (FSDP2: parameters, gradients and optimizer state sharded per block and head)
    checkpoint_format: Literal["auto", "full", "sharded"] = "auto"  # full: one last.pt written by rank 0 | sharded: torch.distributed.checkpoint folder last.dcp, each rank writes its shards (auto: sharded under fsdp); either resumes on any world size
    budget_minutes: float = 0.0  # > 0: size the run to this many minutes of training on this machine: time train.budget_probe_steps steps first (after 5 untimed ones; the probe's time counts in the budget, evaluations do not), then set optim.max_steps to what the rest of the budget holds, so the schedules end within it; the value is written to config.yaml and a resume keeps it
    budget_probe_steps: int = 20  # timed steps of the train.budget_minutes speed probe
    max_minutes: float = 0.0  # > 0: end the training after this many minutes of it in this session (evaluations excluded): checkpoint, export and the end evaluations as after the last step; the run resumes where it stopped
    accumulate: int = 1  # micro-batches of data.batch_size per optimizer step (gradient accumulation): global batch = batch x ranks x accumulate
    checkpoint_every_steps: int | None = field(default=None, metadata={"auto": True})  # null = once per epoch
    keep_checkpoints: int = 1  # number of step checkpoints kept besides last.pt
    log_every_steps: int = 10  # scalars to metrics.jsonl / TensorBoard every N steps
    threads: int | None = field(default=None, metadata={"auto": True})  # torch CPU threads; null = torch default
    progress: bool = True  # show progress bars
    resume: bool = True  # continue from <output_dir>/checkpoints/last.pt when it exists
    init_from: str = ""  # start from this backbone: run folder, imported folder, backbone.safetensors, checkpoint or released file (heads too when present)
    resume_force: bool = False  # resume even when the checkpoint's config differs in keys that change the trajectory


@dataclass
class RunConfig:
    """A whole run: method, model, data, optimisation, evaluation."""

    method: str = "dino"  # dino | dinov2 | franca | dinov3 (one self-distillation family; the ibot/koleo/centering/matryoshka/gram keys select parts) | ijepa | distill
    name: str = ""  # preset or experiment name (used in the default output_dir)
    description: str = ""  # one line shown by `fovea presets`
    output_dir: str = ""  # run folder; "" = runs/<name>
    model: ViTConfig = field(default_factory=ViTConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    ijepa: IJEPAConfig = field(default_factory=IJEPAConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    koleo: KoLeoConfig = field(default_factory=KoLeoConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
