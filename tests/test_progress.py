"""sdekit.progress: plain lines off a terminal, a tqdm bar on one, SDEKIT_PROGRESS, and diffusers pipelines."""

from __future__ import annotations

import io
import re

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from sdekit.progress import PipelineProgress, Progress, pipeline_progress, progress_mode

from conftest import tiny_unet

LINE = re.compile(r"^(?P<desc>[\w-]+): +(?P<pct>\d+)% (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \[.*\](?P<extra>.*)$")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text
    return text.splitlines()


def _counts(lines: list[str]) -> list[int]:
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [int(m["n"]) for m in matches]


def test_lines_mode_prints_a_line_per_tenth_and_none_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", "lines")
    stream = io.StringIO()
    with Progress(100, "ddim", "step", stream=stream) as progress:
        for _ in range(100):
            progress.update(1, loss=0.5)
    lines = _lines(stream)
    assert _counts(lines) == list(range(10, 101, 10))  # the 100% line is the final one, not repeated by close()
    assert lines[3].startswith("ddim:  40% 40/100 step [") and lines[3].endswith(" loss=0.5")


def test_lines_mode_ends_with_a_final_line_where_the_work_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", "lines")
    stream = io.StringIO()
    with Progress(25, "analytic-ddpm", "step", stream=stream) as progress:
        for _ in range(17):
            progress.update(1)
    counts = _counts(_lines(stream))
    assert counts == [3, 5, 8, 10, 13, 15, 17]  # each tenth crossed once (12%, 20%, 32%, ...), then where it stopped

    unknown = io.StringIO()
    with Progress(None, "dopri5", "call", stream=unknown) as progress:
        for _ in range(7):
            progress.update(1)
    assert [line.split(" [")[0] for line in _lines(unknown)] == ["dopri5: 7 call"]  # no total: only the final line


def test_bar_mode_on_a_terminal_draws_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDEKIT_PROGRESS", raising=False)
    terminal = FakeTerminal()
    assert progress_mode(terminal) == "bar" and progress_mode(io.StringIO()) == "lines"
    with Progress(25, "ddim", "step", stream=terminal) as progress:
        assert progress.mode == "bar"
        for _ in range(25):
            progress.update(1)
    text = terminal.getvalue()
    assert "\r" in text and "ddim: 100%" in text and "25/25" in text
    assert not any(LINE.match(line) for line in text.splitlines())  # no plain lines besides the bar


@pytest.mark.parametrize("value,mode", [("bar", "bar"), ("LINES", "lines"), (" off ", "off")])
def test_sdekit_progress_forces_the_mode(monkeypatch: pytest.MonkeyPatch, value: str, mode: str) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", value)
    assert progress_mode(io.StringIO()) == mode and progress_mode(FakeTerminal()) == mode


def test_sdekit_progress_off_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", "off")
    stream = io.StringIO()
    with Progress(10, "ddim", stream=stream) as progress:
        for _ in range(10):
            progress.update(1)
        progress.write("a message")
    assert stream.getvalue() == ""


def test_a_bad_sdekit_progress_names_the_variable_the_value_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", "quiet")
    with pytest.raises(ValueError, match=r"SDEKIT_PROGRESS must be one of bar, lines, off, got 'quiet'"):
        Progress(10, "ddim", stream=io.StringIO())


def test_every_must_be_a_percentage() -> None:
    with pytest.raises(ValueError, match="every must be a percentage in \\(0, 100\\], got 0"):
        Progress(10, every=0)


def _tiny_pipeline() -> DDPMPipeline:
    return DDPMPipeline(unet=tiny_unet(channels=1), scheduler=DDPMScheduler(num_train_timesteps=50))


def test_pipeline_progress_labels_the_pipelines_own_loop_and_puts_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", "lines")
    pipe = _tiny_pipeline()
    stream = io.StringIO()
    with pipeline_progress(pipe, "ddpm", stream=stream) as reporter:
        assert pipe.progress_bar is reporter
        pipe(batch_size=1, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np")
    lines = _lines(stream)
    assert _counts(lines) == list(range(2, 21, 2)) and all(line.startswith("ddpm: ") for line in lines)
    assert "progress_bar" not in vars(pipe)  # the class's own method again

    with pytest.raises(RuntimeError), pipeline_progress(pipe, "failing", stream=stream):
        raise RuntimeError("a failing call")
    assert "progress_bar" not in vars(pipe)


def test_pipeline_progress_serves_the_total_form_and_restores_an_instance_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SDEKIT_PROGRESS", "lines")
    pipe = _tiny_pipeline()
    own = PipelineProgress("own", stream=io.StringIO())
    pipe.progress_bar = own
    stream = io.StringIO()
    with pipeline_progress(pipe, "sd-loop", unit="it", stream=stream):
        with pipe.progress_bar(total=4) as bar:  # the form Stable-Diffusion-style pipelines use
            for _ in range(4):
                bar.update()
    assert pipe.progress_bar is own
    assert [line.split(" [")[0] for line in _lines(stream)] == [
        "sd-loop:  25% 1/4 it", "sd-loop:  50% 2/4 it", "sd-loop:  75% 3/4 it", "sd-loop: 100% 4/4 it"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs an iterable or a total"):
        own()
