"""Prompt sets laid out like UniBench: one folder per language, one file per split, lines aligned across languages.

::

    <root>/English/simple_scene.txt     line i = prompt i of the split in English
    <root>/Chinese/simple_scene.txt     line i = the same prompt in Chinese
    <root>/labels/simple_scene.jsonl    optional: line i = a JSON label of prompt i (the embedded shapes benchmark)

:func:`read_prompt_set` reads the splits into records ``{raw-condition key: line, ...}`` holding **every** language's
line (``{"caption_en": ..., "caption_zh": ...}`` by default), plus ``"label"`` when a label file exists: whichever
language is evaluated, the text-to-image model's LM reads its own key and a matching model may read another.
Files are read by :func:`~lightning_dpmot.data.prompts.read_prompt_files`, so a missing, empty, gapped or
non-UTF-8 file and files of different lengths are one error naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_dpmot.data.prompts import read_prompt_files

#: Folder -> raw-condition key of UniBench's two languages.
DEFAULT_LANGUAGES: dict[str, str] = {"English": "caption_en", "Chinese": "caption_zh"}
DEFAULT_SPLITS: tuple[str, ...] = ("simple_scene", "complex_scene")
LABELS_FOLDER = "labels"


def check_languages(languages: Mapping[str, str]) -> dict[str, str]:
    """``languages`` (folder -> key) as a dict; ValueError when empty or when two folders share a key."""
    languages = dict(languages)
    if not languages:
        raise ValueError("languages is empty: give at least one {folder: raw-condition key}, e.g. English: caption_en")
    keys = list(languages.values())
    if len(set(keys)) != len(keys) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"languages must map each folder to its own non-empty key, got {languages}")
    return languages


def read_labels(path: Path, count: int) -> list[dict[str, Any]]:
    """The JSON label of each line of ``path`` (``count`` lines expected); ValueError naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != count:
        raise ValueError(f"label file {str(path)!r} has {len(lines)} lines but the split has {count} prompts")
    labels = []
    for i, line in enumerate(lines):
        try:
            labels.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"label file {str(path)!r}, line {i + 1}: not JSON ({err.msg})") from None
    return labels


def read_prompt_set(
    root: str | Path,
    languages: Mapping[str, str] | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    max_prompts: int | None = None,
    labels: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Read a UniBench-style prompt folder.

    Args:
        root: the folder (relative paths are relative to the working directory).
        languages: folder -> raw-condition key (default :data:`DEFAULT_LANGUAGES`).
        splits: file stems to read (``<folder>/<split>.txt``).
        max_prompts: keep only the first n prompts of each split (None = all).
        labels: attach ``"label"`` from ``labels/<split>.jsonl`` when that file exists.

    Returns:
        ``{split: [record, ...]}``, record = ``{key: line for every language}`` (+ ``"label"``), in file order.
    """
    languages = check_languages(languages if languages is not None else DEFAULT_LANGUAGES)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"prompt set folder {str(root)!r} does not exist (expected <language>/<split>.txt)")
    if isinstance(splits, str) or not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be a non-empty list of distinct file stems, got {splits!r}")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1 or None, got {max_prompts}")
    (first, first_key), *others = languages.items()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in splits:
        records = read_prompt_files(root / first / f"{split}.txt", key=first_key)
        for folder, key in others:
            pairs = read_prompt_files(
                root / first / f"{split}.txt", root / folder / f"{split}.txt", key=first_key, aligned_key=key
            )
            for record, pair in zip(records, pairs, strict=True):
                record[key] = pair[key]
        label_file = root / LABELS_FOLDER / f"{split}.jsonl"
        if labels and label_file.is_file():
            for record, label in zip(records, read_labels(label_file, len(records)), strict=True):
                record["label"] = label
        out[split] = records[:max_prompts] if max_prompts is not None else records
    return out


__all__ = ["DEFAULT_LANGUAGES", "DEFAULT_SPLITS", "check_languages", "read_labels", "read_prompt_set"]
