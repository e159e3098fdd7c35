"""Semi-supervised video object segmentation by label propagation (DAVIS-2017, DINO v1): the DAVIS
reader (:mod:`.data`), the propagation (:mod:`.propagate`), the davis2017 metrics (:mod:`.metrics`),
the overlay strips (:mod:`.pictures`) and ``PROTOCOL`` (:mod:`.protocol`)."""
