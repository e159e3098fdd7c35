"""Names of the evaluation protocols (one list, read by the config loader, the CLI and the report)."""
from __future__ import annotations

#: the data-set protocols of the papers: name -> module defining ``PROTOCOL`` (a
#: :class:`fovea.eval.plugin.PaperProtocol`); each runs in ``fovea eval all`` when its data is given
PAPER_PROTOCOLS = {
    "retrieval": "fovea.eval.retrieval.protocol",
    "copydetect": "fovea.eval.retrieval.copydetect",
    "video": "fovea.eval.video.protocol",
    "correspondence": "fovea.eval.correspondence.protocol",
    "depth": "fovea.eval.depth.protocol",
}
#: protocols of `fovea eval all`, in the order they run
PROTOCOLS = ("knn", "linear", "logreg", "fewshot", "ood", "seg", "pictures") + tuple(PAPER_PROTOCOLS)
#: what `fovea eval all` runs by default (ood, seg and the paper protocols need extra data and are added when given)
DEFAULT_PROTOCOLS = ("knn", "linear", "logreg", "fewshot", "pictures")
#: what `eval.final` may run after training (ood and seg need their own data)
FINAL_PROTOCOLS = DEFAULT_PROTOCOLS
