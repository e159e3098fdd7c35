"""Released-weight import fidelity: every official output stored in ``$FOVEA_DATA/weights`` against fovea.

    python benchmarks/import_fidelity.py [--json OUT.json]

Imports each fixture (files in the exact layouts of the released DINOv2 / Franca / DINO / I-JEPA / DINOv3
checkpoints, with the official code's outputs) through ``fovea import``'s reader and writer, loads the
written folder, and prints the largest absolute difference of each output group (CLS, registers, patch
tokens, second-to-last block, masked forward, heads) at the native, another square and a non-square size.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "hub"))
from test_import_released import ATOL, FIXTURES, fixture_diffs  # noqa: E402 - the tests' comparison


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="also write every difference to this JSON file")
    a = ap.parse_args()
    rows = {}
    print("| fixture | native | other square | non-square | masked | heads / predictor | outputs compared |")
    print("|---|---|---|---|---|---|---|")
    for name in FIXTURES:
        with tempfile.TemporaryDirectory() as d:
            diffs, _ = fixture_diffs(name, Path(d))
        rows[name] = diffs

        def worst(pred) -> str:  # noqa: ANN001
            v = [x for k, x in diffs.items() if pred(k)]
            return f"{max(v):.1e}" if v else "-"
        print(f"| {name} | {worst(lambda k: k.startswith('native_') and 'head' not in k)} | "
              f"{worst(lambda k: k.startswith('other_') and 'masked' not in k and 'head' not in k)} | "
              f"{worst(lambda k: k.startswith('rect_'))} | {worst(lambda k: 'masked' in k and 'head' not in k)} | "
              f"{worst(lambda k: 'head' in k or 'center' in k)} | {len(diffs)} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    worst_all = max(v for d in rows.values() for v in d.values())
    print(f"\nlargest difference over all {sum(map(len, rows.values()))} outputs: {worst_all:.2e} (tolerance {ATOL})")
    return 0 if worst_all < ATOL else 1


if __name__ == "__main__":
    sys.exit(main())
