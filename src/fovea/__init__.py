"""fovea: self-supervised Vision Transformers (DINO, iBOT, DINOv2, Franca, I-JEPA)."""
__version__ = "0.1.0"
