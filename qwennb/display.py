"""How results and plans look in a notebook: rich reprs, the per-step timing plot, the history gallery.

Nothing here imports IPython: objects expose ``_repr_mimebundle_``/``_repr_html_`` and Jupyter calls them.
Plots use a ``matplotlib.figure.Figure`` (no pyplot, no global state) rendered to PNG.

Example:
    >>> from qwennb.display import progress_line
    >>> progress_line(3, 8, 0.5, 1.5)
    'step 3/8 · 0.50 s/step · ETA 2.5 s'
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .generation import GenerationResult
    from .plan import Plan


def png_bytes(image: Any, max_side: int | None = None) -> bytes:
    """A PIL image as PNG bytes, optionally shrunk so its long side is ``max_side``."""
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def progress_line(step: int, total: int, step_s: float, elapsed_s: float) -> str:
    """One line of live progress: step i/N, seconds per step, time left."""
    eta = elapsed_s / step * (total - step) if step else 0.0
    return f"step {step}/{total} · {step_s:.2f} s/step · ETA {eta:.1f} s"


def _step_ticks(n: int, max_labels: int = 10, axis_px: float = 520.0) -> list[int]:
    """Step numbers to label: 1, then every k-th, leaving room before "decode" (at n + 1) and after "text"
    (at 0) so that no two labels touch on the timing plot's axis (about ``axis_px`` pixels wide).

    Example:
        >>> _step_ticks(50)
        [5, 10, 15, 20, 25, 30, 35, 40, 45]
        >>> _step_ticks(4)
        [1, 2, 3, 4]
    """
    every = max(1, -(-n // max_labels))
    px_per_step = axis_px / (n + 2.6)  # bars from -0.4 to n + 1.4, plus matplotlib's margins
    left = math.ceil(24 / px_per_step)  # half of "text" and of a number, and a little air
    right = math.ceil(34 / px_per_step)  # half of "decode" and of a number, and a little air
    ticks = [x for x in range(1, n + 1) if x == 1 or x % every == 0]
    return [x for x in ticks if x >= left and n + 1 - x >= right]


def timing_figure(result: GenerationResult) -> Any:
    """A matplotlib Figure: one bar per denoising step, text encoding and decoding apart, median marked.

    The legend sits below the axes (never over a bar) and the step labels leave room for "text" and
    "decode".
    """
    from matplotlib.figure import Figure

    steps = result.step_times_s
    fig = Figure(figsize=(6.4, 3.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    n = len(steps)
    xs = list(range(1, n + 1))
    ax.bar(xs, steps, color="#4c72b0", label="denoising step")
    ax.bar(
        [0], [result.text_encoding_s], color="#dd8452", label=f"text encoding {result.text_encoding_s:.2f} s"
    )
    ax.bar([n + 1], [result.decode_s], color="#55a868", label=f"decode {result.decode_s:.2f} s")
    ticks = [0, *_step_ticks(n), n + 1]
    ax.set_xticks(ticks, ["text", *[str(t) for t in ticks[1:-1]], "decode"], fontsize=8)
    if steps:
        med = statistics.median(steps)
        ax.axhline(med, color="#c44e52", linestyle="--", linewidth=1, label=f"median {med:.3f} s/step")
    ax.set_xlabel("denoising step", fontsize=8)
    ax.set_ylabel("seconds")
    state = " (stopped early)" if result.interrupted else ""
    ax.set_title(f"{result.model}: {len(steps)} steps, {result.total_s:.1f} s total{state}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def result_html(result: GenerationResult, plot: bool = True, max_side: int = 512) -> str:
    """Images with their caption, then the timing plot, as one HTML fragment."""
    parts = ['<div class="qwennb-result">']
    for i, im in enumerate(result.images):
        alt = html.escape(f"{result.prompt[:80]} (seed {result.seed}, image {i + 1})")
        parts.append(
            f'<img src="data:image/png;base64,{_b64(png_bytes(im, max_side))}" alt="{alt}" '
            f'style="max-width:{max_side}px;margin:2px"/>'
        )
    if result.original_prompt and result.original_prompt != result.prompt:
        parts.append(
            '<table style="font-size:smaller"><tr><th>original</th><th>used</th></tr>'
            f"<tr><td>{html.escape(result.original_prompt)}</td><td>{html.escape(result.prompt)}</td></tr></table>"
        )
    parts.append(
        f'<div style="font-family:monospace;font-size:smaller">{html.escape(result.caption())}</div>'
    )
    for n in result.notices:
        parts.append(f'<div style="font-size:smaller;color:#a60">{html.escape(n)}</div>')
    if result.paths:
        parts.append(f'<div style="font-size:smaller">saved: {html.escape(", ".join(result.paths))}</div>')
    if plot and result.step_times_s:
        png = figure_png(timing_figure(result))
        parts.append(
            f'<img class="qwennb-timing" src="data:image/png;base64,{_b64(png)}" alt="per-step timing"/>'
        )
    parts.append("</div>")
    return "".join(parts)


def result_text(result: GenerationResult) -> str:
    lines = [result.caption()]
    lines += [f"note: {n}" for n in result.notices]
    lines += [f"saved: {p}" for p in result.paths]
    return "\n".join(lines)


def plan_text(plan: Plan) -> str:
    """The plan as a small text table: the arrangement, predicted time and where it goes, one row per component,
    then the reasons and what was assumed.

    Example:
        >>> from qwennb.plan import describe_machine, make_plan
        >>> plan_text(make_plan(describe_machine(80, compute_capability="9.0"), "qwen-image")).splitlines()[3][:9]
        'predicted'
    """
    lines = [
        f"model   {plan.model}"
        + (f" ({plan.hub_id})" if plan.hub_id else "")
        + (f" from {plan.source}" if plan.source else ""),
        f"device  {plan.device}"
        + (f": {plan.gpu_name}, {plan.gpu_memory_gb:.1f} GiB" if plan.gpu_name else ""),
        f"plan    {plan.arrangement}; dtype {plan.dtype}; est. peak {plan.estimated_peak_gpu_gb:.1f} GiB GPU"
        + (f" of {plan.budget_gb:.1f} usable" if plan.budget_gb else "")
        + f", {plan.estimated_host_ram_gb:.1f} GiB host",
    ]
    d = plan.defaults
    if plan.predicted_s_per_image is not None and plan.estimated_s_per_step is not None:
        split = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in plan.time_split.items() if v)
        lines.append(
            f"predicted {plan.predicted_s_per_image:.1f} s an image ({d['steps']} steps at {plan.estimated_s_per_step:.2f} s; "
            f"{split})" + (f"; load about {plan.estimated_load_s:.0f} s" if plan.estimated_load_s else "")
        )
    lines.append(f"defaults {d['steps']} steps, CFG {d['cfg']}, {d['width']}x{d['height']}")
    lines.append("")
    lines.append(f"{'component':<13}{'placement':<29}{'storage':<15}{'GPU GiB':>8}{'stream/step':>12}  why")
    for name, c in plan.components.items():
        place = c.placement + (f" ({c.resident_blocks} resident)" if c.resident_blocks is not None else "")
        lines.append(
            f"{name:<13}{place:<29}{c.quantization or c.storage_dtype:<15}{c.gpu_gb:>8.2f}"
            f"{c.streamed_gb_per_step:>12.2f}  {c.reason}"
        )
    lines.append("")
    lines += [f"- {r}" for r in plan.reasons]
    lines += [f"! {w}" for w in plan.warnings]
    if plan.assumptions:
        lines.append("assumed: " + "; ".join(plan.assumptions))
    return "\n".join(lines)


def plan_html(plan: Plan) -> str:
    """The plan as a small HTML table with its reasons."""
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(c.placement)}"
        + (f" ({c.resident_blocks} resident)" if c.resident_blocks is not None else "")
        + f"</td><td>{html.escape(c.quantization or c.storage_dtype)}</td><td>{c.gpu_gb:.2f}</td>"
        f"<td>{html.escape(c.reason)}</td></tr>"
        for n, c in plan.components.items()
    )
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in plan.reasons)
    warnings = "".join(f'<li style="color:#a60">{html.escape(w)}</li>' for w in plan.warnings)
    return (
        f"<div><b>{html.escape(plan.arrangement)}</b> · {plan.dtype} · est. peak {plan.estimated_peak_gpu_gb:.1f} GiB"
        + (f" of {plan.budget_gb:.1f}" if plan.budget_gb else "")
        + (
            f" · predicted {plan.predicted_s_per_image:.1f} s an image"
            if getattr(plan, "predicted_s_per_image", None) is not None
            else ""
        )
        + "<table><tr><th>component</th><th>placement</th><th>storage</th><th>GPU GiB</th><th>why</th></tr>"
        + rows
        + f"</table><ul>{reasons}{warnings}</ul></div>"
    )


def shorten(text: str, width: int = 60) -> str:
    """``text`` on one line, cut at a word boundary with an ellipsis when longer than ``width``.

    Example:
        >>> shorten("a red fox reading a newspaper in a cafe", 20)
        'a red fox reading a…'
        >>> shorten("a red fox", 20)
        'a red fox'
    """
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    if " " in cut and text[width - 1] != " ":
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:.") + "…"


def progress_html(text: str, preview: Any = None, size: int = 128) -> str:
    """The progress line with a small preview image of the current estimate beside it."""
    img = ""
    if preview is not None:
        im = preview.resize((size, round(size * preview.height / preview.width)))
        img = (
            f'<img class="qwennb-preview" src="data:image/png;base64,{_b64(png_bytes(im))}" '
            f'alt="preview" style="image-rendering:pixelated;vertical-align:middle;margin-right:8px"/>'
        )
    return f'<div class="qwennb-progress">{img}<span style="font-family:monospace">{html.escape(text)}</span></div>'


def history_html(results: list[GenerationResult], thumb: int = 160) -> str:
    """A grid of thumbnails, each with its number, prompt (shortened) and parameters."""
    if not results:
        return "<div>no generations yet</div>"
    cells = []
    for i, r in enumerate(results):
        img = (
            f'<img src="data:image/png;base64,{_b64(png_bytes(r.images[0], thumb))}" style="max-width:{thumb}px"/>'
            if r.images
            else f'<div style="width:{thumb}px;height:{thumb // 2}px;color:#888">(no image)</div>'
        )
        cells.append(
            f'<div class="qwennb-history-entry" title="{html.escape(r.prompt)}" style="display:inline-block;'
            f'margin:4px;vertical-align:top;width:{thumb}px;font-size:smaller">'
            f"{img}<div><b>#{i}</b> {html.escape(shorten(r.prompt, 60))}</div><div>{html.escape(r.caption())}</div></div>"
        )
    return '<div class="qwennb-history">' + "".join(cells) + "</div>"


def history_text(results: list[GenerationResult]) -> str:
    """One line per entry: number, prompt (shortened at a word, with an ellipsis) and parameters."""
    if not results:
        return "no generations yet"
    return "\n".join(f"#{i} {shorten(r.prompt, 60)!r}: {r.caption()}" for i, r in enumerate(results))


def sweep_html(sweep: Any, max_side: int = 1024) -> str:
    """A sweep's grid image with its axes, each cell's time and where it was saved."""
    rows, cols = sweep.shape
    parts = [
        '<div class="qwennb-sweep">',
        f'<img src="data:image/png;base64,{_b64(png_bytes(sweep.grid, max_side))}" alt="sweep grid"/>',
        f'<div style="font-family:monospace;font-size:smaller">{html.escape(sweep_text(sweep))}</div>',
        "</div>",
    ]
    return "".join(parts)


def sweep_text(sweep: Any) -> str:
    rows, cols = sweep.shape
    axes = " × ".join(
        f"{k}={','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
        for k, vs in sweep.axes.items()
    )
    lines = [f"sweep {rows}x{cols} over {axes}: {len(sweep.results)} images in {sweep.total_s:.1f} s"]
    for c in sweep.cells:
        vals = ", ".join(f"{k}={v}" for k, v in c.values.items())
        seed = f" seed {c.result.seed}" if c.result is not None else " (not run)"
        lines.append(f"  [{c.row},{c.col}] {vals}:{seed} {c.seconds:.1f} s")
    if sweep.path:
        lines.append(f"saved: {sweep.path}")
    return "\n".join(lines)


def mimebundle(obj: Any) -> dict[str, str]:
    """The notebook's rich form of a core object (results, sweeps, plans, load reports).

    The core's ``_repr_mimebundle_`` methods reach this through ``qwennb._render``, so the core never imports
    this module.
    """
    kind = type(obj).__name__
    if kind == "GenerationResult":
        return {"text/plain": result_text(obj), "text/html": result_html(obj)}
    if kind == "SweepResult":
        return {"text/plain": sweep_text(obj), "text/html": sweep_html(obj)}
    if kind == "Plan":
        return {"text/plain": obj.table(), "text/html": plan_html(obj)}
    if kind == "LoadReport":
        return {"text/plain": obj.text(), "text/html": load_report_html(obj)}
    return {"text/plain": repr(obj)}


def load_report_html(report: Any) -> str:
    """The banner after loading: card, model, load time, any notice, then the plan."""
    note = (
        f'<div style="color:#a60;font-weight:bold">{html.escape(report.notice)}</div>'
        if report.notice
        else ""
    )
    g = report.hardware.best_gpu
    card = f"{g.name}, {g.total_memory_gb:.1f} GiB" if g else f"no GPU ({report.hardware.cpu_count} CPUs)"
    if report.background:
        done = (
            f"loading <b>{html.escape(report.model)}</b> in the background (the next cells run meanwhile; "
            "qwennb's commands wait for it)"
        )
    else:
        done = f"loaded <b>{html.escape(report.model)}</b> in {report.seconds:.1f} s"
    head = f"<div><b>qwennb</b> · {html.escape(card)} · {done}</div>"
    return head + note + plan_html(report.plan)


def batch_status_line(e: Any) -> str:
    """One line for a batch progress event: counts, images per minute, time left.

    Example:
        >>> from qwennb.batch import BatchEvent
        >>> batch_status_line(BatchEvent("item_done", 10, 3, 2, 1, 2, 60.0))
        '6/10 · 3 made, 2 already done, 1 failed · 3.0 images/min · ETA 1 min 20 s'
    """
    finished = e.done + e.skipped + e.failed
    parts = [f"{finished}/{e.total}", f"{e.done} made, {e.skipped} already done, {e.failed} failed"]
    if e.images_per_min:
        parts.append(f"{e.images_per_min:.1f} images/min")
    eta = e.eta_s
    if eta is not None and e.kind != "end":
        m, s = divmod(int(round(eta)), 60)
        parts.append(f"ETA {m} min {s} s" if m else f"ETA {s} s")
    if e.kind == "end":
        parts.append("finished")
    elif e.kind == "stopping":
        parts.append("stopping")
    return " · ".join(parts)


def batch_html(result: Any) -> str:
    """A batch run's summary with its contact sheet (for ``%qwen batch``)."""
    body = f"<pre>{html.escape(result.summary())}</pre>"
    if result.contact_sheet_png:
        with open(result.contact_sheet_png, "rb") as f:
            body += f'<img src="data:image/png;base64,{_b64(f.read())}" style="max-width:100%">'
    return body
