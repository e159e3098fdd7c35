"""Monocular depth by a linear probe on frozen features (DINOv2 lin1 / lin4 on the NYU-Depth v2 layout)."""
