"""Evaluate a text-to-image module on a UniBench-style prompt set, per split and language (no Trainer needed).

:func:`evaluate_prompt_set` uses only the generation protocol (``generate``, ``sampler``, ``guidance``,
``conditioner.text_key``) and is wrapped by the callback
:class:`~lightning_dpmot.callbacks.prompt_eval.PromptSetEvaluation` (``dpmot test``); experiment scripts call it
directly, e.g. once per guidance setting::

    module = load_diffusion_module("runs/.../last.ckpt").to("cuda")       # lightning_dpmot.models.dpm_ot
    prompt_set = read_prompt_set("../shared/unibench")                      # read once
    scorer = ClipScorer(load_matching_model("/models/clip-vit-large-patch14").cuda(), name="clip-L/14")
    rows = []
    for name, spec in settings.items():                                     # {name: GuidanceSpec}
        check_scorer_not_guide("/models/clip-vit-large-patch14", spec)      # sources compared as paths
        rows += evaluate_prompt_set(module, prompt_set, guidance=spec, scorer=scorer, k=4,
                                    out_dir=f"out/{name}", extra={"setting": name})

**Seeds.** Sample j of prompt i of a split has seed ``seed_offset + j * SEED_STRIDE + i``
(:func:`sample_seeds`): independent of ``k``, of ``max_prompts`` and of the language, so the same prompt gets the
same start noise in every language, guidance setting and split size. Work is sharded over ranks (rank r generates
items r, r + W, ... of the prompt-major list) and gathered in order.

**Languages.** Every request holds every language's line (``{"caption_en": [...], "caption_zh": [...]}``): the LM
reads its own key (``caption_en``: for an English-only LM the Chinese rows are generated from the English line),
and with ``match_language`` the matching models of cross-modal guidance read the evaluated language's line
(``guidance.with_guide_text_key``), UPainting's bilingual pairing. When the guidance reads no language-specific line
(no cross-modal guidance, or ``match_language=False``), all languages of a split share one generation (identical
images; column ``images_of`` names the language that generated them) and differ only in the scorer's prompt.

**Reported per (split, language)** (:data:`RESULT_COLUMNS`): prompt and image counts; caption accuracy (exact and
per attribute, :mod:`~lightning_dpmot.metrics.shapes_captions`) when the split has labels and a caption scorer is
given; FID on the classifier's features against k real renders of every label, with both sample counts; the mean
(and std) CLIP score ``max(100 cos, 0)`` by the scorer against the evaluated language's line; the NFE; seconds per
image (generation wall time summed over ranks / images); peak memory (``memory_kind``: ``cuda_max_allocated``, the
CUDA allocator's peak during the split's generation on the rank with the largest one, or ``cpu_peak_rss``, the
process's peak resident set size so far, which includes everything the process ever held) and the same divided by
the generation batch size (``peak_memory_mb_per_image``).
"""

from __future__ import annotations

import csv
import math
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_dpmot.data.prompt_sets import DEFAULT_LANGUAGES, DEFAULT_SPLITS, check_languages, read_prompt_set
from lightning_dpmot.metrics.clip_score import ClipScorer
from lightning_dpmot.metrics.shapes_captions import ACCURACY_KEYS, ShapesCaptionScorer
from lightning_dpmot.utils.images import save_captioned_grid, save_png

#: Seed stride between the samples of one prompt (at most this many prompts per split).
SEED_STRIDE = 100_000
RESULT_COLUMNS: tuple[str, ...] = (
    "split",
    "language",
    "prompt_key",
    "lm_key",
    "guide_key",
    "images_of",
    "n_prompts",
    "k",
    "n_images",
    *ACCURACY_KEYS,
    "clip_score",
    "clip_score_std",
    "scorer",
    "fid",
    "fid_n_generated",
    "fid_n_real",
    "nfe",
    "seconds_per_image",
    "peak_memory_mb",
    "peak_memory_mb_per_image",
    "memory_kind",
)
PROMPT_COLUMNS: tuple[str, ...] = (
    "split",
    "language",
    "prompt_index",
    "sample",
    "seed",
    "prompt",
    "lm_prompt",
    "file",
    "clip_score",
)
Gather = Callable[[Tensor], Tensor]


