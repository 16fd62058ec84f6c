"""The widget panel with real ipywidgets objects: set values, click the buttons."""

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from qwennb.session import Session
from qwennb.widgets import CUSTOM, QwenPanel


@pytest.fixture(scope="module")
def session():
    s = Session()
    s.load("tiny")
    return s


@pytest.fixture
def panel(session, tmp_path):
    p = QwenPanel(session, save_dir=str(tmp_path))
    p.aspect.value = "1:1"
    return p


def test_sliders_do_not_run_anything_until_generate(panel, session):
    before = len(session.history)
    assert panel.steps.continuous_update is False and panel.cfg.continuous_update is False
    panel.steps.value = 5
    panel.cfg.value = 2.0
    panel.prompt.value = "a cat"
    assert len(session.history) == before and panel.last_result is None


def test_preset_moves_the_sliders_and_a_manual_change_makes_it_custom(panel):
    panel.preset.value = "high-quality"
    assert (panel.steps.value, panel.cfg.value) == (35, 4.0)
    panel.preset.value = "ultra-fast"
    assert (panel.steps.value, panel.cfg.value) == (12, 3.0)
    panel.steps.value = 7
    assert panel.preset.value == CUSTOM


def test_generate_produces_an_image_and_a_timing_figure(panel, tmp_path):
    panel.prompt.value = "a lighthouse"
    panel.steps.value = 3
    panel.randomize.value = False
    panel.seed.value = 42
    panel._stand_in_side = 64
    panel.generate_button.click()
    assert panel.generate_button.disabled  # disabled while running
    result = panel.wait()
    assert panel.last_error is None
    assert result.seed == 42 and result.steps == 3 and not result.interrupted
    assert panel.image.value[:8] == b"\x89PNG\r\n\x1a\n" and panel.timing.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert not panel.generate_button.disabled and panel.stop_button.disabled
    assert panel.progress.value == 3 and "seed 42" in panel.status.value
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_random_seed_toggle(panel):
    panel.prompt.value = "x"
    panel.steps.value = 2
    panel.randomize.value = True
    panel._stand_in_side = 64
    panel.generate_button.click()
    first = panel.wait().seed
    panel.generate_button.click()
    assert panel.wait().seed != first


def test_stop_ends_the_run_early(panel):
    panel.prompt.value = "a long run"
    panel.steps.value = 40
    panel._stand_in_side = 64
    reached = threading.Event()

    def press_stop(info):
        if info.step == 2:
            panel.stop_button.click()
            reached.set()

    panel.on_step_callbacks.append(press_stop)
    assert panel.stop_button.disabled
    panel.generate_button.click()
    assert not panel.stop_button.disabled
    result = panel.wait()
    panel.on_step_callbacks.clear()
    assert reached.is_set()
    assert result.interrupted and result.steps_completed == 2 and result.images  # partial image decoded
    # The panel works again after a stop.
    panel.steps.value = 2
    panel.generate_button.click()
    assert not panel.wait().interrupted


def test_empty_prompt_and_errors_are_shown_not_raised(panel):
    panel.prompt.value = "   "
    panel.generate_button.click()
    assert panel.status.value == "write a prompt first" and not panel.running
    panel.prompt.value = "x"
    panel.negative.value = ""
    panel._stand_in_side = 64
    panel.randomize.value = False
    panel.seed.value = -5  # refused by generate: a clear error in the status line
    panel.steps.value = 2
    panel.generate_button.click()
    panel.wait()
    assert panel.last_error and "seed must be" in panel.status.value
    assert not panel.generate_button.disabled


def test_enhance_toggle_records_both_prompts(panel):
    panel.prompt.value = "a tea house"
    panel.enhance.value = True
    panel.randomize.value = False
    panel.seed.value = 3
    panel.steps.value = 2
    panel._stand_in_side = 64
    panel.generate_button.click()
    result = panel.wait()
    assert panel.last_error is None
    assert result.original_prompt == "a tea house"


