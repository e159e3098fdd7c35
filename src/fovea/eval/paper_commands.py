"""``fovea eval retrieval|copydetect|video|correspondence|depth``: one sub-command per data-set protocol
of :data:`fovea.eval.protocols.PAPER_PROTOCOLS`, built from its declared options, and the same options
prefixed with ``--NAME-`` on ``fovea eval all``."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from fovea.eval.plugin import PaperProtocol, load_protocol
from fovea.eval.protocols import PAPER_PROTOCOLS

MODEL_HELP = ("a run folder, a checkpoint .pt, an exported or imported folder / backbone.safetensors, or a released "
              "DINO / DINOv2 / DINOv3 / Franca / I-JEPA file")


def paper_protocols() -> dict[str, PaperProtocol]:
    """{name: PaperProtocol} in the order of PAPER_PROTOCOLS."""
    return {name: load_protocol(module) for name, module in PAPER_PROTOCOLS.items()}


def _add_options(p: argparse.ArgumentParser, proto: PaperProtocol, prefix: str, required_data: bool) -> None:
    for o in proto.options:
        kw: dict[str, Any] = dict(o.kwargs)
        if o.flag == proto.data_flag:
            kw["required"] = required_data
            if not required_data:
                kw["default"] = None
                kw["help"] = kw.get("help", "") + f" (the {proto.name} protocol runs when this is given)"
        p.add_argument(f"--{prefix}{o.flag}", dest=f"{prefix.replace('-', '_')}{o.key}", **kw)


def add_paper_commands(esub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """Add one ``fovea eval NAME`` sub-command per paper protocol."""
    from fovea.eval.cli_common import add_backbone_options
    for name, proto in paper_protocols().items():
        p = esub.add_parser(name, help=proto.help, description=proto.description, formatter_class=fmt)
        p.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)
        _add_options(p, proto, "", True)
        add_backbone_options(p)
        p.set_defaults(batch_size=32)
        p.add_argument("--seed", type=int, default=0, help="seed of draws and probe initialisation")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        p.add_argument("--out", default="", help=f"output folder (default RUN_DIR/eval/{name})")
        p.set_defaults(func=cmd_eval_paper, paper=name)


def add_paper_options_to_all(a: argparse.ArgumentParser) -> None:
    """``--NAME-FLAG`` options of every paper protocol on ``fovea eval all``."""
    for name, proto in paper_protocols().items():
        g = a.add_argument_group(f"{name} ({proto.help})")
        _add_options(g, proto, f"{name}-", False)  # type: ignore[arg-type]


def paper_settings(args: argparse.Namespace, name: str, prefixed: bool) -> dict[str, Any]:
    """The options of protocol ``name`` from parsed arguments (keys without the prefix)."""
    proto = load_protocol(PAPER_PROTOCOLS[name])
    pre = f"{name}_" if prefixed else ""
    return {o.key: getattr(args, pre + o.key) for o in proto.options}


def given_paper_protocols(args: argparse.Namespace) -> list[str]:
    """The paper protocols whose ``--NAME-data`` was given on ``fovea eval all``."""
    out = []
    for name, proto in paper_protocols().items():
        if getattr(args, f"{name}_{proto.data_flag.replace('-', '_')}", None):
            out.append(name)
    return out


def cmd_eval_paper(args: argparse.Namespace) -> int:
    """Run one paper protocol, write report.json / report.md into --out, print its summary (or JSON)."""
    from fovea.eval.cli_common import make_suite
    from fovea.eval.report import run_report
    name = args.paper
    generic = {k: getattr(args, k) for k in ("checkpoint", "which", "batch_size", "workers", "device", "json", "seed")}
    suite = make_suite(argparse.Namespace(**generic, no_cache=True))  # the protocol's own options stay its own
    out = args.out or str(suite.run_dir / "eval" / name)
    res = run_report(suite, [name], out, {name: paper_settings(args, name, False)},
                     "fovea " + " ".join(shlex.quote(a) for a in sys.argv[1:]), strict=True, paper_flat=True)
    if args.json:
        print(json.dumps(res[name]))
    else:
        for line in load_protocol(PAPER_PROTOCOLS[name]).summary(res[name]):
            print(line)
        print(f"[fovea] {name}: {out}/report.md (+ report.json)")
    return 0
