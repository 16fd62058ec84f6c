"""The ipywidgets panel (``%qwen_ui``): prompt, sliders, presets, Generate and Stop, the image and its timing.

Nothing runs until Generate is pressed; sliders use ``continuous_update=False``. The generation runs in a
background thread so that the Stop button (and the kernel's other messages) are heard while it runs. An input
image (an upload or the last result) turns Generate into image-to-image, and a mask painted over it in the
browser (:class:`MaskPainter`) into inpainting.

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

import anywidget
import ipywidgets as w
import traitlets

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
        # The LoRA row: a file, folder or hub id to add; the loaded LoRAs; the picked one's scale.
        self.lora_source = w.Text(placeholder="LoRA: .safetensors file, folder or hub id", description="LoRA")
        self.lora_add_button = w.Button(description="Add", icon="plus")
        self.lora_pick = w.Dropdown(options=[], description="loaded")
        self.lora_scale = w.FloatSlider(
            value=1.0, min=0.0, max=2.0, step=0.05, description="scale", continuous_update=False
        )
        self.lora_remove_button = w.Button(description="Remove", icon="trash")
        self.lora_status = w.Label(value="")
        # The image input: an upload or the last result. With one, Generate runs image-to-image at ``strength``
        # (the output takes the input's size); with a mask painted over it, inpainting.
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload image")
        self.use_last_button = w.Button(description="Use last result", icon="arrow-up")
        self.clear_input_button = w.Button(description="Clear image", icon="times", disabled=True)
        self.input_thumb = w.Image(format="png", layout=w.Layout(max_width="96px", display="none"))
        self.input_thumb.add_class("qwennb-input-thumb")
        self.strength = w.FloatSlider(
            value=0.6,
            min=0.05,
            max=1.0,
            step=0.05,
            description="strength",
            continuous_update=False,
            layout=w.Layout(display="none"),
        )
        self.painter = MaskPainter()
        self.brush = w.IntSlider(value=self.painter.brush, min=2, max=256, description="brush")
        self.erase = w.ToggleButton(value=False, description="erase", icon="eraser", tooltip="off: paint")
        self.clear_mask_button = w.Button(description="Clear mask", icon="times")
        self.mask_info = w.Label(value="")
        self.mask_info.add_class("qwennb-mask-info")
        self.mask_box = w.VBox(
            [w.HBox([self.brush, self.erase, self.clear_mask_button]), self.painter, self.mask_info],
            layout=w.Layout(display="none"),
        )
        self.input_image: Any = None  # PIL RGB, or None: text to image
        self.input_source: str | None = None
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
        self.lora_add_button.on_click(lambda _b: self.add_lora())
        self.lora_remove_button.on_click(lambda _b: self.remove_lora())
        self.lora_pick.observe(self._on_lora_pick, names="value")
        self.lora_scale.observe(self._on_lora_scale, names="value")
        self._refresh_loras()
        self.generate_button.on_click(lambda _b: self.start())
        self.stop_button.on_click(lambda _b: self.request_stop())
        self.compare_button.on_click(lambda _b: self.keep())
        self.upload.observe(self._on_upload, names="value")
        self.use_last_button.on_click(lambda _b: self.use_last_result())
        self.clear_input_button.on_click(lambda _b: self.clear_input())
        # Brush and erase reach the canvas in the browser at once (jslink: no trip through a busy kernel) and
        # the Python objects too (link).
        for control, name in ((self.brush, "brush"), (self.erase, "erase")):
            traitlets.link((control, "value"), (self.painter, name))
            w.jslink((control, "value"), (self.painter, name))
        self.clear_mask_button.on_click(lambda _b: self.painter.clear())
        self.painter.observe(self._on_mask, names="mask")
        self.widget = w.VBox(
            [
                self.prompt,
                self.negative,
                w.HBox([self.steps, self.cfg]),
                w.HBox([self.preset, self.aspect]),
                w.HBox([self.seed, self.randomize, self.enhance, self.preview]),
                w.HBox([self.generate_button, self.stop_button, self.compare_button, self.progress]),
                self.status,
                w.HBox(
                    [
                        self.upload,
                        self.use_last_button,
                        self.clear_input_button,
                        self.input_thumb,
                        self.strength,
                    ]
                ),
                self.mask_box,
                w.HBox([self.lora_source, self.lora_add_button, self.lora_pick, self.lora_scale]),
                w.HBox([self.lora_remove_button, self.lora_status]),
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

    # ---- LoRAs
    def _refresh_loras(self) -> None:
        infos = self.session.lora_list()
        self._moving = True
        try:
            self.lora_pick.options = [i.name for i in infos]
            self.lora_pick.value = infos[-1].name if infos else None
            if infos:
                self.lora_scale.value = infos[-1].scale
        finally:
            self._moving = False
        self.lora_remove_button.disabled = not infos
        self.lora_scale.disabled = not infos

    def add_lora(self) -> None:
        """What the Add button does: load the LoRA named in the text box at the slider's scale."""
        from .lora import parse_spec

        text = self.lora_source.value.strip()
        if not text:
            self.lora_status.value = "name a LoRA file, folder or hub id first"
            return
        source, scale = parse_spec(text)
        try:
            info = self.session.lora_add(source, scale if ":" in text else 1.0)
        except QwennbError as exc:
            self.lora_status.value = f"error: {exc}"
            return
        self.lora_source.value = ""
        self._refresh_loras()
        self.lora_status.value = f"added {info}"

    def remove_lora(self) -> None:
        """What the Remove button does: remove the picked LoRA."""
        name = self.lora_pick.value
        if not name:
            return
        try:
            self.session.lora_remove(name)
        except QwennbError as exc:
            self.lora_status.value = f"error: {exc}"
            return
        self._refresh_loras()
        self.lora_status.value = f"removed {name}"

    def _on_lora_pick(self, change: dict[str, Any]) -> None:
        if self._moving or not change["new"]:
            return
        info = {i.name: i for i in self.session.lora_list()}.get(change["new"])
        if info is not None:
            self._moving = True
            try:
                self.lora_scale.value = info.scale
            finally:
                self._moving = False

    def _on_lora_scale(self, change: dict[str, Any]) -> None:
        if self._moving or not self.lora_pick.value:
            return
        try:
            info = self.session.lora_scale(self.lora_pick.value, float(change["new"]))
        except QwennbError as exc:
            self.lora_status.value = f"error: {exc}"
            return
        self.lora_status.value = f"{info.name}: scale {info.scale:g}"

    def _few_step_preset(self) -> str | None:
        """A few-step preset brings its LoRA and scheduler (the sliders already hold its steps and CFG)."""
        p = PRESETS.get(self.preset.value)
        return p.name if p is not None and p.lora else None

    # ---- the input image and its mask
    def set_input(self, image: Any, source: str = "image") -> bool:
        """Make ``image`` (PIL, numpy array, path or image bytes) the panel's input: Generate then runs
        image-to-image, or inpainting once a mask is painted. Something that is not an image is refused with
        one line in the status and the input stays as it was; returns whether it was taken.

        Example:
            >>> from PIL import Image
            >>> from qwennb.session import Session
            >>> from qwennb.widgets import QwenPanel
            >>> panel = QwenPanel(Session(), model="tiny")
            >>> panel.set_input(Image.new("RGB", (96, 64), "red"))
            True
            >>> panel.painter.width, panel.painter.height, panel.strength.layout.display
            (96, 64, '')
            >>> panel.set_input(b"not an image", "upload notes.txt")
            False
            >>> panel.status.value
            'error: upload notes.txt: these 12 bytes are not an image PIL can read; the input image is unchanged'
        """
        from .edit import read_image

        try:
            im = read_image(image, role=source).image
        except QwennbError as exc:
            self.last_error = str(exc)
            kept = "the input image is unchanged" if self.input_image is not None else "no input image is set"
            self._set_status(f"error: {exc}; {kept}")
            return False
        self.input_image, self.input_source = im, source
        self.painter.set_image(im)
        self._on_mask({})
        self._show(self.input_thumb, png_bytes(im, 96))
        self.strength.layout.display = ""
        self.mask_box.layout.display = ""
        self.clear_input_button.disabled = False
        self.aspect.disabled = True  # the output takes the input's size
        self.last_error = None
        self._set_status(
            f"input image {im.width}x{im.height} ({source}): Generate redraws it at the strength set; "
            "paint a mask to redraw only part of it"
        )
        return True

    def use_last_result(self) -> bool:
        """What "Use last result" does: the panel's last image (or the history's) becomes the input."""
        r = self.last_result if self.last_result is not None and self.last_result.images else None
        if r is None:
            r = next((h for h in reversed(self.session.history) if h.images), None)
        if r is None:
            self._set_status("no result yet: generate an image or upload one first")
            return False
        return self.set_input(r.images[0], f"last result, seed {r.seed}")

    def clear_input(self) -> None:
        """What "Clear image" does: back to text to image (the input and its mask go)."""
        self.input_image = self.input_source = None
        self.painter.set_image(None)
        self._show(self.input_thumb, None)
        self.strength.layout.display = "none"
        self.mask_box.layout.display = "none"
        self.clear_input_button.disabled = True
        self.aspect.disabled = False
        self.mask_info.value = ""
        self._set_status("input image cleared: Generate draws from the prompt alone")

    def _on_upload(self, change: dict[str, Any]) -> None:
        files = change["new"]
        if not files:
            return
        f = files[-1]
        self.set_input(bytes(f["content"]), f"upload {f.get('name', '')}".strip())
        self.upload.value = ()  # the same file can be chosen again

    def _on_mask(self, change: dict[str, Any]) -> None:
        try:
            mask = self.painter.mask_image()
        except QwennbError as exc:
            self.mask_info.value = f"mask refused: {exc}"
            return
        if mask is None:
            self.mask_info.value = "no mask painted: Generate redraws the whole image"
            return
        share = sum(mask.histogram()[128:]) / (mask.width * mask.height)
        self.mask_info.value = (
            f"mask {mask.width}x{mask.height}, {share:.0%} painted: Generate redraws that part"
        )

    def image_options(self) -> dict[str, Any]:
        """The input image, mask and strength for ``generate`` (empty with no input), checked: a mask of
        another size or a strength out of range raises ``QwennbError`` before anything runs."""
        from .edit import check_strength, read_mask

        if self.input_image is None:
            return {}
        opts: dict[str, Any] = {
            "init_image": self.input_image,
            "strength": check_strength(self.strength.value),
        }
        mask = self.painter.mask_image()
        if mask is not None:
            opts["mask"] = read_mask(mask, self.input_image.size).image
        return opts

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
                "width": None if self.input_image is not None else width,
                "height": None if self.input_image is not None else height,
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
            image_opts = self.image_options()
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
        self._thread = threading.Thread(target=self._run, args=(prompt, image_opts), daemon=True)
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

    def _run(self, prompt: str, image_opts: dict[str, Any] | None = None) -> None:
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
            if image_opts:  # the output takes the input's size
                width = height = None
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
                preset=self._few_step_preset(),
                **(image_opts or {}),
            )
            self.last_result = result
            self._show(self.image, png_bytes(result.images[0], 1024) if result.images else None)
            self._show(self.timing, figure_png(timing_figure(result)))
            task = f"{result.task} at strength {result.strength:g} · " if image_opts else ""
            self._set_status(task + result.caption())
            if result.images and self.save_dir:
                try:
                    result.save(self.save_dir, embed_metadata=self.embed_metadata)
                except (OSError, QwennbError) as exc:
                    index = len(self.session.history) - 1
                    self.last_error = (
                        f"could not save to {self.save_dir} ({getattr(exc, 'strerror', None) or exc}); the image "
                        f"is shown and kept as %qwen history entry #{index}: save it with %qwen save {index} FOLDER"
                    )
                    self._set_status(f"{task}{result.caption()} · error: {self.last_error}")
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