def sample_seeds(num_prompts: int, k: int, seed_offset: int = 0) -> Tensor:
    """(P * k,) int64 seeds in prompt-major order: item ``i * k + j`` = ``seed_offset + j * SEED_STRIDE + i``."""
    if not 1 <= num_prompts <= SEED_STRIDE or k < 1:
        raise ValueError(f"need 1 <= num_prompts <= {SEED_STRIDE} and k >= 1, got {num_prompts} and {k}")
    i = torch.arange(num_prompts).repeat_interleave(k)
    j = torch.arange(k).repeat(num_prompts)
    return seed_offset + j * SEED_STRIDE + i


def check_scorer_not_guide(scorer: Any, guidance: Any) -> None:
    """ValueError when a scorer (a source string or a loaded model, or a mapping language -> either) is one of the
    guidance's matching models. Loaded models are compared by identity only: pass sources to compare paths."""
    cross = getattr(guidance, "cross_modal", None)
    if scorer is None or cross is None:
        return
    if isinstance(scorer, Mapping):
        for value in scorer.values():
            check_scorer_not_guide(value, guidance)
        return
    for guide in cross.guides:
        same = (
            _same_source(scorer, guide.source)
            if isinstance(scorer, (str, Path))
            else scorer is guide.model or scorer is guide.load()
        )
        if same:
            raise ValueError(
                f"the scorer {str(scorer)!r} is also a guide of the cross-modal guidance ({guide.source!r}): guidance "
                "optimises its guide's similarity, so score with a different matching model"
            )


def _same_source(a: str | Path, b: str | Path) -> bool:
    return str(a) == str(b) or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@dataclass
class _Generation:
    """One split's images (all ranks' work, in item order, CPU) and this rank's share (on the device)."""

    images: Tensor  # (N, C, H, W)
    local_images: Tensor  # (n_r, C, H, W)
    local_items: Tensor  # (n_r,) item indices
    language: str
    nfe: int
    seconds_per_image: float
    peak_memory_mb: float
    batch_size: int


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss"


