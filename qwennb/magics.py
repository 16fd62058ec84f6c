"""IPython magics: ``%load_ext qwennb``, ``%%qwen_generate``, ``%qwen``, ``%qwen_ui``.

A thin layer over :class:`qwennb.session.Session`: each magic parses its options with
``@magic_arguments`` and calls a plain method that the tests call directly too. User errors become
``UsageError`` (one line, no traceback). Configuration is traitlets on :class:`QwenMagics`::

    %config QwenMagics.default_steps = 30
    %config QwenMagics.model = "qwen-image"
"""

from __future__ import annotations

import ast
import os
import string
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Float, Int, Unicode

from .display import history_html, history_text, progress_line
from .errors import QwennbError
from .generation import GenerationResult, StepInfo, parse_size
from .plan import describe_modes
from .presets import describe_presets, get_preset
from .session import Session


class _Text:
    """A display object with a plain-text and an HTML form (for display handles)."""

    def __init__(self, text: str, html: str | None = None) -> None:
        self.text, self.html = text, html

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        out = {"text/plain": self.text}
        if self.html is not None:
            out["text/html"] = self.html
        return out


class _Info(_Text):
    """``%qwen info``: shown as text; the full data stays reachable as ``_.data`` or ``_["plan"]``."""

    def __init__(self, text: str, data: dict[str, Any]) -> None:
        super().__init__(text)
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


class _PromptNamespace(dict):
    def __missing__(self, key: str) -> Any:
        raise UsageError(
            f"the prompt uses {{{key}}} but no variable named {key!r} exists (write {{{{ }}}} for a brace)"
        )


def fill_prompt(body: str, namespace: dict[str, Any]) -> str:
    """Fill ``{name}`` fields of a cell body from the notebook's variables (``{{`` for a literal brace).

    Example:
        >>> fill_prompt("a {animal} in {{braces}}", {"animal": "fox"})
        'a fox in {braces}'
    """
    try:
        return string.Formatter().vformat(body, (), _PromptNamespace(namespace))
    except (ValueError, IndexError, AttributeError, KeyError) as exc:
        raise UsageError(f"cannot fill the prompt's {{...}} fields: {exc}") from None