# ---- the image input: upload or the last result, strength, a mask painted in the browser


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _upload(panel, name, content):
    """What the browser sends when a file is chosen in the upload button."""
    panel.upload.set_state(
        {
            "value": [
                {
                    "name": name,
                    "type": "image/png",
                    "size": len(content),
                    "content": memoryview(content),
                    "last_modified": 0,
                }
            ]
        }
    )


def _painted(mask_l):
    """A mask as the painter's canvas sends it: an opaque black-and-white RGBA PNG as a data URL."""
    rgba = Image.merge("RGBA", [mask_l, mask_l, mask_l, Image.new("L", mask_l.size, 255)])
    return "data:image/png;base64," + base64.b64encode(_png(rgba)).decode("ascii")


def test_upload_sets_the_input_and_shows_strength_and_the_painter(panel):
    assert panel.strength.layout.display == "none" and panel.mask_box.layout.display == "none"
    picture = Image.new("RGB", (80, 48), "orange")
    _upload(panel, "orange.png", _png(picture))
    assert panel.input_image.size == (80, 48) and panel.input_image.getpixel((5, 5)) == (255, 165, 0)
    assert panel.upload.value == ()  # ready for the next file
    assert panel.input_thumb.layout.display == "" and panel.input_thumb.value[:4] == b"\x89PNG"
    assert panel.strength.layout.display == "" and panel.mask_box.layout.display == ""
    assert (panel.painter.width, panel.painter.height) == (80, 48)
    # what the browser's canvas gets (the synced state): the mask is painted at the input's size
    state = panel.painter.get_state()
    assert (state["width"], state["height"], state["image"]) == (80, 48, panel.painter.image)
    assert panel.painter.image.startswith("data:image/png;base64,") and panel.painter.mask == ""
    assert panel.aspect.disabled and "80x48 (upload orange.png)" in panel.status.value
    assert "no mask painted" in panel.mask_info.value
    # A large input crosses to the browser shrunk for display; the mask keeps the input's size.
    panel.set_input(Image.new("RGB", (3000, 1500), "gray"))
    shown = Image.open(io.BytesIO(base64.b64decode(panel.painter.image.partition(",")[2])))
    assert shown.size == (1024, 512) and (panel.painter.width, panel.painter.height) == (3000, 1500)
    panel.clear_input_button.click()
    assert panel.input_image is None and panel.strength.layout.display == "none"
    assert panel.painter.width == 0 and not panel.aspect.disabled


def test_a_non_image_upload_is_refused_in_one_line_and_nothing_is_lost(panel, session):
    good = Image.new("RGB", (64, 64), "blue")
    assert panel.set_input(good, "a blue square")
    before = len(session.history)
    _upload(panel, "notes.txt", b"just some text")
    assert panel.status.value == (
        "error: upload notes.txt: these 14 bytes are not an image PIL can read; the input image is unchanged"
    )
    assert panel.input_image is good and panel.painter.width == 64 and len(session.history) == before


def test_use_last_result_takes_the_panels_last_image(panel, session):
    fresh = QwenPanel(Session(), model="tiny")
    fresh.use_last_button.click()
    assert fresh.status.value == "no result yet: generate an image or upload one first"
    assert fresh.input_image is None
    panel.prompt.value = "a lighthouse"
    panel.steps.value = 2
    panel._stand_in_side = 64
    panel.generate_button.click()
    result = panel.wait()
    panel.use_last_button.click()
    assert panel.input_image.size == result.images[0].size
    assert np.array_equal(np.asarray(panel.input_image), np.asarray(result.images[0]))
    assert f"last result, seed {result.seed}" in panel.status.value
    # Generate with it runs image-to-image at the slider's strength, at the input's size.
    panel.strength.value = 0.5
    panel.generate_button.click()
    again = panel.wait()
    assert panel.last_error is None
    assert again.task == "img2img" and again.strength == 0.5 and again.images[0].size == (64, 64)
    assert len(again.step_times_s) == 1 and panel.status.value.startswith("img2img at strength 0.5 · seed")


