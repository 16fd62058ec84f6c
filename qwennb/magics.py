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
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display
from IPython.utils.process import arg_split
from traitlets import Bool, Float, Int, Unicode

from .display import history_html, history_text, progress_html, progress_line
from .errors import QwennbError
from .generation import GenerationResult, StepInfo, is_busy
from .options import parse_size, validate_generate_options
from .plan import describe_modes
from .presets import PRESETS, describe_presets
from .session import Session

_PRESET_HELP = "named steps and CFG: " + "; ".join(
    f"{p.name} ({p.steps} steps, CFG {p.cfg:g})" for p in PRESETS.values()
)
# The kernel's history: kept here (not on one QwenMagics) so that it survives %reload_ext qwennb.
_HISTORY: list[GenerationResult] = []


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


def _unquote(word: str) -> str:
    """One word of an options line without the quotes that grouped it: ``"a b"`` gives ``a b``, ``--seed="7"``
    gives ``--seed=7``. IPython splits magic lines as Windows does and keeps the quotes in the words
    (``--negative "blurry, low"`` was the negative prompt ``"blurry, low"``, quotes and all); a POSIX split would eat
    the backslashes of Windows paths instead."""
    head, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return head + eq + value


def _split_words(rest: str, what: str) -> list[str]:
    """The words of a ``%qwen`` command's arguments, quotes grouping words as in the cell magics' options."""
    try:
        return [_unquote(w) for w in arg_split(rest)]
    except ValueError as exc:
        raise UsageError(f"cannot read {what}: {exc}") from None


def _parse_options(magic: Any, name: str, line: str) -> Any:
    """A cell magic's options line, split as ``parse_argstring`` splits it, each word without its grouping quotes;
    a quote left open (which cannot be split) is a usage error like any other bad option, not a traceback."""
    try:
        words = arg_split(line)
    except ValueError as exc:
        raise UsageError(f"{name}: cannot read the options line: {exc}") from None
    return magic.parser.parse_args([_unquote(w) for w in words])