def _generate(
    module: Any,
    records: list[dict[str, Any]],
    keys: Sequence[str],
    seeds: Tensor,
    k: int,
    batch_size: int,
    sampler: Any,
    guidance: Any,
    rank: int,
    world_size: int,
    gather: Gather,
    language: str,
) -> _Generation:
    device = module.device
    items = torch.arange(rank, len(seeds), world_size)
    parts, seconds, nfe = [], 0.0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for chunk in items.split(batch_size):
        prompts = [records[int(t) // k] for t in chunk]
        raw = {key: [p[key] for p in prompts] for key in keys}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = module.generate(seeds[chunk], raw, spec=sampler, guidance=guidance)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        parts.append(result.x.detach().float())
        nfe = int(result.nfe)
    local = torch.cat(parts) if parts else torch.zeros(0, *module.data_shape, device=device)
    if not bool(torch.isfinite(local).all()):
        raise RuntimeError(f"non-finite samples in the generation for {language!r}: check the guidance settings")
    peak, _ = _peak_memory_mb(device)
    stats = gather(torch.tensor([[seconds, float(len(items)), peak]], dtype=torch.float64, device=device)).cpu()
    images = gather(local).cpu()[torch.argsort(gather(items.to(device)).cpu())]
    return _Generation(
        images=images,
        local_images=local,
        local_items=items,
        language=language,
        nfe=nfe,
        seconds_per_image=float(stats[:, 0].sum() / stats[:, 1].sum().clamp_min(1)),
        peak_memory_mb=float(stats[:, 2].max()),
        batch_size=min(batch_size, max(len(items), 1)),
    )


def _guide_keys(guidance: Any) -> tuple[str, ...]:
    cross = getattr(guidance, "cross_modal", None)
    if cross is None or not guidance.needs_grad:
        return ()
    return tuple(dict.fromkeys(g.text_key for g in cross.guides))


def evaluate_prompt_set(
    module: Any,
    prompts: str | Path | Mapping[str, list[dict[str, Any]]],
    *,
    languages: Mapping[str, str] | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    k: int = 1,
    max_prompts: int | None = None,
    batch_size: int = 32,
    sampler: Any = None,
    guidance: Any = None,
    match_language: bool = True,
    scorer: ClipScorer | Mapping[str, ClipScorer] | None = None,
    caption_scorer: ShapesCaptionScorer | None = None,
    fid: bool = True,
    seed_offset: int = 0,
    out_dir: str | Path | None = None,
    grid_size: int = 32,
    extra: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate k images per prompt of every split, score them per language, optionally write the outputs.

    Args:
        module: a generative module (``generate(seeds, raw_cond, spec=, guidance=)``, ``sampler``, ``guidance``,
            ``device``, ``data_shape``; the LM's key from ``conditioner.text_key`` when it has one).
        prompts: a UniBench-style folder (:func:`~lightning_dpmot.data.prompt_sets.read_prompt_set`) or the
            ``{split: records}`` it returns (read once, reused across calls).
        languages: folder -> raw-condition key (default English: caption_en, Chinese: caption_zh).
        splits, max_prompts: the splits, and the first n prompts of each.
        k: images per prompt; batch_size: images per ``generate`` call on each rank.
        sampler, guidance: default the module's; ``match_language``: guides read the evaluated language's line.
        scorer: CLIP scorer of every language, or language folder -> scorer (e.g. an English CLIP and a
            Chinese-CLIP; languages without one get no CLIP score), None: no CLIP score.
        caption_scorer: caption accuracy (and FID with ``fid``) of labelled splits (None: none).
        seed_offset: added to every seed (:func:`sample_seeds`).
        out_dir: when given, rank 0 writes ``results.csv``, ``prompts.csv``, a ``<split>_<language>.png`` grid of
            the first ``grid_size`` images with their prompts, and every image under ``images/``.
        extra: constant leading columns of every row (e.g. the name of a guidance setting).
        rank, world_size, gather: this process's share and a collective that concatenates every rank's rows in
            rank order (``lambda t: gather_rows(trainer, t)``; identity on one process).
        log: progress lines (e.g. ``print``).

    Returns:
        One row per (split, language) with ``extra`` + :data:`RESULT_COLUMNS` (missing values None); complete on
        rank 0 (caption accuracy and FID are computed there only).
    """
    if k < 1 or batch_size < 1 or grid_size < 0:
        raise ValueError(f"need k >= 1, batch_size >= 1 and grid_size >= 0, got {k}, {batch_size}, {grid_size}")
    languages = check_languages(languages if languages is not None else DEFAULT_LANGUAGES)
    if isinstance(prompts, Mapping):
        missing = [split for split in splits if split not in prompts]
        if missing:
            raise ValueError(f"the prompt set has no split(s) {missing}; it has {sorted(prompts)}")
        prompt_set = {split: list(prompts[split])[:max_prompts] for split in splits}
    else:
        prompt_set = read_prompt_set(prompts, languages, splits, max_prompts)
    keys = list(languages.values())
    lm_key = getattr(getattr(module, "conditioner", None), "text_key", None)
    if lm_key is not None and lm_key not in keys:
        raise ValueError(f"the model's LM reads {lm_key!r}, which the prompt set's languages {languages} do not give")
    guidance = guidance if guidance is not None else module.guidance
    sampler = sampler if sampler is not None else module.sampler
    scorers = dict(scorer) if isinstance(scorer, Mapping) else dict.fromkeys(languages, scorer)
    unknown = sorted(set(scorers) - set(languages))
    if unknown:
        raise ValueError(f"scorers given for {unknown}, which are not among the languages {sorted(languages)}")
    check_scorer_not_guide({lang: getattr(s, "model", None) for lang, s in scorers.items() if s is not None}, guidance)
    gather = gather or (lambda t: t)
    writing = out_dir is not None and rank == 0
    out = Path(out_dir) if out_dir is not None else Path(".")
    rows: list[dict[str, Any]] = []
    prompt_rows: list[dict[str, Any]] = []
    for split, records in prompt_set.items():
        seeds = sample_seeds(len(records), k, seed_offset)
        generations: dict[tuple[str, ...], _Generation] = {}
        for language, key in languages.items():
            spec = (
                guidance.with_guide_text_key(key)
                if match_language and hasattr(guidance, "with_guide_text_key")
                else guidance
            )
            guide_keys = _guide_keys(spec)
            gen = generations.get(guide_keys)
            if gen is None:
                args = (module, records, keys, seeds, k, batch_size, sampler, spec, rank, world_size, gather, language)
                gen = generations[guide_keys] = _generate(*args)
                if writing:
                    for t, image in enumerate(gen.images):
                        save_png(image, out / "images" / f"{split}_{language}" / f"i{t // k:05d}_j{t % k:02d}.png")
            texts = [records[int(t) // k][key] for t in range(len(seeds))]
            scores, lang_scorer = None, scorers.get(language)
            if lang_scorer is not None:
                local = lang_scorer(gen.local_images, [texts[int(t)] for t in gen.local_items])
                device = gen.local_images.device
                items = gather(gen.local_items.to(device)).cpu()
                scores = gather(local.to(device)).cpu()[torch.argsort(items)]
            row = _row(split, language, key, lm_key, guide_keys, gen, len(records), k, scores, lang_scorer)
            labels = [r.get("label") for r in records]
            if caption_scorer is not None and rank == 0 and all(label is not None for label in labels):
                item_labels = [labels[t // k] for t in range(len(seeds))]
                row.update(caption_scorer.accuracy(gen.images, item_labels))
                if fid:
                    row["fid"], row["fid_n_generated"], row["fid_n_real"] = caption_scorer.fid(gen.images, labels)
            rows.append({**(extra or {}), **row})
            if writing:
                captions = [
                    t if lm_key in (None, key) else f"{t}\n(LM: {records[int(i) // k][lm_key]})"
                    for i, t in enumerate(texts)
                ]
                _grid(
                    gen.images[:grid_size],
                    captions[:grid_size],
                    out / f"{split}_{language}.png",
                    f"{split} / {language}, k={k}",
                )
                for t, seed in enumerate(seeds.tolist()):
                    prompt_rows.append(
                        {
                            "split": split,
                            "language": language,
                            "prompt_index": t // k,
                            "sample": t % k,
                            "seed": seed,
                            "prompt": texts[t],
                            "lm_prompt": records[t // k][lm_key] if lm_key else "",
                            "file": f"images/{split}_{gen.language}/i{t // k:05d}_j{t % k:02d}.png",
                            "clip_score": float(scores[t]) if scores is not None else None,
                        }
                    )
            if log is not None:
                log(_summary(rows[-1]))
    if writing:
        _write_csv(out / "results.csv", [*(extra or {}), *RESULT_COLUMNS], rows)
        _write_csv(out / "prompts.csv", list(PROMPT_COLUMNS), prompt_rows)
    return rows


def _row(
    split: str,
    language: str,
    key: str,
    lm_key: str | None,
    guide_keys: tuple[str, ...],
    gen: _Generation,
    num_prompts: int,
    k: int,
    scores: Tensor | None,
    scorer: ClipScorer | None,
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        split=split,
        language=language,
        prompt_key=key,
        lm_key=lm_key or "",
        guide_key="+".join(guide_keys),
        images_of=gen.language,
        n_prompts=num_prompts,
        k=k,
        n_images=len(gen.images),
        nfe=gen.nfe,
        seconds_per_image=gen.seconds_per_image,
        peak_memory_mb=gen.peak_memory_mb,
        peak_memory_mb_per_image=gen.peak_memory_mb / gen.batch_size,
        memory_kind="cuda_max_allocated" if gen.local_images.device.type == "cuda" else "cpu_peak_rss",
    )
    if scores is not None and scorer is not None:
        row.update(
            clip_score=float(scores.mean()),
            clip_score_std=float(scores.std()) if len(scores) > 1 else 0.0,
            scorer=scorer.name,
        )
    return row


_WIDE_RUN = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]+")
_WRAP = 24  # the grid's wrap width in characters (a double-width character takes two columns)


def _wrappable(text: str) -> str:
    """Cut runs of double-width characters (CJK: no spaces to wrap at) into lines of 12, each padded with no-break
    spaces to the wrap width, so that the grid's word wrap puts every piece on a line of its own."""

    def cut(match: re.Match[str]) -> str:
        run = match[0]
        pieces = [run[i : i + _WRAP // 2] for i in range(0, len(run), _WRAP // 2)]
        return " ".join(p.center(_WRAP, "\u00a0") for p in pieces)

    return _WIDE_RUN.sub(cut, text)


def _grid(images: Tensor, captions: list[str], path: Path, title: str) -> None:
    """The captioned grid; missing glyphs (e.g. Chinese without a CJK font) are drawn as boxes without warnings."""
    if not len(images):
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        save_captioned_grid(images, [_wrappable(c) for c in captions], path, title=title)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _summary(row: dict[str, Any]) -> str:
    parts = [f"{row['split']}/{row['language']}: {row['n_images']} images"]
    for key, fmt in (("exact", ".3f"), ("clip_score", ".2f"), ("fid", ".2f"), ("seconds_per_image", ".3f")):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:{fmt}}")
    return ", ".join(parts)


__all__ = [
    "PROMPT_COLUMNS",
    "RESULT_COLUMNS",
    "SEED_STRIDE",
    "check_scorer_not_guide",
    "evaluate_prompt_set",
    "sample_seeds",
]
