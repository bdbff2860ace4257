"""Stop strings in streamed generation: nothing past a stop, nothing that may still become one."""

from __future__ import annotations

import pytest

from rsavq_core.errors import ConfigError
from rsavq_core.runtime.generation import SamplingParams, _TextStops


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def _feed(tokenizer, text: str, stops: tuple[str, ...]) -> tuple[list[str], _TextStops]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    hook = _TextStops(tokenizer, stops, prompt_len=0)
    for i in range(1, len(ids) + 1):
        hook._advance(ids[:i])
    hook.end()
    deltas = []
    while (d := hook.deltas.get()) is not None:
        deltas.append(d)
    return deltas, hook


def test_text_before_a_multi_token_stop_only(tokenizer) -> None:
    deltas, hook = _feed(tokenizer, " Paris. The city of light", (". The",))
    assert "".join(deltas) == " Paris" and hook.stopped
    assert all("." not in d for d in deltas), "a partial stop must be held back, not emitted"


def test_held_back_prefix_is_released_when_it_does_not_complete(tokenizer) -> None:
    deltas, hook = _feed(tokenizer, " Paris. Then Rome", (". The end",))
    assert "".join(deltas) == " Paris. Then Rome" and not hook.stopped


def test_no_stop_streams_everything(tokenizer) -> None:
    text = " naïve café — 東京"
    deltas, _ = _feed(tokenizer, text, ())
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"stop": ("",)},
        {"stop": ("a", "b", "c", "d", "e")},
    ],
)
def test_bad_sampling_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**bad)
