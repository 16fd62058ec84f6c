"""What the live latent preview costs: seconds per step with ``preview=True`` against ``preview=False``.

Target (#15): at most 3% of a step on the GPU (H200: +0.18%, results/preview-nvidia-h200.md). Rerun on
a CUDA machine with one 80 GB card:

    python benchmarks/preview_overhead.py --out benchmarks/results

It loads ``qwen-image-synthetic`` (full-size, random weights) as the plan says, then alternates runs with and
without the preview (same prompt, seed and size), and records the median s/step of each and the overhead in %.
The preview (``qwennb.preview``) is a clone of the latents, a flow-matching x0 estimate and one
``(H/8 * W/8) x 16 x 3`` matrix product every 2 steps, copied to the host as an 8-bit image.

``--smoke`` runs the same loop on the tiny stand-in on the CPU in seconds (to check that the script works; its
numbers say nothing about a GPU). Writes ``preview-<card>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script only)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for preview-<card>.json/.md")
    args = ap.parse_args(argv)

    import torch

    from qwennb.session import Session

    model = "tiny" if args.smoke else "qwen-image-synthetic"
    size = 128 if args.smoke else args.size
    steps = 6 if args.smoke else args.steps
    s = Session()
    s.load(model)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kw = {"steps": steps, "width": size, "height": size, "seed": 1, "cfg": 4.0}
    s.generate("warm-up", **kw)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    shown = []
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            r = s.generate(
                "a lighthouse at dusk",
                preview=mode == "on",
                on_step=lambda i: shown.append(i.preview is not None),
                **kw,
            )
            runs[mode].extend(r.step_times_s[1:])  # the first step carries no preview and some start-up
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    result = {
        "card": card,
        "model": model,
        "size": size,
        "steps": steps,
        "s_per_step_off": off,
        "s_per_step_on": on,
        "overhead_pct": 100 * (on - off) / off,
        "previews_made": sum(shown),
        "smoke": args.smoke,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "preview-" + card.lower().replace(" ", "-")
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        (out / f"{name}.md").write_text(
            f"| card | model | size | steps | s/step off | s/step on | overhead |\n|---|---|---|---|---|---|---|\n"
            f"| {card} | {model} | {size} | {steps} | {off:.4f} | {on:.4f} | {result['overhead_pct']:+.1f}% |\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
