"""Scalar logging to TensorBoard and a JSONL file (main rank only)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricLogger:
    """Writes ``{"step": s, "time": t, **scalars}`` lines to ``metrics.jsonl`` and TensorBoard events."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Record scalars at ``step`` (non-numeric values go to JSONL only)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **scalars}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run re-logs them)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
