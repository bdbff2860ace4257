"""Token counts the API checks datasets with: the model's own tokenizer, without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rsavq_core.data.text_files import parse_text
from rsavq_core.data.token_count import count_tokens, tokenizer_file, too_few_tokens
from rsavq_core.data.windows import wiki_documents
from rsavq_core.models.files import existing_folder
from rsavq_core.settings import override


def test_the_count_equals_the_tokens_the_windows_are_cut_from(smol_dir: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    text = parse_text("\n\n".join(wiki_documents()[:12]).encode(), "wiki-part")
    file = tokenizer_file(str(smol_dir))
    assert file == smol_dir / "tokenizer.json"
    expected = len(AutoTokenizer.from_pretrained(str(smol_dir))(text.joined(), add_special_tokens=False)["input_ids"])
    assert count_tokens(file, text.sha256, text.joined, at_least=10**9) == expected > 1000
    # in pieces cut before spaces, the pieces' counts add up to the whole text's
    monkeypatch.setattr("rsavq_core.data.token_count.CHUNK_CHARS", 2000)
    assert len(text.joined()) > 10 * 2000
    assert count_tokens(file, "same text, other key", text.joined, at_least=10**9) == expected


def test_counting_stops_at_what_the_job_needs_and_is_remembered(smol_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr("rsavq_core.data.token_count.CHUNK_CHARS", 2000)
    file = smol_dir / "tokenizer.json"
    text = "\n\n".join(wiki_documents()[:12])
    calls = []

    def read() -> str:
        calls.append(1)
        return text

    full = count_tokens(file, "hash-of-a-new-text", read, at_least=10**9)
    partial = count_tokens(file, "hash-of-another-text", read, at_least=1000)
    assert full is not None and partial is not None and 1000 <= partial < 1000 + 1000 < full
    assert len(calls) == 2
    assert count_tokens(file, "hash-of-another-text", read, at_least=900) == partial  # remembered
    assert count_tokens(file, "hash-of-a-new-text", read, at_least=10**9) == full  # the whole text: remembered
    assert len(calls) == 2
    assert count_tokens(file, "hash-of-another-text", read, at_least=10**9) == full  # more needed: counted again
    assert len(calls) == 3


def test_windows_need_length_minus_one_tokens_each_at_least() -> None:
    # BOS may take a window's first position: the check never refuses what the worker accepts
    assert too_few_tokens("notes", 30, 2, 16) is None
    short = too_few_tokens("notes", 29, 2, 16)
    assert (
        short
        == "notes holds 29 tokens of the model's tokenizer: too few for 2 windows of 16 tokens (at least 30 needed)"
    )
    assert "1 window of 512" in (too_few_tokens("notes", 10, 1, 512) or "")


def test_only_models_already_on_disk_are_found(smol_dir: Path, tmp_path: Path) -> None:
    with override(cache_dir=tmp_path / "empty-cache"):
        assert existing_folder("smollm2-135m") is None  # never converted here: nothing is converted
        assert tokenizer_file("smollm2-135m") is None
        assert tokenizer_file("nobody/no-such-model") is None
    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    shutil.copy(smol_dir / "config.json", no_tokenizer)
    assert existing_folder(str(no_tokenizer)) == no_tokenizer and tokenizer_file(str(no_tokenizer)) is None


def test_an_unreadable_tokenizer_file_counts_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    assert count_tokens(broken, "some-hash", lambda: "text", at_least=10) is None


@pytest.mark.parametrize("module", ["rsavq_core.data.token_count", "rsavq_core.models.files"])
def test_the_api_can_import_it_without_torch(module: str) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
