"""Average two toy edit transformers trained from one another (a "model soup": weights interpolated, in float32),
evaluate the result as ``train_edit.py`` evaluates a run, and optionally ship it as ``toy-edit``.

    python training/toy/average_edit.py --base qwennb/toy_edit_model/transformer \\
        --other /tmp/gs/toy_edit_run0/transformer --weight 0.5 --out training/toy/runs/edit-soup --ship

``--weight`` is the other model's share (0: the base, 1: the other). Both must have the same architecture (a run
started with ``--init`` from the other, as every toy edit run after the first): a fine-tuned model and the one it
started from lie in one basin, where the average keeps what each learnt. Session 12 (``EDIT.md``): edit-run9 and
edit-run11, half and half, chosen on a validation draw of held-out edits (``per_item_edits.py --seed 777``;
``--val-seed 777`` here scores that draw beside the evaluation, so that the share is chosen on it).
On a GPU when there is one (``--device``); on the 2-core CPU about six minutes (measured: 6 min 20 s, of which 3.5 min
evaluate 180 edits at 20 steps; with ``--val-seed`` about 2.5 min more).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_edit as te  # noqa: E402  (the toy edit pipeline, its evaluation and its shipping, as a run has them)


def average(
    base: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    weight: float,
    store: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """``(1 - weight) * base + weight * other`` for every tensor, computed in float32, rounded to ``store`` (the
    dtype ``toy-edit`` ships, so that what is evaluated is what ships) and given back in base's dtype.

    Example:
        >>> a, b = {"w": torch.zeros(2, dtype=torch.float16)}, {"w": torch.ones(2, dtype=torch.float16)}
        >>> average(a, b, 0.25)["w"].tolist()
        [0.25, 0.25]
    """
    if base.keys() != other.keys():
        missing = sorted(base.keys() ^ other.keys())[:3]
        raise SystemExit(
            f"the two transformers differ in their tensors (e.g. {missing}): not one architecture"
        )
    out = {}
    for name, a in base.items():
        b = other[name]
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shape {tuple(a.shape)} against {tuple(b.shape)}: not one architecture")
        out[name] = torch.lerp(a.float(), b.float().to(a.device), weight).to(store).to(a.dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base", required=True, help="transformer folder (e.g. qwennb/toy_edit_model/transformer)"
    )
    ap.add_argument("--other", required=True, help="transformer folder of a run trained from the base")
    ap.add_argument("--weight", type=float, default=0.5, help="the other model's share, 0 to 1")
    ap.add_argument("--out", required=True, help="folder for transformer/, RESULTS.md, results.json, samples")
    ap.add_argument(
        "--text-encoder", default=None, help="text encoder folder (default: the one toy-edit ships with)"
    )
    ap.add_argument("--eval-n", type=int, default=120, help="held-out edits to evaluate (0: none)")
    ap.add_argument("--eval-cfg", type=float, default=1.0)
    ap.add_argument(
        "--val-seed",
        type=int,
        default=0,
        help="also score a validation draw of held-out edits on these scenes (e.g. 777; 0: none), to choose a share "
        "on without looking at the evaluation's edits",
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    ap.add_argument("--ship", action="store_true", help="copy the average to qwennb/toy_edit_model")
    args = ap.parse_args(argv)
    if not 0 <= args.weight <= 1:
        ap.error(f"--weight {args.weight}: the other model's share, from 0 to 1")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(
            f"--device {args.device}: no CUDA GPU here (torch {torch.__version__}); --device cpu runs anywhere"
        )
    if args.val_seed == 4321:
        ap.error("--val-seed 4321 is the evaluation's own draw; a validation draw needs another seed")
    for folder in (args.base, args.other):
        if not (Path(folder) / "config.json").is_file():
            ap.error(f"{folder}: not a transformer folder (no config.json)")
    from diffusers import QwenImageTransformer2DModel

    other = QwenImageTransformer2DModel.from_pretrained(args.other).state_dict()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = te.build(Path(args.base), device, args.text_encoder)
    pipe.transformer.load_state_dict(average(pipe.transformer.state_dict(), other, args.weight))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.transformer.save_pretrained(out / "transformer")
    te.log(f"averaged: {1 - args.weight:g} x {args.base} + {args.weight:g} x {args.other}")
    if args.eval_n:
        t = time.time()
        report = {}
        if args.val_seed:
            val = te.evaluate(pipe, args.eval_n, out, args.eval_cfg, seed=args.val_seed, splits=("heldout",))
            report["validation"] = val["heldout"]
        report.update(te.evaluate(pipe, args.eval_n, out, args.eval_cfg))
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        te.write_results(
            out, report, [], args, {"device": name, "eval": round(time.time() - t, 1)}, "average_edit.py"
        )
    if args.ship:
        te.ship(pipe, args.text_encoder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