# --------------------------------------------------------------------------- the mask painted in the browser

# The painter's front end: the input image under a canvas of the image's own size, painted with the pointer
# (source-over) or erased (destination-out). On pointer-up the painted pixels go to Python as a black-and-white
# PNG data URL (white = repaint); a mask set from Python (or cleared) is drawn back onto the canvas.
_MASK_ESM = """
function render({ model, el }) {
  const wrap = document.createElement("div");
  wrap.className = "qwennb-mask-wrap";
  wrap.style.cssText = "position:relative;display:inline-block;line-height:0;touch-action:none";
  const img = document.createElement("img");
  img.draggable = false;
  img.style.cssText = "display:block;width:100%;height:auto;pointer-events:none;user-select:none";
  const cv = document.createElement("canvas");
  cv.className = "qwennb-mask-canvas";
  cv.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%;opacity:0.5;cursor:crosshair";
  wrap.append(img, cv);
  el.append(wrap);
  const ctx = cv.getContext("2d");
  let sent = null, drawing = false, last = null;
  function layout() {
    const w = model.get("width"), h = model.get("height"), side = model.get("display_side");
    cv.width = Math.max(1, w); cv.height = Math.max(1, h);
    wrap.style.width = Math.round((w * side) / Math.max(w, h, 1)) + "px";
    wrap.style.display = w && h && model.get("image") ? "inline-block" : "none";
    img.src = model.get("image") || "";
    sent = null;
    load();
  }
  function load() {
    const m = model.get("mask");
    if (m === sent) return;
    sent = m;
    ctx.globalCompositeOperation = "source-over";
    ctx.clearRect(0, 0, cv.width, cv.height);
    if (!m) return;
    const im = new Image();
    im.onload = () => {
      const t = document.createElement("canvas");
      t.width = cv.width; t.height = cv.height;
      const tc = t.getContext("2d");
      tc.drawImage(im, 0, 0, t.width, t.height);
      const px = tc.getImageData(0, 0, t.width, t.height), d = px.data;
      for (let i = 0; i < d.length; i += 4) {
        const on = d[i] >= 128;
        d[i] = 255; d[i + 1] = 0; d[i + 2] = 0; d[i + 3] = on ? 255 : 0;
      }
      ctx.putImageData(px, 0, 0);
    };
    im.src = m;
  }
  function pos(e) {
    const r = cv.getBoundingClientRect();
    return [((e.clientX - r.left) * cv.width) / r.width, ((e.clientY - r.top) * cv.height) / r.height];
  }
  function stroke(a, b) {
    ctx.globalCompositeOperation = model.get("erase") ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "rgb(255,0,0)";
    ctx.lineWidth = model.get("brush");
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath(); ctx.arc(b[0], b[1], ctx.lineWidth / 2, 0, 2 * Math.PI); ctx.fill();
    ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
  }
  function sync() {
    const w = cv.width, h = cv.height, src = ctx.getImageData(0, 0, w, h).data;
    const out = document.createElement("canvas");
    out.width = w; out.height = h;
    const oc = out.getContext("2d"), px = oc.createImageData(w, h), d = px.data;
    for (let i = 0; i < d.length; i += 4) {
      const v = src[i + 3] >= 128 ? 255 : 0;
      d[i] = d[i + 1] = d[i + 2] = v; d[i + 3] = 255;
    }
    oc.putImageData(px, 0, 0);
    sent = out.toDataURL("image/png");
    model.set("mask", sent);
    model.save_changes();
  }
  cv.addEventListener("pointerdown", (e) => {
    drawing = true; last = pos(e); stroke(last, last);
    cv.setPointerCapture(e.pointerId); e.preventDefault(); e.stopPropagation();
  });
  cv.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = pos(e); stroke(last, p); last = p;
  });
  const end = () => { if (drawing) { drawing = false; sync(); } };
  cv.addEventListener("pointerup", end);
  cv.addEventListener("pointercancel", end);
  for (const name of ["image", "width", "height", "display_side"]) model.on("change:" + name, layout);
  model.on("change:mask", load);
  layout();
}
export default { render };
"""


