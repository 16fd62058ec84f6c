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

import html
import random
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from .display import figure_png, png_bytes, progress_line, shorten, timing_figure
from .errors import QwennbError
from .generation import GenerationResult, StepInfo, StopSignal, is_busy
from .options import validate_generate_options
from .presets import ASPECT_RATIOS, PRESETS, aspect_size
from .session import Session

CUSTOM = "(custom)"


class QwenPanel:
    """A widget panel bound to a :class:`Session`. ``panel.widget`` is what Jupyter shows."""

    def __init__(
        self,
        session: Session,
        save_dir: str | None = "outputs",
        embed_metadata: bool = True,
        model: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.session = session
        self.save_dir = save_dir
        self.embed_metadata = embed_metadata
        # With no model loaded yet, the panel shows the plan's defaults and loads ``model`` at the first
        # Generate, after its options are checked: a bad option never costs a load.
        self.model, self.overrides = model, overrides
        plan = session.report.plan if session.report else session.plan_for(model, overrides)
        defaults = plan.defaults if plan else {"steps": 20, "cfg": 4.0, "width": 1024, "height": 1024}
        self._stand_in_side = (
            max(defaults["width"], defaults["height"]) if plan and plan.model in ("tiny", "toy") else None
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
        self.preview = w.Checkbox(value=True, description="live preview")
        self.compare_button = w.Button(
            description="Keep to compare",
            icon="columns",
            disabled=True,
            tooltip="pin this image beside the next",
        )
        self.progress = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="240px"))
        # Its own line, wrapping: a long message (an error, a caption) is never cut or squeezes the bar.
        self.status = w.HTML(value="ready", layout=w.Layout(width="100%"))
        self.status.add_class("qwennb-status")
        # Images stay hidden until they have something to show (an empty Image is a broken-image icon).
        self.image = w.Image(format="png", layout=w.Layout(max_width="512px", display="none"))
        self.timing = w.Image(format="png", layout=w.Layout(max_width="640px", display="none"))
        self.compare = w.HBox([], layout=w.Layout(flex_flow="row wrap", display="none"))
        self.image.add_class("qwennb-image")
        self.progress.add_class("qwennb-progress-bar")
        self.timing.add_class("qwennb-timing-plot")
        self.kept: list[GenerationResult] = []
        self.last_result: GenerationResult | None = None
        self.last_error: str | None = None
        self.on_step_callbacks: list[Callable[[StepInfo], None]] = []
        self._stop = StopSignal()
        self._thread: threading.Thread | None = None
        self._moving = False
        self.previews_shown = 0

        self.preset.observe(self._on_preset, names="value")
        self.steps.observe(self._on_manual, names="value")
        self.cfg.observe(self._on_manual, names="value")
        self.generate_button.on_click(lambda _b: self.start())
        self.stop_button.on_click(lambda _b: self.request_stop())
        self.compare_button.on_click(lambda _b: self.keep())
        self.widget = w.VBox(
            [
                self.prompt,
                self.negative,
                w.HBox([self.steps, self.cfg]),
                w.HBox([self.preset, self.aspect]),
                w.HBox([self.seed, self.randomize, self.enhance, self.preview]),
                w.HBox([self.generate_button, self.stop_button, self.compare_button, self.progress]),
                self.status,
                self.image,
                self.timing,
                self.compare,
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

    def _set_status(self, text: str) -> None:
        self.status.value = html.escape(text)

    def _show(self, widget: Any, value: bytes | None) -> None:
        if value is None:
            widget.layout.display = "none"
        else:
            widget.value = value
            widget.layout.display = ""

    def options(self) -> dict[str, Any]:
        """The panel's options, checked (``QwennbError`` on a bad one) before anything runs."""
        width, height = aspect_size(self.aspect.value, self._stand_in_side)
        return validate_generate_options(
            {
                "prompt": self.prompt.value.strip(),
                "negative_prompt": self.negative.value or None,
                "steps": self.steps.value,
                "cfg": self.cfg.value,
                "seed": None if self.randomize.value else self.seed.value,
                "width": width,
                "height": height,
            }
        )

    def start(self) -> None:
        """What the Generate button does: check the options, then generate in the background."""
        if self.running:
            return
        if not self.prompt.value.strip():
            self._set_status("write a prompt first")
            return
        try:
            self.options()
        except QwennbError as exc:
            self.last_error = str(exc)
            self._set_status(f"error: {exc}")
            return
        prompt = self.prompt.value.strip()
        if self.randomize.value:
            self.seed.value = random.SystemRandom().randrange(0, 2**31)
        self.generate_button.disabled = True
        self.stop_button.disabled = False
        self.compare_button.disabled = True
        self.progress.value, self.progress.max = 0, self.steps.value
        busy = self.session.pipe is not None and is_busy(self.session.pipe)
        self._set_status("waiting for the running generation to end..." if busy else "encoding the prompt...")
        # The last run's image and plot go while this one runs (the live preview takes the image's place).
        self._show(self.image, None)
        self._show(self.timing, None)
        self.last_error = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(prompt,), daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """What the Stop button does: end the run at its next step."""
        self._stop.set()
        self._set_status("stopping at the next step...")

    def wait(self, timeout: float | None = 60) -> GenerationResult | None:
        """Block until the running generation ends (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.last_result

    def _on_step(self, s: StepInfo) -> None:
        self.progress.value = s.step
        self._set_status(progress_line(s.step, s.total, s.step_s, s.elapsed_s))
        if s.preview is not None:
            side = 256
            im = s.preview.resize((side, round(side * s.preview.height / s.preview.width)))
            self._show(self.image, png_bytes(im))
            self.previews_shown += 1
        for cb in self.on_step_callbacks:
            cb(s)

    def keep(self) -> None:
        """What "Keep to compare" does: pin the last image (with its parameters) in the row below."""
        r = self.last_result
        if r is None or not r.images:
            return
        self.kept = [*self.kept, r][-6:]
        items = []
        for k in self.kept:
            cap = w.HTML(
                f'<div style="font-size:smaller;width:192px">{html.escape(shorten(k.prompt, 50))}<br>'
                f"{html.escape(k.caption())}</div>"
            )
            items.append(w.VBox([w.Image(value=png_bytes(k.images[0], 192), format="png"), cap]))
        self.compare.children = items
        self.compare.layout.display = ""

    def load_params(self, params: dict[str, Any], image: Any = None) -> None:
        """Fill the panel from a result's parameters (``%qwen history panel N``); shows its image."""
        self.prompt.value = params.get("prompt", "")
        neg = params.get("negative_prompt")
        self.negative.value = "" if neg in (None, " ") else neg
        self.preset.value = CUSTOM
        if params.get("steps") is not None:
            self.steps.value = params["steps"]
        if params.get("cfg") is not None:
            self.cfg.value = params["cfg"]
        if params.get("seed") is not None:
            self.randomize.value = False
            self.seed.value = params["seed"]
        self._show(self.image, png_bytes(image, 1024) if image is not None else None)
        self._show(self.timing, None)
        self._set_status(
            f"loaded from the history: seed {params.get('seed')}; press Generate to run it again"
        )

    def _run(self, prompt: str) -> None:
        try:
            original = None
            if not self.session.loaded:
                self._set_status("loading the model...")
                self.session.load(self.model, self.overrides)
            if self.enhance.value:
                from .enhance import enhance_prompt

                self._set_status("enhancing the prompt...")
                e = enhance_prompt(prompt, pipe=self.session.require())
                prompt, original = e.enhanced, e.original
            width, height = aspect_size(self.aspect.value, self._stand_in_side)
            # A cell running on the same pipeline makes this wait its turn (Session.generate holds a lock).
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
                preview=bool(self.preview.value),
            )
            self.last_result = result
            self._show(self.image, png_bytes(result.images[0], 1024) if result.images else None)
            self._show(self.timing, figure_png(timing_figure(result)))
            self._set_status(result.caption())
            if result.images and self.save_dir:
                try:
                    result.save(self.save_dir, embed_metadata=self.embed_metadata)
                except (OSError, QwennbError) as exc:
                    index = len(self.session.history) - 1
                    self.last_error = (
                        f"could not save to {self.save_dir} ({getattr(exc, 'strerror', None) or exc}); the image "
                        f"is shown and kept as %qwen history entry #{index}: save it with %qwen save {index} FOLDER"
                    )
                    self._set_status(f"{result.caption()} · error: {self.last_error}")
        except QwennbError as exc:
            self.last_error = str(exc)
            self._set_status(f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - a panel must survive anything and say what happened
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._set_status(f"error: {self.last_error}")
        finally:
            self.generate_button.disabled = False
            self.stop_button.disabled = True
            self.compare_button.disabled = self.last_result is None or not self.last_result.images


def history_widget(
    results: list[GenerationResult],
    on_regenerate: Callable[[int], Any] | None = None,
    on_panel: Callable[[int], Any] | None = None,
    thumb: int = 160,
) -> w.VBox:
    """The history as a grid of thumbnails with their parameters, each with "Regenerate" and "To panel" buttons.

    What a button returns is shown in the output area under the grid.
    """
    out = w.Output()
    cells = []
    for i, r in enumerate(results):
        parts: list[Any] = []
        if r.images:
            parts.append(
                w.Image(
                    value=png_bytes(r.images[0], thumb), format="png", layout=w.Layout(width=f"{thumb}px")
                )
            )
        else:
            parts.append(w.HTML("<div style='color:#888'>(no image)</div>"))
        parts.append(
            w.HTML(
                f'<div style="font-size:smaller;line-height:1.3" title="{html.escape(r.prompt)}"><b>#{i}</b> '
                f"{html.escape(shorten(r.prompt, 60))}<br>{html.escape(r.caption())}</div>"
            )
        )
        buttons = []
        for label, fn, icon in (("Regenerate", on_regenerate, "repeat"), ("To panel", on_panel, "sliders")):
            b = w.Button(description=label, icon=icon, layout=w.Layout(width=f"{thumb // 2 - 2}px"))
            b.add_class(f"qwennb-history-{label.lower().replace(' ', '-')}")

            def click(_b: Any, fn: Any = fn, i: int = i) -> None:
                if fn is None:
                    return
                with out:
                    from IPython.display import display

                    shown = fn(i)
                    if shown is not None:
                        display(shown)

            b.on_click(click)
            b.disabled = fn is None
            buttons.append(b)
        parts.append(w.HBox(buttons))
        cells.append(w.VBox(parts, layout=w.Layout(width=f"{thumb + 8}px", margin="4px")))
    grid = w.HBox(cells, layout=w.Layout(flex_flow="row wrap"))
    box = w.VBox([grid, out])
    box.add_class("qwennb-history")
    box.output = out  # type: ignore[attr-defined]
    return box