def _parse_overrides(words: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in words:
        key, sep, value = w.partition("=")
        if not sep:
            raise UsageError(f"plan overrides are key=value, got {w!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


@magics_class
class QwenMagics(Magics):
    """The qwennb magics and their configuration."""

    model = Unicode(
        "", help="Model to load: registry name, hub id or folder (default: QWENNB_MODEL, local, tiny)"
    ).tag(config=True)
    autoload = Bool(True, help="Load the model when the extension is loaded").tag(config=True)
    default_steps = Int(0, help="Steps when a cell gives none (0: the preset's or the plan's)").tag(
        config=True
    )
    default_cfg = Float(0.0, help="CFG when a cell gives none (0: the preset's or the plan's)").tag(
        config=True
    )
    preset = Unicode(
        "", help="Preset when a cell gives none (ultra-fast, balanced, high-quality, official)"
    ).tag(config=True)
    mode = Unicode(
        "", help="Load mode: exact, turbo (fp8 matmuls) or turbo-cache (step cache); empty: the plan decides"
    ).tag(config=True)
    save_dir = Unicode("outputs", help="Folder for generated PNGs").tag(config=True)
    embed_metadata = Bool(True, help="Store the parameters in the PNG text chunks").tag(config=True)
    show_plot = Bool(True, help="Show the per-step timing plot after each generation").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.session = Session()

    # ------------------------------------------------------------------ plain functions (tested directly)

    def load(
        self, model: str | None = None, overrides: dict[str, Any] | None = None, show: bool = True
    ) -> Any:
        """Load a model (replacing the current one) and show the banner."""
        name = model or self.model or None
        if self.mode and "mode" not in (overrides or {}):
            overrides = {**(overrides or {}), "mode": self.mode}
        if show:
            # Shown as it happens (real weights take a while; diffusers' own bars show the shards), then the
            # banner as a separate output so that notebooks store and compare it.
            display(_Text(f"qwennb: loading {name or 'the default model'}..."))
        try:
            report = self.session.load(name, overrides)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        if show:
            display(report)
        return report

    def generate_cell(self, prompt: str, options: Any) -> GenerationResult:
        """Run one generation from parsed options, with live progress, saving and history."""
        if not self.session.loaded:
            self.load()
        width = height = None
        try:
            if options.size:
                width, height = parse_size(options.size)
            preset = options.preset or self.preset or None
            if preset:
                get_preset(preset)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        steps = options.steps if options.steps is not None else (self.default_steps or None)
        cfg = options.cfg if options.cfg is not None else (self.default_cfg or None)
        original = None
        if options.enhance:
            prompt, original = self._enhance_for_cell(prompt)
        handle = display(_Text("qwennb: encoding the prompt..."), display_id=True)

        def on_step(s: StepInfo) -> None:
            handle.update(_Text(progress_line(s.step, s.total, s.step_s, s.elapsed_s)))

        try:
            result = self.session.generate(
                prompt,
                negative_prompt=options.negative,
                steps=steps,
                cfg=cfg,
                seed=options.seed,
                width=width,
                height=height,
                aspect=options.aspect,
                num_images=options.n,
                preset=preset,
                on_step=on_step,
                original_prompt=original,
            )
        except QwennbError as exc:
            handle.update(_Text(f"qwennb: not run: {exc}"))
            raise UsageError(str(exc)) from None
        state = "stopped" if result.interrupted else "done"
        handle.update(
            _Text(f"qwennb: {state}: {result.steps_completed}/{result.steps} steps in {result.total_s:.1f} s")
        )
        if not options.no_save and result.images:
            result.save(options.out or self.save_dir, embed_metadata=self.embed_metadata)
        if not self.show_plot:
            return _NoPlot(result)  # type: ignore[return-value]
        return result

    def _enhance_for_cell(self, prompt: str) -> tuple[str, str]:
        try:
            from .enhance import enhance_prompt
        except ImportError:
            raise UsageError("prompt enhancement is not available in this version") from None
        try:
            e = enhance_prompt(prompt, pipe=self.session.require())
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        display(
            _Text(
                f"original: {e.original}\nenhanced: {e.enhanced}",
                "<table><tr><th>original</th><th>enhanced</th></tr>"
                f"<tr><td>{_esc(e.original)}</td><td>{_esc(e.enhanced)}</td></tr></table>",
            )
        )
        for n in getattr(e, "notices", []):
            display(_Text(f"note: {n}"))
        return e.enhanced, e.original

    # ------------------------------------------------------------------ magics

    @magic_arguments()
    @argument("--steps", type=int, help="denoising steps (at least 2)")
    @argument("--cfg", type=float, help="true_cfg_scale; 1 turns guidance off")
    @argument("--seed", type=int, help="random seed (drawn and shown when omitted)")
    @argument("--size", help="WIDTHxHEIGHT, multiples of 16 (others are rounded)")
    @argument("--aspect", help="official aspect ratio: 1:1 16:9 9:16 4:3 3:4 3:2 2:3")
    @argument("--negative", help="negative prompt (default ' ' when CFG > 1)")
    @argument("--preset", help="ultra-fast, balanced, high-quality or official")
    @argument("--n", type=int, default=1, help="number of images")
    @argument("--out", help="folder for the PNGs (default: QwenMagics.save_dir)")
    @argument("--no-save", action="store_true", help="do not write PNGs")
    @argument("--enhance", action="store_true", help="rewrite the prompt with the text encoder first")
    @cell_magic
    def qwen_generate(self, line: str, cell: str) -> GenerationResult:
        """Generate images from the cell body (the prompt).

        ``{name}`` in the prompt is filled from the notebook's variables; write ``{{`` and ``}}`` for literal
        braces. The result is returned (``_`` holds it) and added to ``%qwen history``.

        Example::

            %%qwen_generate --steps 20 --cfg 4 --seed 7 --aspect 16:9
            A coffee shop entrance with a chalkboard sign reading "Qwen Coffee 😊 $2 per cup"
        """
        options = parse_argstring(self.qwen_generate, line)
        body = cell.strip()
        if not body:
            raise UsageError("the cell is empty: write the prompt in the cell body")
        prompt = fill_prompt(body, self.shell.user_ns if self.shell is not None else {})
        return self.generate_cell(prompt, options)

    @line_magic
    def qwen(self, line: str) -> Any:
        """qwennb commands: info, plan [MODEL], presets, history, load MODEL [key=value...], unload,
        enhance PROMPT, describe PATH, help."""
        words = line.strip().split(maxsplit=1)
        cmd = words[0] if words else "help"
        rest = words[1] if len(words) > 1 else ""
        handler = getattr(self, f"_qwen_{cmd}", None)
        if handler is None:
            raise UsageError(f"unknown %qwen command {cmd!r}; try %qwen help")
        try:
            return handler(rest)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None

    def _qwen_help(self, rest: str) -> None:
        print(
            "%qwen info               card, memory in use, plan, active optimisations\n"
            "%qwen plan [MODEL]       the plan for the loaded (or another) model\n"
            "%qwen presets            the presets and load modes, and what they trade\n"
            "%qwen history            recent results with their parameters\n"
            "%qwen load MODEL [k=v]   load a model, e.g. %qwen load qwen-image mode=turbo\n"
            "%qwen unload             free the model and its GPU memory\n"
            "%qwen enhance PROMPT     rewrite a prompt with the text encoder\n"
            "%qwen describe PATH      describe an image's style for use as a prompt\n"
            "%qwen batch FILE [opts]  many images from a prompt file, resumable (%qwen batch --help)\n"
            "%%qwen_generate [opts]   generate from the cell body (%%qwen_generate? for options)\n"
            "%qwen_ui                 the widget panel"
        )

    def _qwen_info(self, rest: str) -> _Info:
        info = self.session.info()
        hw = self.session.hardware
        g = hw.best_gpu
        lines = [f"card: {g.name}, {g.total_memory_gb:.1f} GiB" if g else f"card: none ({hw.cpu_count} CPUs)"]
        if "gpu_memory_allocated_gb" in info:
            lines.append(f"GPU memory in use: {info['gpu_memory_allocated_gb']:.2f} GiB allocated")
        if not info["loaded"]:
            lines.append("model: none loaded")
        else:
            lines.append(f"model: {info['model']}")
            lines.append(f"plan: {info['plan'].arrangement}")
            for name, c in info["active"]["components"].items():
                hooks = ", ".join(c["hooks"]) or "no hooks"
                lines.append(f"  {name}: {c['device']}, {c['storage_dtype']}, {hooks}")
            a = info["active"]
            lines.append(
                f"attention {a['attention_backend']}; compiled blocks {a['compiled_blocks']}; VAE tiling "
                f"{a['vae_tiling']}; TF32 {a['tf32']}; matches plan: {a.get('matches_plan')}"
            )
        return _Info("\n".join(lines), info)

    def _qwen_plan(self, rest: str) -> Any:
        words = rest.split()
        if words:
            return self.session.plan_for(words[0], _parse_overrides(words[1:]))
        if self.session.report is not None:
            return self.session.report.plan
        return self.session.plan_for(self.model or None)

    def _qwen_presets(self, rest: str) -> None:
        print(describe_presets())
        print("\nload modes (%qwen load MODEL mode=..., or %config QwenMagics.mode = ...):")
        print(describe_modes())

    def _qwen_history(self, rest: str) -> Any:
        return _Text(history_text(self.session.history), history_html(self.session.history))

    def _qwen_load(self, rest: str) -> Any:
        words = rest.split()
        if not words:
            raise UsageError("usage: %qwen load MODEL [key=value ...]")
        self.load(words[0], _parse_overrides(words[1:]))

    def _qwen_unload(self, rest: str) -> None:
        was = self.session.report.model if self.session.report else None
        self.session.unload()
        print(f"qwennb: unloaded {was}" if was else "qwennb: nothing was loaded")

    def _qwen_enhance(self, rest: str) -> Any:
        if not rest.strip():
            raise UsageError("usage: %qwen enhance PROMPT")
        from .enhance import enhance_prompt

        if not self.session.loaded:
            self.load()
        return enhance_prompt(rest.strip(), pipe=self.session.require())

    def _qwen_describe(self, rest: str) -> Any:
        path = rest.strip().strip("'\"")
        if not path:
            raise UsageError("usage: %qwen describe PATH")
        if not os.path.exists(path):
            raise UsageError(f"no such file: {path}")
        from .enhance import describe_image

        if not self.session.loaded:
            self.load()
        return describe_image(path, pipe=self.session.require())

    def _qwen_batch(self, rest: str) -> Any:
        """``%qwen batch FILE [--out DIR] [--steps N] ... [--ray auto|ADDRESS] [--background]``: a prompt file
        to a folder of images, with a live progress widget. On the loaded model unless ``--ray``/``--workers``
        ask for other workers; ``--background`` returns at once (Stop button; ``_.result`` when done)."""
        import argparse
        import shlex

        from .batch import run_batch
        from .cli import add_batch_arguments, add_mode_argument, batch_options
        from .display import batch_html
        from .widgets import BatchProgress

        class _P(argparse.ArgumentParser):
            def error(self, message: str) -> None:
                raise UsageError(f"%qwen batch: {message}")

            def exit(self, status: int = 0, message: str | None = None) -> None:
                raise UsageError(message or "%qwen batch: see the options above")

        p = _P(prog="%qwen batch")
        add_batch_arguments(p, out_default=os.path.join(self.save_dir, "batch"))
        add_mode_argument(p)
        p.add_argument("--background", action="store_true", help="run in a thread; the widget has Stop")
        try:
            args = p.parse_args(shlex.split(rest))
        except ValueError as exc:
            raise UsageError(f"%qwen batch: {exc}") from None
        options = batch_options(args)
        if not options["ray"] and not options["workers"]:
            if not self.session.loaded or (
                args.model and self.session.report and args.model != self.session.report.model
            ):
                self.load(args.model or None)
            options["pipe"] = self.session.require()
        progress = BatchProgress()
        display(progress.widget)
        if args.background:
            progress.start(run_batch, prompts=args.file, out=args.out, **options)
            return progress
        result = run_batch(args.file, args.out, on_event=progress, stop=progress.stop, **options)
        return _Text(result.summary(), batch_html(result))

    @line_magic
    def qwen_ui(self, line: str) -> Any:
        """The widget panel: prompt, sliders for steps and CFG, presets, Generate and Stop."""
        from .widgets import QwenPanel

        if not self.session.loaded:
            self.load()
        return QwenPanel(self.session, save_dir=self.save_dir, embed_metadata=self.embed_metadata).widget


class _NoPlot:
    """A result shown without its timing plot (``QwenMagics.show_plot = False``)."""

    def __init__(self, result: GenerationResult) -> None:
        self.result = result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.result, name)

    def __repr__(self) -> str:
        return repr(self.result)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from .display import result_html, result_text

        return {"text/plain": result_text(self.result), "text/html": result_html(self.result, plot=False)}


def _esc(s: str) -> str:
    import html

    return html.escape(s)


def load_extension(ip: Any) -> QwenMagics:
    magics = QwenMagics(shell=ip)
    ip.register_magics(magics)
    if magics.autoload and os.environ.get("QWENNB_AUTOLOAD", "1") != "0":
        try:
            magics.load()
        except UsageError as exc:
            # The extension stays loaded; the magics say what to do.
            display(_Text(f"qwennb: could not load the model: {exc}"))
    return magics
