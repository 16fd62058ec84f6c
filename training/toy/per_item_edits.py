"""Each held-out edit of the toy edit model, one JSON line apiece: the instruction, what it asked for, what the image
reads as. Where ``train_edit.py``'s evaluation gives shares per kind, this says which phrasings fail.

    python training/toy/per_item_edits.py --kinds colour,shape > edit-items.jsonl

Runs on the CPU in about a minute for the 48 recolours and reshapes of the 120 held-out edits (10 steps, CFG 1:
``toy-edit``'s defaults). Session 11's reading of edit-run9: ``runs/edit-run9-heldout-colour-shape-items.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from qwennb import toy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-edit", help="registry name or folder of the edit model")
    ap.add_argument("--kinds", default=",".join(toy.EDIT_KINDS), help="edit kinds to run, comma-separated")
    ap.add_argument("--n", type=int, default=120, help="size of the held-out set the items are drawn from")
    ap.add_argument("--split", default="heldout", choices=("heldout", "train", "train+"), help="phrasings")
    ap.add_argument(
        "--seed",
        type=int,
        default=4321,
        help="the draw of scenes (4321: the evaluation's; another: a validation draw)",
    )
    args = ap.parse_args(argv)
    kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
    unknown = kinds - set(toy.EDIT_KINDS)
    if unknown:
        ap.error(f"unknown edit kinds {sorted(unknown)}; the kinds: {', '.join(toy.EDIT_KINDS)}")
    from qwennb.edit import edit, plan_edit  # after the options are checked: these import torch and diffusers
    from qwennb.pipeline import build
    from qwennb.plan import describe_machine

    pipe = build(plan_edit(describe_machine(host_ram_gb=16), args.model))
    pipe.set_progress_bar_config(disable=True)
    items = toy.edit_eval_set(args.n, seed=args.seed, sizes=((256, 256), (128, 128)), split=args.split)
    t = time.time()
    missed = done = 0
    for it in items:
        if it.kind not in kinds:
            continue
        source = toy.render(it.source, it.width, it.height)
        res = edit(
            pipe, [source], it.instruction, seed=it.seed, width=it.width, height=it.height,
            reference_area=it.width * it.height,
        )  # fmt: skip
        score = toy.score_edits([it], [res.images[0]])["all"]
        read = toy.read_image(res.images[0]).attributes()
        row = {
            "kind": it.kind,
            "lang": it.lang,
            "instruction": it.instruction,
            "was": getattr(it.source, it.kind),
            "asked": getattr(it.target, it.kind),
            "reads": read.get(it.kind),
            "changed": score["changed"],
            "kept": score["kept"],
            "size": it.width,
        }
        print(json.dumps(row, ensure_ascii=False), flush=True)
        done += 1
        missed += score["changed"] < 1
    print(f"{done} edits, {missed} without the asked-for change, {time.time() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
