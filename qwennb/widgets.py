"""The ipywidgets panel (``%qwen_ui``): prompt, sliders, presets, Generate and Stop, the image and its timing.

Nothing runs until Generate is pressed; sliders use ``continuous_update=False``. The generation runs in a
background thread so that the Stop button (and the kernel's other messages) are heard while it runs.

Example:
    >>> from qwennb.session import Session
    >>> from qwennb.widgets import QwenPanel
    >>> s = Session(); _ = s.load("tiny")
    >>> panel = QwenPanel(s)
    >>> panel.preset.value = "ultra-fast"
    >>> panel.steps.value, panel.cfg.value
    (12, 3.0)
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from .display import figure_png, png_bytes, progress_line, timing_figure
from .errors import QwennbError
from .generation import GenerationResult, StepInfo, StopSignal
from .presets import ASPECT_RATIOS, PRESETS, aspect_size
from .session import Session

CUSTOM = "(custom)"


class QwenPanel:
    """A widget panel bound to a :class:`Session`. ``panel.widget`` is what Jupyter shows."""

    def __init__(
        self, session: Session, save_dir: str | None = "outputs", embed_metadata: bool = True
    ) -> None:
        self.session = session
        self.save_dir = save_dir
        self.embed_metadata = embed_metadata
        plan = session.report.plan if session.report else None
        defaults = plan.defaults if plan else {"steps": 20, "cfg": 4.0, "width": 1024, "height": 1024}
        self._stand_in_side = (
            max(defaults["width"], defaults["height"]) if plan and plan.model == "tiny" else None
        )
        self.prompt = w.Textarea(
            placeholder="Describe the image...", layout=w.Layout(width="100%", height="70px")
        )
        self.negative = w.Text(placeholder="negative prompt (optional)", layout=w.Layout(width="100%"))
        self.steps = w.IntSlider(
            value=defaults["steps"], min=2, max=100, description="steps", continuous_update=False
        )
        self.cfg = w.FloatSlider(
            value=defaults["cfg"], min=1.0, max=10.0, step=0.5, description="CFG", continuous_update=False
        )
        self.preset = w.Dropdown(options=[CUSTOM, *PRESETS], value=CUSTOM, description="preset")
        self.seed = w.IntText(value=0, description="seed")
        self.randomize = w.Checkbox(value=True, description="random seed")
        self.aspect = w.Dropdown(options=list(ASPECT_RATIOS), value="1:1", description="aspect")
        self.enhance = w.Checkbox(value=False, description="enhance prompt")
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="")
        self.status = w.Label(value="ready")
        self.image = w.Image(format="png", layout=w.Layout(max_width="512px"))
        self.timing = w.Image(format="png", layout=w.Layout(max_width="640px"))
        self.last_result: GenerationResult | None = None
        self.last_error: str | None = None
        self.on_step_callbacks: list[Callable[[StepInfo], None]] = []
        self._stop = StopSignal()
        self._thread: threading.Thread | None = None
        self._moving = False

        self.preset.observe(self._on_preset, names="value")
        self.steps.observe(self._on_manual, names="value")
        self.cfg.observe(self._on_manual, names="value")
        self.generate_button.on_click(lambda _b: self.start())
        self.stop_button.on_click(lambda _b: self.request_stop())
        self.widget = w.VBox(
            [
                self.prompt,
                self.negative,
                w.HBox([self.steps, self.cfg]),
                w.HBox([self.preset, self.aspect]),
                w.HBox([self.seed, self.randomize, self.enhance]),
                w.HBox([self.generate_button, self.stop_button, self.progress, self.status]),
                self.image,
                self.timing,
            ]
        )
        self.widget.add_class("qwennb-panel")

    # ---- presets move the sliders; moving a slider by hand makes the preset "(custom)"
    def _on_preset(self, change: dict[str, Any]) -> None:
        if change["new"] == CUSTOM:
            return
        p = PRESETS[change["new"]]
        self._moving = True
        try:
            self.steps.value, self.cfg.value = p.steps, p.cfg
        finally:
            self._moving = False

    def _on_manual(self, change: dict[str, Any]) -> None:
        if not self._moving and self.preset.value != CUSTOM:
            p = PRESETS[self.preset.value]
            if (self.steps.value, self.cfg.value) != (p.steps, p.cfg):
                self.preset.value = CUSTOM

    # ---- running
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """What the Generate button does: start a generation in the background."""
        if self.running:
            return
        prompt = self.prompt.value.strip()
        if not prompt:
            self.status.value = "write a prompt first"
            return
        if self.randomize.value:
            self.seed.value = random.SystemRandom().randrange(0, 2**31)
        self.generate_button.disabled = True
        self.stop_button.disabled = False
        self.progress.value, self.progress.max = 0, self.steps.value
        self.status.value = "encoding the prompt..."
        self.last_error = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(prompt,), daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """What the Stop button does: end the run at its next step."""
        self._stop.set()
        self.status.value = "stopping at the next step..."

    def wait(self, timeout: float | None = 60) -> GenerationResult | None:
        """Block until the running generation ends (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.last_result

    def _on_step(self, s: StepInfo) -> None:
        self.progress.value = s.step
        self.status.value = progress_line(s.step, s.total, s.step_s, s.elapsed_s)
        for cb in self.on_step_callbacks:
            cb(s)

    def _run(self, prompt: str) -> None:
        try:
            original = None
            if self.enhance.value:
                from .enhance import enhance_prompt

                self.status.value = "enhancing the prompt..."
                e = enhance_prompt(prompt, pipe=self.session.require())
                prompt, original = e.enhanced, e.original
            width, height = aspect_size(self.aspect.value, self._stand_in_side)
            result = self.session.generate(
                prompt,
                negative_prompt=self.negative.value or None,
                steps=self.steps.value,
                cfg=self.cfg.value,
                seed=self.seed.value,
                width=width,
                height=height,
                on_step=self._on_step,
                stop=self._stop,
                original_prompt=original,
            )
            if result.images and self.save_dir:
                result.save(self.save_dir, embed_metadata=self.embed_metadata)
            self.last_result = result
            if result.images:
                self.image.value = png_bytes(result.images[0], 1024)
            self.timing.value = figure_png(timing_figure(result))
            self.status.value = result.caption()
        except QwennbError as exc:
            self.last_error = str(exc)
            self.status.value = f"error: {exc}"
        except Exception as exc:  # noqa: BLE001 - a panel must survive anything and say what happened
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.status.value = f"error: {self.last_error}"
        finally:
            self.generate_button.disabled = False
            self.stop_button.disabled = True


class BatchProgress:
    """Live progress of a batch run (``%qwen batch``): done/failed counts, ETA, images per minute, a strip
    of the latest thumbnails and a Stop button. Call it with each :class:`qwennb.batch.BatchEvent`.

    Example:
        >>> import tempfile
        >>> from qwennb.batch import run_batch
        >>> from qwennb.session import Session
        >>> from qwennb.widgets import BatchProgress
        >>> s = Session(); _ = s.load("tiny")
        >>> bp = BatchProgress()
        >>> r = run_batch(["a fox", "a cat"], tempfile.mkdtemp(), pipe=s.pipe, steps=2, size="64x64",
        ...               on_event=bp, stop=bp.stop)
        >>> bp.bar.value, bp.bar.max, len(bp.strip.children)
        (2, 2, 2)
    """

    def __init__(self, thumbs: int = 8, thumb_side: int = 96) -> None:
        self.stop = StopSignal()
        self.thumbs, self.thumb_side = thumbs, thumb_side
        self.bar = w.IntProgress(value=0, min=0, max=1, description="batch")
        self.status = w.Label(value="reading the prompts...")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop")
        self.stop_button.on_click(lambda _b: self.request_stop())
        self.strip = w.HBox([])
        self.problems = w.HTML(value="")
        self.result: Any = None
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        self.widget = w.VBox([w.HBox([self.bar, self.status, self.stop_button]), self.strip, self.problems])
        self.widget.add_class("qwennb-batch")

    def request_stop(self) -> None:
        """What the Stop button does: the items in flight end at their next step; the rest stays pending."""
        self.stop.set()
        self.status.value = "stopping: the items in flight end at their next step..."

    def __call__(self, e: Any) -> None:
        from .display import batch_status_line

        self.bar.max = max(1, e.total)
        self.bar.value = e.done + e.skipped + e.failed
        self.bar.bar_style = "danger" if e.failed else ("success" if e.kind == "end" else "")
        self.status.value = batch_status_line(e)
        if e.kind == "start" and e.problems:
            import html

            items = "".join(f"<li>{html.escape(p)}</li>" for p in e.problems[:20])
            more = f"<li>... and {len(e.problems) - 20} more</li>" if len(e.problems) > 20 else ""
            self.problems.value = f"<b>skipped lines</b><ul>{items}{more}</ul>"
        if e.kind == "item_done" and e.path:
            from PIL import Image

            try:
                with Image.open(e.path) as im:
                    data = png_bytes(im.convert("RGB"), self.thumb_side)
            except OSError:
                return
            img = w.Image(value=data, format="png", layout=w.Layout(width=f"{self.thumb_side}px"))
            self.strip.children = (*self.strip.children, img)[-self.thumbs :]
        if e.kind == "end":
            self.stop_button.disabled = True

    def start(self, run: Callable[..., Any], **kwargs: Any) -> BatchProgress:
        """Run ``run(on_event=self, stop=self.stop, **kwargs)`` in a thread (so Stop is heard); the outcome
        lands in ``result`` (or ``error``)."""

        def target() -> None:
            try:
                self.result = run(on_event=self, stop=self.stop, **kwargs)
            except QwennbError as exc:
                self.error = str(exc)
                self.status.value = f"error: {exc}"
            except Exception as exc:  # noqa: BLE001 - the widget must say what happened
                self.error = f"{type(exc).__name__}: {exc}"
                self.status.value = f"error: {self.error}"
            finally:
                self.stop_button.disabled = True

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Any:
        """Block until a run started with :meth:`start` ends; returns its result."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.result