def test_a_mask_of_another_size_is_refused_in_one_line_before_anything_runs(panel, session):
    panel.set_input(Image.new("RGB", (64, 64), "white"))
    panel.painter.mask = _painted(Image.new("L", (32, 32), 255))
    assert panel.mask_info.value.startswith("mask 32x32, 100% painted")
    before = len(session.history)
    panel.prompt.value = "x"
    panel.generate_button.click()
    assert not panel.running and len(session.history) == before
    assert panel.status.value == "error: the mask is 32x32 but the image is 64x64; they must match"
    assert panel.input_image is not None and panel.painter.mask  # nothing lost


def test_a_painted_mask_that_is_not_base64_is_refused_as_such(panel):
    panel.set_input(Image.new("RGB", (64, 64), "white"))
    panel.painter.mask = "data:image/png;base64,@@not*base64@@"
    assert panel.mask_info.value == "mask refused: the painted mask is not valid base64"
    # a real mask with a stray character is refused too, not read with the character skipped
    good = _painted(Image.new("L", (64, 64), 255))
    head, body = good.split(",", 1)
    panel.painter.mask = f"{head},{body[:40]}*{body[40:]}"
    assert panel.mask_info.value == "mask refused: the painted mask is not valid base64"


def test_painter_controls_move_the_brush_erase_and_clear(panel):
    panel.set_input(Image.new("RGB", (120, 60), "white"))
    assert panel.brush.value == panel.painter.brush == 12  # a tenth of the long side
    panel.brush.value = 30
    assert panel.painter.brush == 30
    panel.erase.value = True
    assert panel.painter.erase
    panel.erase.value = False
    assert not panel.painter.erase
    m = Image.new("L", (120, 60))
    m.paste(255, (0, 0, 30, 60))
    panel.painter.mask = _painted(m)
    assert panel.mask_info.value.startswith("mask 120x60, 25% painted")
    assert panel.painter.mask_image().getextrema() == (0, 255)
    panel.clear_mask_button.click()
    assert panel.painter.mask == "" and panel.painter.mask_image() is None
    assert "no mask painted" in panel.mask_info.value


@pytest.fixture(scope="module")
def toy_panel(tmp_path_factory):
    s = Session()
    s.load("toy")
    p = QwenPanel(s, save_dir=str(tmp_path_factory.mktemp("toy-out")))
    p.randomize.value = False
    p.seed.value = 1
    p.steps.value = 20
    return p


def _toy_input():
    from qwennb import toy

    scene = toy.Scene(shape="circle", colour="red", position="left", size="large", background="white")
    return toy.render(scene, 256, 256)


def test_strength_03_keeps_the_layout_and_10_follows_the_prompt(toy_panel):
    from qwennb import toy

    toy_panel.set_input(_toy_input(), "a red circle on the left")
    toy_panel.prompt.value = "a blue square on the right, black background"
    read = {}
    for s in (0.3, 1.0):
        toy_panel.strength.value = s
        toy_panel.generate_button.click()
        r = toy_panel.wait()
        assert toy_panel.last_error is None and r.task == "img2img" and r.images[0].size == (256, 256)
        read[s] = toy.read_image(r.images[0])
    assert (read[0.3].position, read[0.3].background) == ("left", "white"), read[0.3]
    assert (read[1.0].position, read[1.0].background) == ("right", "black"), read[1.0]


def test_a_painted_mask_makes_generate_inpaint_only_there(toy_panel):
    init = _toy_input()
    toy_panel.set_input(init, "a red circle on the left")
    mask = Image.new("L", (256, 256))
    mask.paste(255, (128, 0, 256, 256))  # the right half
    toy_panel.painter.mask = _painted(mask)
    toy_panel.prompt.value = "a blue square on the right, white background"
    toy_panel.strength.value = 1.0
    toy_panel.generate_button.click()
    r = toy_panel.wait()
    assert toy_panel.last_error is None and r.task == "inpaint" and r.images[0].size == (256, 256)
    assert toy_panel.status.value.startswith("inpaint at strength 1 · seed 1")
    a, o = np.asarray(init).astype(int), np.asarray(r.images[0]).astype(int)
    assert np.abs(o[:, :128] - a[:, :128]).max() <= 2  # the unmasked half stays
    assert np.abs(o[:, 128:] - a[:, 128:]).mean() > 10  # the masked half is redrawn
