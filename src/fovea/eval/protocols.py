"""Names of the evaluation protocols (one list, read by the config loader, the CLI and the report)."""
from __future__ import annotations

#: protocols of `fovea eval all`, in the order they run
PROTOCOLS = ("knn", "linear", "logreg", "fewshot", "ood", "seg", "pictures")
#: what `fovea eval all` runs by default (ood and seg need extra data and are added when given)
DEFAULT_PROTOCOLS = ("knn", "linear", "logreg", "fewshot", "pictures")
#: what `eval.final` may run after training (ood and seg need their own data)
FINAL_PROTOCOLS = DEFAULT_PROTOCOLS
