"""The lowest layer, imported by every other part: checkpoint I/O, distributed helpers, metric logging,
schedules, the run plan and errors. Nothing here imports another part of fovea."""
