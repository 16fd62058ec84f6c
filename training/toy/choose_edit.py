"""Score candidate toy edit transformers on validation draws of held-out edits at ``toy-edit``'s defaults (10 steps,
CFG 1), so that the one to ship is chosen without looking at the evaluation's draw (seed 4321, refused here).

    python training/toy/choose_edit.py qwennb/toy_edit_model/transformer /tmp/run18/transformer \\
        --seeds 778 779 --out /tmp/choose.json

Each candidate is a transformer folder (a run's ``transformer/`` or an ``average_edit.py`` output), put into the
toy edit pipeline beside the shipped VAE and text encoder. On the 2-core CPU about 2.5 minutes a candidate and draw
(120 edits at 10 steps). Prints a markdown table: each draw's changed / kept / right, their pooled share, and the
pooled share changed by edit kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qwennb import toy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_edit as te  # noqa: E402  (how the evaluation carries out an edit, shared)

EVALUATION_SEED = 4321  # the draw the shipped model is reported on; never chosen on


def score(transformer: Path, seeds: list[int], n: int, steps: int, cfg: float) -> dict:
    """Each draw's scores (``toy.score_edits``) for one candidate, and the items' pooled scores."""
    from qwennb.toy_edit import assemble_toy_edit

    pipe = assemble_toy_edit(init_transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    out: dict = {"draws": {}}
    every_item, every_image = [], []
    for seed in seeds:
        items = toy.edit_eval_set(n, seed=seed, sizes=((256, 256), (128, 128)), split="heldout")
        t = time.time()
        images = te.run_edits(pipe, items, steps, cfg)
        out["draws"][seed] = toy.score_edits(items, images)
        out["draws"][seed]["seconds"] = round(time.time() - t, 1)
        every_item += items
        every_image += images
    out["pooled"] = toy.score_edits(every_item, every_image)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidates", nargs="+", help="transformer folders (each with config.json)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[778], help="validation draws of held-out scenes")
    ap.add_argument("--n", type=int, default=120, help="edits a draw")
    ap.add_argument("--steps", type=int, default=10, help="toy-edit's default: 10")
    ap.add_argument("--cfg", type=float, default=1.0, help="toy-edit's default: 1")
    ap.add_argument("--out", help="write every score here as JSON")
    args = ap.parse_args(argv)
    if EVALUATION_SEED in args.seeds:
        ap.error(
            f"seed {EVALUATION_SEED} is the evaluation's draw: choose on other draws, report on that one"
        )
    missing = [c for c in args.candidates if not (Path(c) / "config.json").is_file()]
    if missing:
        ap.error(f"not a transformer folder (no config.json): {', '.join(missing)}")
    results = {}
    for c in args.candidates:
        results[c] = score(Path(c), args.seeds, args.n, args.steps, args.cfg)
        print(f"{c}: {json.dumps(results[c]['pooled']['all'])}", file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    head = " | ".join(f"draw {s}: changed / kept / right" for s in args.seeds)
    print(f"| candidate | {head} | pooled: changed / kept / right | pooled changed by kind |")
    print("| --- " * (len(args.seeds) + 3) + "|")
    for c, r in results.items():
        cells = [
            " / ".join(f"{r['draws'][s]['all'][m]:.3f}" for m in ("changed", "kept", "right"))
            for s in args.seeds
        ]
        pooled = " / ".join(f"{r['pooled']['all'][m]:.3f}" for m in ("changed", "kept", "right"))
        kinds = ", ".join(f"{k} {r['pooled'][k]['changed']:.2f}" for k in toy.EDIT_KINDS if k in r["pooled"])
        print(f"| {c} | {' | '.join(cells)} | {pooled} | {kinds} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
