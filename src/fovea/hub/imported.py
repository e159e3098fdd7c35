"""Write what :mod:`fovea.hub.released` read as an ordinary backbone folder (``fovea import``)."""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from fovea.hub.backbone import export_backbone
from fovea.hub.released import IMAGENET_MEAN, IMAGENET_STD, Imported, ReleasedFileError, build_predictor
from fovea.models.vit import VisionTransformer
from fovea.core.checkpoint import public_mode


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Atomic ``safetensors`` write with the ordinary file mode."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, public_mode())
    tmp.replace(path)


def write_imported(imp: Imported, src: str | Path, out_dir: str | Path, eval_size: int = 224) -> Path:
    """Write an ordinary fovea backbone folder: ``backbone.safetensors`` + ``backbone.yaml`` (its config,
    ImageNet normalisation, the import report), ``heads.safetensors`` when the file has heads
    (``dino_head.*``, ``ibot_head.*``, ``dino_center``) and ``predictor.safetensors`` for I-JEPA.
    Every tensor is checked against fovea's modules first (names and shapes). Returns the folder."""
    out = Path(out_dir)
    model = VisionTransformer(imp.cfg)
    missing, unexpected = model.load_state_dict(imp.backbone, strict=False)
    if missing or unexpected:
        raise ReleasedFileError(f"backbone keys do not match fovea's ViT: missing {missing[:8]}, "
                                f"unexpected {unexpected[:8]}")
    report = {"source": imp.source, "layout": imp.layout, "file": str(Path(src).resolve()), "notes": imp.notes,
              "heads": imp.head_shapes}
    if imp.predictor:
        missing, unexpected = build_predictor(imp.predictor_shape, imp.cfg.sincos_layout).load_state_dict(
            imp.predictor, strict=False)
        if missing or unexpected:
            raise ReleasedFileError(f"predictor keys do not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
        report["predictor"] = imp.predictor_shape
    export_backbone(model.eval(), out, extra={
        "crops": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "global_size": eval_size},
        "eval_features": "cls" if imp.cfg.cls_token else "mean_patch", "imported": report})
    if imp.predictor:
        _save_tensors(imp.predictor, out / "predictor.safetensors")
    if imp.heads or imp.extra:
        tensors = {f"{h}.{k}": v for h, sd in imp.heads.items() for k, v in sd.items()}
        _save_tensors({**tensors, **imp.extra}, out / "heads.safetensors")
    return out
