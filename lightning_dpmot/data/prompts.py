"""Prompt files for generation: one prompt per line, optionally with an aligned file in a second language.

The layout of UniBench and of ``benchmarks/shapes_bench/``: line *i* of ``English/complex_scene.txt`` and line *i* of
``Chinese/complex_scene.txt`` are the same prompt. :func:`read_prompt_files` reads such a pair (or a single file)
into prompt records ``{"caption_en": ..., "caption_zh": ...}`` — the keys the text-to-image model's conditioner and
the prediction writer use — and refuses files that cannot be what the user meant, with one error naming the file.
"""

from __future__ import annotations

from pathlib import Path


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines only
        lines.pop()
    if not lines:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt (one prompt per line)")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"prompt file {str(path)!r} has empty lines at {blank[:5]}: one prompt per line, no gaps")
    return [line.strip() for line in lines]


def read_prompt_files(
    path: str | Path, aligned: str | Path | None = None, key: str = "caption_en", aligned_key: str = "caption_zh"
) -> list[dict[str, str]]:
    """Prompt records from a file (one prompt per line) and an optional line-aligned file in another language.

    Returns ``[{key: line_i, aligned_key: aligned_line_i}, ...]`` (the aligned key only with ``aligned``).
    Raises FileNotFoundError / ValueError naming the file for a missing, empty, non-UTF-8 or gapped file, and for
    aligned files of different lengths.
    """
    lines = _read_lines(Path(path))
    if aligned is None:
        return [{key: line} for line in lines]
    other = _read_lines(Path(aligned))
    if len(other) != len(lines):
        raise ValueError(
            f"prompt files are not aligned: {str(path)!r} has {len(lines)} prompts, {str(aligned)!r} has {len(other)}"
        )
    return [{key: a, aligned_key: b} for a, b in zip(lines, other, strict=True)]


__all__ = ["read_prompt_files"]