def _model_words(command: str, rest: str) -> list[str]:
    """The words of ``%qwen plan|load [MODEL] [key=value ...]``; ``--model NAME`` (the CLI's spelling) is taken
    as NAME, and any other ``--option`` is a usage error that says the form."""
    words = rest.split()
    if words[:1] == ["--model"] and len(words) > 1:
        words = words[1:]
    bad = [w for w in words if w.startswith("-")]
    if bad:
        raise UsageError(
            f"%qwen {command}: unknown option {bad[0]!r}; usage: %qwen {command} MODEL [key=value ...] "
            "(e.g. %qwen load qwen-image mode=turbo)"
        )
    return words


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
        "", help="Model to load: registry name, hub id or folder (default: QWENNB_MODEL, local, toy)"
    ).tag(config=True)
    autoload = Bool(True, help="Load the model when the extension is loaded").tag(config=True)
    background_load = Bool(
        True,
        help="At %load_ext, load the model on a thread: the kernel is free at once and qwennb's commands wait "
        "for the model (False: %load_ext returns when it is loaded)",
    ).tag(config=True)
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
    preview = Bool(
        False, help="Show a small preview of the image every 2 steps in the progress line (cheap: no decode)"
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.session = Session(history=_HISTORY)
        self.panel: Any = None  # the last %qwen_ui panel, for "send to panel"
        self._last_preview: Any = None
        self._loading_model = "the model"  # the model a load in the background is loading

    # ------------------------------------------------------------------ plain functions (tested directly)

    def load(
        self,
        model: str | None = None,
        overrides: dict[str, Any] | None = None,
        show: bool = True,
        background: bool = False,
    ) -> Any:
        """Load a model (replacing the current one) and show the banner; ``background``: on a thread (one GPU), the
        banner saying so at once, and the first qwennb command after it says when it ended (:meth:`ready`)."""
        name = model or self.model or None
        overrides = dict(overrides or {})
        try:
            self.ready()  # a load still running in the background ends first
        except UsageError:
            pass  # and if it failed, this load replaces it
        try:  # gpus=N [ulysses=K]: worker processes, one per GPU (qwennb.parallel)
            from .parallel import session_for

            self.session = session_for(self.session, overrides.pop("gpus", 1), overrides.pop("ulysses", 1))
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        if self.mode and "mode" not in (overrides or {}):
            overrides = {**(overrides or {}), "mode": self.mode}
        if background and hasattr(self.session, "load_in_background"):
            try:
                report = self.session.load_in_background(name, overrides or None)
            except QwennbError as exc:
                raise UsageError(str(exc)) from None
            self._loading_model = report.model
            if show:
                display(report)
            return report
        try:
            prepared = None
            if show and hasattr(self.session, "load_prepared"):
                # a bad name, option or plan is its one line before anything says "loading"
                prepared = self.session.prepare(name, overrides or None)
            if show:
                # Shown as it happens (real weights take a while; diffusers' own bars show the shards), then the
                # banner as a separate output so that notebooks store and compare it.
                shown = prepared.model if prepared is not None else name or "the default model"
                display(_Text(f"qwennb: loading {shown}..."))
            if prepared is not None:
                report = self.session.load_prepared(prepared)
            else:
                report = self.session.load(name, overrides or None)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        if show:
            display(report)
        return report

    def ready(self) -> None:
        """Wait for a load running in the background (``%load_ext``'s), saying so, then how it ended, once: a
        failed load is one ``UsageError`` (the kernel and the extension stay usable: ``%qwen load`` again)."""
        session = self.session
        if not getattr(session, "loading", False):
            return
        handle = display(
            _Text(f"qwennb: waiting for {self._loading_model} to finish loading..."), display_id=True
        )
        try:
            report = session.wait()
        except KeyboardInterrupt:
            handle.update(_Text("qwennb: still loading in the background"))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the load is the user's to see, in one line
            handle.update(_Text(""))
            lines = str(exc).strip().splitlines()
            why = lines[0] if lines else ""
            if not isinstance(exc, QwennbError):
                why = f"{type(exc).__name__}: {why}" if why else type(exc).__name__
            raise UsageError(f"the model could not be loaded: {why} (%qwen load MODEL tries again)") from None
        if report is not None:
            handle.update(
                _Text(f"qwennb: loaded {report.model} in {report.seconds:.1f} s (in the background)")
            )

    def cell_options(self, options: Any) -> dict[str, Any]:
        """Check a cell's options (with the traitlet defaults) before anything loads: ``UsageError`` if bad."""
        preset = options.preset or self.preset or None
        steps = options.steps if options.steps is not None else (self.default_steps or None)
        cfg = options.cfg if options.cfg is not None else (self.default_cfg or None)
        out = None if options.no_save else (options.out or self.save_dir)
        try:
            return validate_generate_options(
                {
                    "negative_prompt": options.negative,
                    "steps": steps,
                    "cfg": cfg,
                    "seed": options.seed,
                    "size": options.size,
                    "aspect": options.aspect,
                    "num_images": options.n,
                    "preset": preset,
                    "out": out,
                }
            )
        except QwennbError as exc:
            raise UsageError(str(exc)) from None

    def generate_cell(self, prompt: str, options: Any) -> GenerationResult:
        """Run one generation from parsed options, with live progress, saving and history."""
        try:
            validate_generate_options({"prompt": prompt})
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        opts = self.cell_options(options)  # every option is checked before the model loads
        images = self.image_options(options)  # --init-image, --strength, --mask: checked before loading
        out = opts.pop("out", None)
        self.ready()
        if not self.session.loaded:
            self.load()
        if getattr(options, "lora", None):
            try:
                from .lora import parse_spec

                self.session.lora_use([parse_spec(x) for x in options.lora])
            except QwennbError as exc:
                raise UsageError(str(exc)) from None
        original = None
        if options.enhance:
            prompt, original = self._enhance_for_cell(prompt)
        preview = bool(getattr(options, "preview", False) or self.preview)
        busy = self.session.pipe is not None and is_busy(self.session.pipe)
        first = (
            "qwennb: waiting for the running generation (the panel?) to end..."
            if busy
            else "qwennb: encoding the prompt..."
        )
        handle = display(_Text(first), display_id=True)

        def on_step(s: StepInfo) -> None:
            line = progress_line(s.step, s.total, s.step_s, s.elapsed_s)
            if s.preview is not None:
                self._last_preview = s.preview
            shown = self._last_preview if preview else None
            handle.update(_Text(line, progress_html(line, shown) if shown is not None else None))

        self._last_preview = None
        try:
            result = self.session.generate(
                prompt, on_step=on_step, original_prompt=original, preview=preview, **opts, **images
            )
        except QwennbError as exc:
            handle.update(_Text(""))  # the error is shown once, as the UsageError below
            raise UsageError(str(exc)) from None
        state = "stopped" if result.interrupted else "done"
        handle.update(
            _Text(f"qwennb: {state}: {result.steps_completed}/{result.steps} steps in {result.total_s:.1f} s")
        )
        if out and result.images:
            self._save(result, out)
        if not self.show_plot:
            return _NoPlot(result)  # type: ignore[return-value]
        return result

    def _save(self, result: GenerationResult, out: str) -> None:
        """Save a result; on failure the result stays in the history and the error says how to save it."""
        try:
            result.save(out, embed_metadata=self.embed_metadata)
        except (OSError, QwennbError) as exc:
            index = next(
                (i for i, r in enumerate(self.session.history) if r is result), len(self.session.history) - 1
            )
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UsageError(
                f"the image was made but could not be saved to {out} ({reason}); it is kept as %qwen history "
                f"entry #{index}: save it with %qwen save {index} OTHER_FOLDER"
            ) from None

    def resolve_image(self, token: str, role: str = "image", mode: str = "RGB") -> Any:
        """An image named in a magic's options: ``_`` (the last result), a variable (a PIL image, array, bytes or
        result), or a file path; read and checked now, before any model loads."""
        from .edit import read_image

        ns = self.shell.user_ns if self.shell is not None else {}
        token = token.strip()
        quoted = token[:1] in ("'", '"')
        name = token.strip("'\"")
        if not quoted and name in ns:
            value = ns[name]
        elif not quoted and (name == "_" or (name.isidentifier() and not os.path.exists(name))):
            what = "no result yet" if name == "_" else "no variable or file of that name"
            raise UsageError(f"{role} {name}: {what}")
        else:
            value = name  # a path (read_image says when it is missing or not an image)
        if name == "_" and not quoted and isinstance(value, str):  # IPython's `_` before any output
            raise UsageError(f"{role} _: no result yet")
        if hasattr(value, "images") and hasattr(value, "seed"):  # a GenerationResult (or its no-plot view)
            if not value.images:
                raise UsageError(f"{role} {token}: that result has no image (it was stopped before decoding)")
            value = value.images[0]
        try:
            return read_image(value, role=role, mode=mode)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None

    def image_options(self, options: Any) -> dict[str, Any]:
        """``--init-image``, ``--strength`` and ``--mask`` of %%qwen_generate, read and checked."""
        from .edit import check_strength, read_mask

        init = getattr(options, "init_image", None)
        strength = getattr(options, "strength", None)
        mask = getattr(options, "mask", None)
        if init is None:
            if strength is not None or mask is not None:
                raise UsageError("--strength and --mask need --init-image")
            return {}
        out: dict[str, Any] = {"init_image": self.resolve_image(init, "init image")}
        try:
            if strength is not None:
                out["strength"] = check_strength(strength)
            if mask is not None:
                m = self.resolve_image(mask, "mask", mode="L")
                out["mask"] = read_mask(m, out["init_image"].size)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        return out

    def edit_cell(self, instruction: str, options: Any) -> GenerationResult:
        """Run one edit from parsed options: images checked first, then the edit model loaded if needed."""
        from .edit import check_edit_inputs, is_edit_pipeline, resolve_edit_model

        if not options.image:
            raise UsageError(
                "give the image(s) to edit: %%qwen_edit --image _ (or a variable name, or a path)"
            )
        images = [
            self.resolve_image(t, f"image {i + 1}" if len(options.image) > 1 else "image")
            for i, t in enumerate(options.image)
        ]
        self.ready()
        loaded = self.session.pipe if self.session.loaded else None
        try:
            if options.model:
                name = resolve_edit_model(options.model)[0]
            elif loaded is not None and is_edit_pipeline(loaded):
                name = self.session.report.model if self.session.report else type(loaded).__name__
            elif loaded is not None:
                raise UsageError(
                    f"the loaded model ({self.session.report.model if self.session.report else '?'}) is not an "
                    "edit model; add --model qwen-image-edit-2511 (or toy-edit), or %qwen load one"
                )
            else:
                name = resolve_edit_model(None)[0]
            check_edit_inputs(name if loaded is None or options.model else loaded, images, instruction)
            # every option is checked before a model loads (a bad one must not cost a load or the loaded model)
            width = height = None
            if options.size:
                width, height = parse_size(options.size)
            validate_generate_options(
                {
                    "steps": options.steps,
                    "cfg": options.cfg,
                    "seed": options.seed,
                    "negative_prompt": options.negative,
                }
            )
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        if loaded is None or (options.model and self.session.report and self.session.report.model != name):
            self.load(name)
        handle = display(_Text("qwennb: encoding the prompt..."), display_id=True)

        def on_step(s: StepInfo) -> None:
            handle.update(_Text(progress_line(s.step, s.total, s.step_s, s.elapsed_s)))

        try:
            result = self.session.edit(
                images,
                instruction,
                negative_prompt=options.negative,
                steps=options.steps if options.steps is not None else (self.default_steps or None),
                cfg=options.cfg if options.cfg is not None else (self.default_cfg or None),
                seed=options.seed,
                width=width,
                height=height,
                on_step=on_step,
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
    @argument(
        "--steps", type=int, help="denoising steps, at least 2 (default: the preset's, else the plan's)"
    )
    @argument("--cfg", type=float, help="true_cfg_scale, 1 to 100; 1 turns guidance off")
    @argument("--seed", type=int, help="random seed, 0 to 2**63-1 (drawn and shown when omitted)")
    @argument("--size", help="WIDTHxHEIGHT, multiples of 16 (others are rounded)")
    @argument("--aspect", help="official aspect ratio: 1:1 16:9 9:16 4:3 3:4 3:2 2:3")
    @argument("--negative", "--negative-prompt", help="negative prompt (default ' ' when CFG > 1)")
    @argument("--preset", help=_PRESET_HELP)
    @argument("--n", type=int, default=1, help="number of images")
    @argument("--out", help="folder for the PNGs (default: QwenMagics.save_dir)")
    @argument("--no-save", action="store_true", help="do not write PNGs")
    @argument("--enhance", action="store_true", help="rewrite the prompt with the text encoder first")
    @argument("--preview", action="store_true", help="preview the image every 2 steps (QwenMagics.preview)")
    @argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="load a LoRA (file, folder or hub id) at SCALE (default 1); it stays loaded; repeat for several",
    )
    @argument("--init-image", help="image-to-image: start from this image (_, a variable or a path)")
    @argument(
        "--strength", type=float, help="img2img/inpainting: share of the image redrawn, 0 < s <= 1 (0.6)"
    )
    @argument(
        "--mask", help="inpainting: white redraws, black keeps (_, a variable or a path; the image's size)"
    )
    @cell_magic
    def qwen_generate(self, line: str, cell: str) -> GenerationResult:
        """Generate images from the cell body (the prompt).

        ``{name}`` in the prompt is filled from the notebook's variables; write ``{{`` and ``}}`` for literal
        braces. The result is returned (``_`` holds it) and added to ``%qwen history``.

        Example::

            %%qwen_generate --steps 20 --cfg 4 --seed 7 --aspect 16:9
            A coffee shop entrance with a chalkboard sign reading "Qwen Coffee 😊 $2 per cup"
        """
        options = _parse_options(self.qwen_generate, "%%qwen_generate", line)
        body = cell.strip()
        if not body:
            raise UsageError("the cell is empty: write the prompt in the cell body")
        prompt = fill_prompt(body, self.shell.user_ns if self.shell is not None else {})
        return self.generate_cell(prompt, options)

    @magic_arguments()
    @argument(
        "--image",
        action="append",
        help="an image to edit: _ (the last result), a variable or a path; repeat "
        "for up to 3 references (2509/2511)",
    )
    @argument(
        "--model", help="edit model to load (default: the loaded edit model, a local one, else toy-edit)"
    )
    @argument("--steps", type=int, help="denoising steps (at least 2)")
    @argument("--cfg", type=float, help="true_cfg_scale; 1 turns guidance off")
    @argument("--seed", type=int, help="random seed (drawn and shown when omitted)")
    @argument("--size", help="output WIDTHxHEIGHT (default: the first image's, rounded to multiples of 16)")
    @argument("--negative", "--negative-prompt", help="negative prompt (default ' ' when CFG > 1)")
    @argument("--out", help="folder for the PNGs (default: QwenMagics.save_dir)")
    @argument("--no-save", action="store_true", help="do not write PNGs")
    @cell_magic
    def qwen_edit(self, line: str, cell: str) -> GenerationResult:
        """Edit images by the instruction in the cell body (Qwen-Image-Edit 2511/2509/first release).

        ``--image`` takes ``_`` (the last result), a variable holding a PIL image, a numpy array, image bytes or a
        result, or a file path; repeat it for up to 3 reference images. ``{name}`` in the instruction is filled
        from the notebook's variables. The output is the first image's size (rounded to multiples of 16).

        Example::

            %%qwen_edit --image _ --seed 7
            Make the sky purple and keep everything else as it is
        """
        options = _parse_options(self.qwen_edit, "%%qwen_edit", line)
        body = cell.strip()
        if not body:
            raise UsageError("the cell is empty: write the edit instruction in the cell body")
        instruction = fill_prompt(body, self.shell.user_ns if self.shell is not None else {})
        return self.edit_cell(instruction, options)

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
        if cmd not in ("help", "presets", "history", "save", "load"):
            self.ready()
        try:
            return handler(rest)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None

    def _qwen_help(self, rest: str) -> None:
        print(
            "%qwen info               card, memory in use, plan, active optimisations\n"
            "%qwen plan [MODEL]       the plan for the loaded (or another) model\n"
            "%qwen presets            the presets and load modes, and what they trade\n"
            "%qwen history            recent results as thumbnails with their parameters\n"
            "%qwen history save|load PATH.jsonl   keep the history in a file (PNGs beside it)\n"
            "%qwen history regenerate|panel N     run entry N again, or put it in the panel\n"
            "%qwen save [N] FOLDER    save history entry N (default the last) as PNG\n"
            "%qwen sweep AXIS=a,b [AXIS=c,d] [options] PROMPT   a grid over seed, cfg, steps, preset or {name}\n"
            "%qwen load MODEL [k=v]   load a model, e.g. %qwen load qwen-image mode=turbo\n"
            "%qwen unload             free the model and its GPU memory\n"
            "%qwen enhance PROMPT     rewrite a prompt with the text encoder\n"
            "%qwen describe PATH      describe an image's style for use as a prompt\n"
            "%qwen lora add PATH [SCALE] [name=N] | list | scale NAME SCALE | remove NAME|all | off | on\n"
            "%qwen batch FILE [opts]  many images from a prompt file, resumable (%qwen batch --help)\n"
            "%%qwen_generate [opts]   generate from the cell body (%%qwen_generate? for options)\n"
            "%%qwen_edit --image X    edit images by the instruction in the cell body\n"
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
        words = _model_words("plan", rest)
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
        words = rest.split(maxsplit=1)
        sub = words[0] if words else ""
        arg = words[1].strip().strip("'\"") if len(words) > 1 else ""
        if sub == "":
            return _History(self.session.history, self)
        if sub == "save":
            if not arg:
                raise UsageError("usage: %qwen history save PATH.jsonl")
            path = self.session.save_history(arg)
            print(f"qwennb: {len(self.session.history)} entries written to {path}")
            return None
        if sub == "load":
            if not arg:
                raise UsageError("usage: %qwen history load PATH.jsonl")
            n = self.session.load_history(arg)
            print(f"qwennb: {n} entries read from {arg}")
            return _History(self.session.history, self)
        if sub == "clear":
            self.session.history.clear()
            return None
        if sub in ("regenerate", "panel"):
            index = _index(arg)
            if sub == "regenerate":
                return self.regenerate(index)
            return self.send_to_panel(index)
        raise UsageError(
            f"unknown %qwen history command {sub!r}: use %qwen history [save PATH | load PATH | regenerate N | "
            "panel N | clear]"
        )

    def regenerate(self, index: int) -> GenerationResult:
        """Generate history entry ``index`` again (same parameters, same seed), as a new entry."""
        entry = self.session.entry(index)
        opts = _Namespace(
            steps=entry.steps,
            cfg=entry.cfg,
            seed=entry.seed,
            size=f"{entry.width}x{entry.height}",
            aspect=None,
            negative=entry.negative_prompt if entry.negative_prompt != " " else None,
            preset=None,
            n=entry.num_images,
            out=None,
            no_save=False,
            enhance=False,
            preview=False,
        )
        return self.generate_cell(entry.prompt, opts)

    def send_to_panel(self, index: int) -> Any:
        """Put history entry ``index``'s parameters into the panel (opening one if none is open)."""
        entry = self.session.entry(index)
        if self.panel is None:
            self.qwen_ui("")
        self.panel.load_params(entry.params(), image=entry.images[0] if entry.images else None)
        return self.panel.widget

    def _qwen_save(self, rest: str) -> None:
        words = _split_words(rest, "the %qwen save line")
        if len(words) == 1:
            index, folder = -1, words[0]
        elif len(words) == 2:
            index, folder = _index(words[0]), words[1]
        else:
            raise UsageError("usage: %qwen save [N] FOLDER (N: a %qwen history entry, default the last)")
        entry = self.session.entry(index)
        if not entry.images:
            raise UsageError(f"history entry {index} has no image (the run was interrupted)")
        try:
            paths = entry.save(folder, embed_metadata=self.embed_metadata)
        except OSError as exc:
            raise UsageError(f"cannot save to {folder}: {exc.strerror or exc}; try another folder") from None
        print("\n".join(paths))

    def _qwen_sweep(self, rest: str) -> Any:
        return self.sweep_line(rest)

    def sweep_line(self, line: str) -> Any:
        """``%qwen sweep AXIS=v1,v2 [AXIS=...] [options] PROMPT``: a grid of images over one or two axes."""
        import shlex

        from .sweep import is_axis_word, parse_axes

        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot read the sweep line: {exc}") from None
        axis_words = []
        while words and is_axis_word(words[0]):
            axis_words.append(words.pop(0))
        if not axis_words:
            raise UsageError(
                "usage: %qwen sweep AXIS=v1,v2 [AXIS=v1,v2] [options] PROMPT (axes: seed, cfg, steps, preset, {placeholder})"
            )
        options, prompt_words = self.qwen_generate.parser.parse_known_args(words)
        unknown = [w for w in prompt_words if w.startswith("--")]
        if unknown:
            raise UsageError(f"unknown option {unknown[0]} (see %%qwen_generate? for the options)")
        prompt = " ".join(prompt_words).strip()
        if not prompt:
            raise UsageError("the sweep has no prompt: write it after the axes and options")
        if options.enhance:
            raise UsageError(
                "--enhance is not available in a sweep: enhance once with %qwen enhance, then sweep"
            )
        try:
            axes = parse_axes(axis_words, prompt)
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        opts = self.cell_options(options)
        out = opts.pop("out", None)
        try:
            from .sweep import plan_cells

            plan_cells(prompt, axes, opts)  # every cell checked before the model loads
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        if not self.session.loaded:
            self.load()
        handle = display(_Text("qwennb: sweep starting..."), display_id=True)

        def on_cell(cell: Any, k: int, total: int) -> None:
            handle.update(_Text(f"qwennb: sweep cell {k}/{total} ({cell.values}) in {cell.seconds:.1f} s"))

        try:
            sweep = self.session.sweep(prompt, axes, on_cell=on_cell, **opts)
        except QwennbError as exc:
            handle.update(_Text(""))
            raise UsageError(str(exc)) from None
        handle.update(_Text(f"qwennb: sweep done: {len(sweep.cells)} cells in {sweep.total_s:.1f} s"))
        if out:
            try:
                sweep.save(out)
            except OSError as exc:
                raise UsageError(
                    f"the sweep ran but its grid could not be saved to {out} ({exc.strerror or exc}); its images "
                    "are in %qwen history: %qwen save N FOLDER"
                ) from None
        return sweep

    def _qwen_load(self, rest: str) -> Any:
        words = _model_words("load", rest)
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

    def _qwen_lora(self, rest: str) -> Any:
        """``%qwen lora add PATH [SCALE] [name=NAME] | list | scale NAME SCALE | remove NAME|all | off | on``."""
        words = _split_words(rest, "the %qwen lora line")
        usage = "usage: %qwen lora add PATH [SCALE] [name=NAME] | list | scale NAME SCALE | remove NAME|all | off | on"
        if not words:
            raise UsageError(usage)
        cmd, args = words[0], words[1:]
        if cmd == "list":
            return _Text(lora_table(self.session.lora_list()))
        if not self.session.loaded:
            self.load()
        if cmd == "add" and 1 <= len(args) <= 3:
            name = next((a.split("=", 1)[1] for a in args[1:] if a.startswith("name=")), None)
            rest_args = [a for a in args[1:] if not a.startswith("name=")]
            scale = _number(rest_args[0]) if rest_args else 1.0
            info = self.session.lora_add(args[0].strip("'\""), scale, name)
            return _Text(f"qwennb: LoRA {info}")
        if cmd == "scale" and len(args) == 2:
            info = self.session.lora_scale(args[0], _number(args[1]))
            return _Text(f"qwennb: LoRA {info}")
        if cmd == "remove" and len(args) == 1:
            self.session.lora_remove(None if args[0] == "all" else args[0])
            return _Text(f"qwennb: removed {'every LoRA' if args[0] == 'all' else 'LoRA ' + args[0]}")
        if cmd in ("off", "on") and not args:
            (self.session.lora_disable if cmd == "off" else self.session.lora_enable)()
            return _Text(f"qwennb: LoRAs {cmd}")
        raise UsageError(usage)

    def _qwen_batch(self, rest: str) -> Any:
        """``%qwen batch FILE [--out DIR] [--steps N] ... [--ray auto|ADDRESS] [--background]``: a prompt file
        to a folder of images, with a live progress widget. On the loaded model unless ``--ray``/``--workers``
        ask for other workers; ``--background`` returns at once (Stop button; ``_.result`` when done)."""
        import argparse
        import inspect
        import shlex

        from .batch import check_batch, run_batch
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
                # the prompt file and the folder are checked before the model loads (a typo costs no load)
                checked = inspect.signature(check_batch).parameters
                check_batch(args.file, args.out, **{k: v for k, v in options.items() if k in checked})
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

        self.ready()
        overrides = {"mode": self.mode} if self.mode else None
        try:  # the model loads at the first Generate (after the panel's options are checked), not here
            self.panel = QwenPanel(
                self.session,
                save_dir=self.save_dir,
                embed_metadata=self.embed_metadata,
                model=self.model or None,
                overrides=overrides,
            )
        except QwennbError as exc:
            raise UsageError(str(exc)) from None
        return self.panel.widget


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


class _History(_Text):
    """``%qwen history``: a thumbnail grid with parameters, and with Regenerate / To panel buttons where widgets
    render (the HTML grid elsewhere); ``_[N]`` is entry N."""

    def __init__(self, results: list[GenerationResult], magics: QwenMagics | None = None) -> None:
        super().__init__(history_text(results), history_html(results))
        self.results = list(results)
        self.magics = magics
        self._widget: Any = None

    @property
    def widget(self) -> Any:
        """The ipywidgets grid (made on first use)."""
        if self._widget is None:
            from .widgets import history_widget

            m = self.magics
            self._widget = history_widget(
                self.results,
                on_regenerate=(lambda i: m.regenerate(i)) if m is not None else None,
                # a panel already open is updated in place; a new one is shown under the grid
                on_panel=(lambda i: m.send_to_panel(i) if m.panel is None else m.send_to_panel(i) and None)
                if m is not None
                else None,
            )
        return self._widget

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle: dict[str, Any] = dict(super()._repr_mimebundle_(include, exclude))
        if self.results:
            try:
                view = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
            except Exception:  # noqa: BLE001 - no widget front end: the HTML grid stays
                view = {}
            bundle.update({k: v for k, v in view.items() if k != "text/plain"})
        return bundle

    def __getitem__(self, index: int) -> GenerationResult:
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)


class _Namespace:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _index(text: str) -> int:
    try:
        return int(text.strip().lstrip("#"))
    except ValueError:
        raise UsageError(f"a history entry is a number (see %qwen history), got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"a LoRA scale is a number, got {text!r}") from None


def lora_table(infos: list[Any]) -> str:
    """The loaded LoRAs, one a line (``%qwen lora list``)."""
    if not infos:
        return "no LoRA loaded"
    return "\n".join(str(i) for i in infos)


def _esc(s: str) -> str:
    import html

    return html.escape(s)


def register_plan_display(ip: Any) -> None:
    """Show a :class:`qwennb.plan.Plan` (plain data) as its text table and HTML table in this shell."""
    from .display import plan_html, plan_text
    from .plan import Plan

    formatters = ip.display_formatter.formatters
    formatters["text/plain"].for_type(Plan, lambda plan, p, cycle: p.text(plan_text(plan)))
    formatters["text/html"].for_type(Plan, plan_html)


def register_figure_display(ip: Any) -> None:
    """Show a matplotlib ``Figure`` (``result.timing_figure()``, the notebooks' charts) as a PNG in this shell.

    qwennb draws on ``matplotlib.figure.Figure`` without pyplot, and without pyplot a kernel shows a Figure only as
    ``<Figure size ...>`` text. Registered by name: matplotlib is not imported until a Figure is shown."""
    from .display import figure_png

    ip.display_formatter.formatters["image/png"].for_type_by_name("matplotlib.figure", "Figure", figure_png)


def load_extension(ip: Any) -> QwenMagics:
    magics = QwenMagics(shell=ip)
    ip.register_magics(magics)
    register_plan_display(ip)
    register_figure_display(ip)
    if magics.autoload and os.environ.get("QWENNB_AUTOLOAD", "1") != "0":
        try:
            magics.load(background=magics.background_load)
        except UsageError as exc:
            # The extension stays loaded; the magics say what to do.
            display(_Text(f"qwennb: could not load the model: {exc}"))
    return magics
