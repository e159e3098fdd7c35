"""Build the measurement sets of the papers' protocols in their exact official on-disk layouts, from the
data in ``../shared/data`` (Imagenette, CIFAR-10) and procedural content, so that ``fovea eval retrieval``,
``copydetect``, ``video``, ``correspondence`` and ``depth`` run on them unchanged (the same loaders a user
with the real ROxford5k / Copydays / DAVIS-2017 / SPair-71k / NYU-Depth v2 runs).

    .venv/bin/python benchmarks/make_eval_sets.py --out runs/eval_sets            # all five
    .venv/bin/python benchmarks/make_eval_sets.py --out runs/eval_sets --only video,depth --small

Each builder lives in ``benchmarks/eval_sets/<protocol>.py`` (``build(out, data, seed, small) -> spec``);
its docstring says what the set holds. The script prints one line per set with the ``--data`` spec to pass,
and writes ``OUT/sets.json`` ({protocol: {"spec", "seconds"}}).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = ("retrieval", "copydetect", "video", "correspondence", "depth")


def default_data() -> Path:
    """``$FOVEA_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("FOVEA_DATA")
    return Path(env) if env else HERE.parent.parent / "shared" / "data"


def builder(name: str):
    """The ``build`` function of ``benchmarks/eval_sets/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"eval_sets_{name}", HERE / "eval_sets" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no builder benchmarks/eval_sets/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="runs/eval_sets", help="folder of the sets (one sub-folder per protocol)")
    ap.add_argument("--data", default=str(default_data()), help="the shared data folder (imagenette/, cifar10/)")
    ap.add_argument("--only", default="", help=f"comma list from {','.join(SETS)} (default: all)")
    ap.add_argument("--small", action="store_true", help="tiny versions (a smoke test: seconds)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(SETS)
    bad = [n for n in names if n not in SETS]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {', '.join(SETS)}")
    data = Path(a.data)
    if not (data / "imagenette" / "val.parquet").exists():
        print(f"make_eval_sets: {data}/imagenette/val.parquet not found (set --data or FOVEA_DATA)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "sets.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for name in names:
        t0 = time.time()
        spec = builder(name)(out / name, data, a.seed, a.small)
        index[name] = {"spec": spec, "seconds": round(time.time() - t0, 1), "small": a.small}
        print(f"{name:<15} --data {spec}   [{index[name]['seconds']} s]", flush=True)
    index_path.write_text(json.dumps(index, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
