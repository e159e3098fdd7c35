"""Sinkhorn-Knopp fidelity: fovea's log-domain implementation against the official algorithm in float64.

    python benchmarks/sinkhorn_fidelity.py [--json OUT.json]

Mixed-confidence logits (flat, confident and ordinary samples with per-sample offsets, the test
suite's ``mixed_logits``) at logit scales 0.3 / 1 / 4 and teacher temperatures 0.1 / 0.04. For each:
the largest entry-wise difference of fovea's targets from the float64 official algorithm (METHODS.md
section 3, no shift of any kind), the same for the per-sample max-shift variant (fovea before the fix),
and whether the official algorithm is finite in float32. Then 2 CPU ranks (torchrun, gloo) against
one process on the same logits, for the CLS and the patch (``n_total``) cases.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "unit" / "losses")]
from helpers import free_port  # noqa: E402
from test_dinov2_losses import mixed_logits, sk_reference  # noqa: E402 - the tests' float64 re-derivation

from fovea.losses.sinkhorn import sinkhorn_knopp  # noqa: E402

TWO_RANKS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from fovea.losses.sinkhorn import sinkhorn_knopp
    dist.init_process_group("gloo")
    r = dist.get_rank()
    t = torch.load(sys.argv[1])
    half = t.shape[0] // 2
    part = t[:half] if r == 0 else t[half:]
    n = torch.tensor(float(part.shape[0])); dist.all_reduce(n)
    out = {"cls": sinkhorn_knopp(part, 0.04, 3), "patch": sinkhorn_knopp(part[: part.shape[0] - r], 0.04, 3,
                                                                        n - 1)}
    torch.save(out, sys.argv[1] + f".rank{r}")
    dist.destroy_process_group()
""")


def official_float32_finite(t: torch.Tensor, temp: float) -> bool:
    q = torch.exp(t.float() / temp).t()
    q = q / q.sum()
    return bool(torch.isfinite(q).all())


def two_ranks(t: torch.Tensor) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        script, data = Path(d) / "sk2.py", Path(d) / "logits.pt"
        script.write_text(TWO_RANKS)
        torch.save(t, data)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(script), str(data)], check=True, capture_output=True, env=env, timeout=120)
        r0, r1 = torch.load(f"{data}.rank0"), torch.load(f"{data}.rank1")
    half = t.shape[0] // 2
    cls = sinkhorn_knopp(t, 0.04, 3)
    patch = sinkhorn_knopp(torch.cat([t[:half], t[half:-1]]), 0.04, 3)
    return {"cls_max_diff": float((torch.cat([r0["cls"], r1["cls"]]) - cls).abs().max()),
            "patch_max_diff": float((torch.cat([r0["patch"], r1["patch"]]) - patch).abs().max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    a = ap.parse_args()
    rows = []
    print("| logit scale | tau_t | official float32 finite | fovea finite | max abs diff fovea vs float64 official "
          "| max abs diff per-sample-shift vs official |")
    print("|---|---|---|---|---|---|")
    for scale in (0.3, 1.0, 4.0):
        for temp in (0.1, 0.04):
            t = mixed_logits(0, scale=scale)
            ref = sk_reference(t.double().numpy(), temp, 3)
            out = sinkhorn_knopp(t, temp, 3).double().numpy()
            z = t.double().numpy() / temp
            shifted = sk_reference(z - z.max(1, keepdims=True), 1.0, 3)
            row = {"scale": scale, "temp": temp, "official_f32_finite": official_float32_finite(t, temp),
                   "fovea_finite": bool(np.isfinite(out).all()), "fovea_max_diff": float(np.abs(out - ref).max()),
                   "shift_max_diff": float(np.abs(shifted - ref).max())}
            rows.append(row)
            print(f"| {scale} | {temp} | {row['official_f32_finite']} | {row['fovea_finite']} | "
                  f"{row['fovea_max_diff']:.2e} | {row['shift_max_diff']:.2e} |")
    ranks = two_ranks(mixed_logits(0, scale=4.0))
    print(f"\n2 ranks vs 1 process (scale 4, tau 0.04): CLS max diff {ranks['cls_max_diff']:.2e}, "
          f"patch (n_total) max diff {ranks['patch_max_diff']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "two_ranks": ranks}, indent=2))
    ok = all(r["fovea_finite"] and r["fovea_max_diff"] < 1e-5 for r in rows) and max(ranks.values()) < 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
