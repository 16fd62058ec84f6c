"""The widget panel with real ipywidgets objects: set values, click the buttons."""

import threading

import pytest

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