def _data_url(image: Any, max_side: int | None = None) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(image, max_side)).decode("ascii")


class MaskPainter(anywidget.AnyWidget):
    """A mask painted in the browser over an input image (an anywidget): white = repaint, black = keep.

    ``image`` is the input image shown under the canvas (a PNG data URL), ``width`` and ``height`` its size,
    which is the mask's size; ``mask`` is the painted mask as a PNG data URL (``""``: nothing painted), sent
    from the browser at the end of each stroke. ``brush`` is the brush's diameter in image pixels, ``erase``
    makes the pointer erase. :meth:`mask_image` reads the mask as a PIL "L" image.

    Example:
        >>> from PIL import Image
        >>> from qwennb.widgets import MaskPainter
        >>> m = MaskPainter()
        >>> m.set_image(Image.new("RGB", (64, 48), "white"))
        >>> m.mask_image() is None  # nothing painted yet
        True
        >>> square = Image.new("L", (64, 48)); square.paste(255, (8, 8, 24, 24))
        >>> m.set_mask(square)
        >>> m.mask_image().size, m.mask_image().getextrema()
        ((64, 48), (0, 255))
    """

    _esm = _MASK_ESM
    image = traitlets.Unicode("").tag(sync=True)
    width = traitlets.Int(0).tag(sync=True)
    height = traitlets.Int(0).tag(sync=True)
    mask = traitlets.Unicode("").tag(sync=True)
    brush = traitlets.Int(24).tag(sync=True)
    erase = traitlets.Bool(False).tag(sync=True)
    display_side = traitlets.Int(384).tag(sync=True)

    def set_image(self, image: Any | None) -> None:
        """Show ``image`` (PIL) under an empty mask of its size; ``None`` empties the painter."""
        with self.hold_sync():
            if image is None:
                self.image, self.width, self.height = "", 0, 0
            else:
                # Only shown under the canvas: at most 1024 pixels a side cross to the browser; the mask
                # keeps the image's own size.
                self.image = _data_url(image.convert("RGB"), 1024)
                self.width, self.height = image.size
                self.brush = min(256, max(2, round(max(image.size) / 10)))  # the panel slider spans 2-256
            self.mask = ""

    def set_mask(self, mask: Any | None) -> None:
        """Put a mask (PIL, white = repaint) on the canvas, as if painted; ``None`` clears it."""
        self.mask = "" if mask is None else _data_url(mask.convert("L"))

    def clear(self) -> None:
        """Erase everything painted."""
        self.mask = ""

    def mask_image(self) -> Any | None:
        """The painted mask as a PIL "L" image of the PNG's own size (0 or 255), or ``None`` when nothing is
        painted. A mask that is not a PNG data URL raises :class:`qwennb.edit.ImageInputError`."""
        import base64
        import binascii

        from .edit import ImageInputError, read_image

        if not self.mask:
            return None
        head, _, body = self.mask.partition(",")
        if not head.startswith("data:image/") or not body:
            raise ImageInputError("the painted mask is not an image data URL")
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError("the painted mask is not valid base64") from None
        mask = read_image(data, role="mask", mode="L").image.point(lambda v: 255 if v >= 128 else 0)
        return mask if mask.getextrema()[1] else None
