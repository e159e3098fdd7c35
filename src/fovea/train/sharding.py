"""FSDP2 (``train.strategy=fsdp``): the method's student and teacher sharded with PyTorch's own
``torch.distributed.fsdp.fully_shard``, one unit per transformer block, per backbone (its embeddings and final
norm) and per head, and the rest under the student / teacher roots.

Every parameter is sharded on its first dimension over all ranks, so a teacher and its student of the same
shapes hold the same rows on a rank: the EMA runs on the local shards (:func:`local`), with no communication.
Gradients are reduce-scattered as means over ranks (what DDP's all-reduce gives) and clipped with norms summed
over the shards (:func:`fovea.train.optim.clip_gradients`). Evaluation and export use a full, unsharded copy
of the evaluation backbone (:func:`full_copy`).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from fovea.models.layers import Block
from fovea.models.vit import VisionTransformer

#: VisionTransformer methods called from outside ``forward`` (their parameters are gathered around the call)
FORWARD_METHODS = ("forward_features", "forward_features_list", "forward_features_packed", "get_intermediate_layers")

STRATEGIES = ("auto", "ddp", "fsdp")


def resolve_strategy(strategy: str, world: int) -> str:
    """``none`` (one process), ``ddp`` or ``fsdp``: ``auto`` is DDP under torchrun, nothing on one process
    (FSDP over a process group of one rank when one was set up by the caller)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if world == 1:
        pg = torch.distributed.is_available() and torch.distributed.is_initialized()
        return "fsdp" if strategy == "fsdp" and pg else "none"
    return "ddp" if strategy == "auto" else strategy


def is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (a view on its storage); the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _heads(module: nn.Module) -> list[nn.Module]:
    """The head modules of a student / teacher: ``head`` and ``patch_head`` when it is a separate module."""
    head, patch = getattr(module, "head", None), getattr(module, "patch_head", None)
    out = [h for h in (head, patch) if isinstance(h, nn.Module)]
    if len(out) == 2 and (out[0] is out[1] or getattr(module, "shared_head", False)):
        return []  # a head called twice in one forward stays with the root
    return out


def apply_fsdp(method: nn.Module, device: torch.device, bf16: bool) -> list[nn.Module]:
    """Shard ``method`` in place (every rank must call it, with identical weights); returns the FSDP roots.

    Units: each :class:`~fovea.models.layers.Block` (backbones and the I-JEPA predictor), each
    :class:`~fovea.models.vit.VisionTransformer` (the calls in :data:`FORWARD_METHODS` gather it), each
    separate head, then the student and the teacher (what is left: a shared head, projections). On CUDA
    with bf16, parameters are gathered in bf16 and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    # The backbone's outputs are views (one per crop); nothing modifies them in place, which is what FSDP warns of.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    done: set[int] = set()

    def shard(m: nn.Module) -> None:
        if id(m) not in done:
            fully_shard(m, mp_policy=mp)
            done.add(id(m))

    roots = [m for name in ("student", "teacher") if isinstance(m := getattr(method, name, None), nn.Module)]
    for m in list(method.modules()):
        if isinstance(m, Block):
            shard(m)
    for m in list(method.modules()):
        if isinstance(m, VisionTransformer):
            shard(m)
            for fn in FORWARD_METHODS:
                register_fsdp_forward_method(m, fn)
    for root in roots:
        for h in _heads(root):
            shard(h)
        for m in root.modules():
            if type(m).__name__ == "Predictor":
                shard(m)
    for root in roots:
        shard(root)
    left = [n for n, p in method.named_parameters() if not is_dtensor(p)]
    if left:
        raise RuntimeError(f"train.strategy=fsdp: parameters outside every FSDP unit: {', '.join(left[:5])}")
    return roots


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_all(module: nn.Module) -> None:
    """Free every gathered parameter of ``module`` (the roots keep theirs after a forward without backward):
    afterwards every parameter is a sharded tensor again."""
    for m in fsdp_modules(module):
        m.reshard()  # type: ignore[operator]


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """FSDP's ``no_sync``: with ``sync=False`` gradients accumulate unsharded, unreduced (all but the last
    micro-batch of ``train.accumulate``)."""
    for m in fsdp_modules(module):
        m.set_requires_gradient_sync(sync, recurse=False)  # type: ignore[operator]


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """The full (gathered) state dict of ``module`` on every rank, on the CPU (a collective call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))  # type: ignore[return-value]


def full_copy(backbone: VisionTransformer, device: torch.device) -> VisionTransformer:
    """An unsharded copy of a (sharded) backbone on ``device``, on every rank (collective when sharded)."""
    if not fsdp_modules(backbone):
        return backbone
    state = {k: v.detach().to("cpu") for k, v in full_state(backbone).items()}
    torch_state = torch.get_rng_state()
    plain = VisionTransformer(backbone.cfg)  # its random init is overwritten: keep the training RNG untouched
    torch.set_rng_state(torch_state)
    plain.load_state_dict(state)
    return plain.to(device).eval()
