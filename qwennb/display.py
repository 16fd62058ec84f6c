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


def timing_figure(result: GenerationResult) -> Any:
    """A matplotlib Figure: one bar per denoising step, text encoding and decoding apart, median marked."""
    from matplotlib.figure import Figure

    steps = result.step_times_s
    fig = Figure(figsize=(6.4, 2.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    n = len(steps)
    xs = list(range(1, n + 1))
    ax.bar(xs, steps, color="#4c72b0", label="denoising step")
    ax.bar(
        [0], [result.text_encoding_s], color="#dd8452", label=f"text encoding {result.text_encoding_s:.2f} s"
    )
    ax.bar([n + 1], [result.decode_s], color="#55a868", label=f"decode {result.decode_s:.2f} s")
    every = max(1, n // 10)
    ticks = [0, *[x for x in xs if x == 1 or x % every == 0], n + 1]
    ax.set_xticks(ticks, ["text", *[str(t) for t in ticks[1:-1]], "decode"], fontsize=8)
    if steps:
        med = statistics.median(steps)
        ax.axhline(med, color="#c44e52", linestyle="--", linewidth=1, label=f"median {med:.3f} s/step")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("seconds")
    state = " (stopped early)" if result.interrupted else ""
    ax.set_title(f"{result.model}: {len(steps)} steps, {result.total_s:.1f} s total{state}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
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
        + "<table><tr><th>component</th><th>placement</th><th>storage</th><th>GPU GiB</th><th>why</th></tr>"
        + rows
        + f"</table><ul>{reasons}{warnings}</ul></div>"
    )


def history_html(results: list[GenerationResult], thumb: int = 160) -> str:
    """A small gallery of results with their parameters."""
    if not results:
        return "<div>no generations yet</div>"
    cells = []
    for i, r in enumerate(results):
        img = (
            f'<img src="data:image/png;base64,{_b64(png_bytes(r.images[0], thumb))}" style="max-width:{thumb}px"/>'
            if r.images
            else "<div>(no image)</div>"
        )
        cells.append(
            f'<div style="display:inline-block;margin:4px;vertical-align:top;width:{thumb}px;font-size:smaller">'
            f"{img}<div>#{i} {html.escape(r.prompt[:60])}</div><div>{html.escape(r.caption())}</div></div>"
        )
    return "<div>" + "".join(cells) + "</div>"


def history_text(results: list[GenerationResult]) -> str:
    if not results:
        return "no generations yet"
    return "\n".join(f"#{i} {r.prompt[:60]!r}: {r.caption()}" for i, r in enumerate(results))


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
