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
        # The LoRA row: a file, folder or hub id to add; the loaded LoRAs; the picked one's scale.
        self.lora_source = w.Text(placeholder="LoRA: .safetensors file, folder or hub id", description="LoRA")
        self.lora_add_button = w.Button(description="Add", icon="plus")
        self.lora_pick = w.Dropdown(options=[], description="loaded")
        self.lora_scale = w.FloatSlider(
            value=1.0, min=0.0, max=2.0, step=0.05, description="scale", continuous_update=False
        )
        self.lora_remove_button = w.Button(description="Remove", icon="trash")
        self.lora_status = w.Label(value="")
        self.last_result: GenerationResult | None = None
        self.last_error: str | None = None
        self.on_step_callbacks: list[Callable[[StepInfo], None]] = []
        self._stop = StopSignal()
        self._thread: threading.Thread | None = None
        self._moving = False

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
        self.widget = w.VBox(
            [
                self.prompt,
                self.negative,
                w.HBox([self.steps, self.cfg]),
                w.HBox([self.preset, self.aspect]),
                w.HBox([self.seed, self.randomize, self.enhance]),
                w.HBox([self.lora_source, self.lora_add_button, self.lora_pick, self.lora_scale]),
                w.HBox([self.lora_remove_button, self.lora_status]),
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
                preset=self._few_step_preset(),
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
