"""UniBench-style evaluation at the end of ``dpmot test``: per split and language, caption accuracy, CLIP score by a
separate scorer, FID, time and memory per image, grids and CSV tables.

    dpmot test --config configs/text2img/shapes.yaml --config configs/eval/shapes_text2img.yaml \\
        --ckpt_path runs/text2img-shapes/version_0/checkpoints/last.ckpt

:class:`PromptSetEvaluation` runs in ``on_test_epoch_end`` (the DataModule's test loop, e.g. the eval loss, runs
first) and wraps :func:`~lightning_dpmot.metrics.prompt_set_eval.evaluate_prompt_set` (seed rule, language
pairing, columns: that module's docstring), which experiment scripts can call without a Trainer. It writes under
``<log_dir>/<name>/``: ``results.csv`` (one row per split x language), ``prompts.csv`` (prompt, seed, file, CLIP
score per image), ``<split>_<language>.png`` (the first images with their prompts) and ``images/``; logs every
numeric column as ``eval/<split>/<language>/<column>`` through ``pl_module.log`` (so every logger, wandb included,
gets it), and the grids and the table as wandb images/table when a ``WandbLogger`` is present. Under
``fast_dev_run`` it evaluates the first 2 prompts per split with k = 1 (a smoke run of the whole path).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_dpmot.data.prompt_sets import DEFAULT_LANGUAGES, DEFAULT_SPLITS, check_languages, read_prompt_set
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.metrics.clip_score import ClipScorer
from lightning_dpmot.metrics.extractors import DEFAULT_CACHE_DIR
from lightning_dpmot.metrics.prompt_set_eval import RESULT_COLUMNS, check_scorer_not_guide, evaluate_prompt_set
from lightning_dpmot.metrics.shapes_captions import ShapesCaptionScorer
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.distributed import gather_rows

#: Columns logged as metrics (when numeric and finite).
LOGGED_COLUMNS = tuple(
    c for c in RESULT_COLUMNS if c not in ("split", "language", "prompt_key", "lm_key", "guide_key", "images_of")
)
FAST_DEV_PROMPTS = 2


class PromptSetEvaluation(L.Callback):
    """Evaluate the module on a UniBench-style prompt folder at the end of ``dpmot test``.

    Args:
        prompts: the folder (``<language>/<split>.txt``, optional ``labels/<split>.jsonl``); relative to the working
            directory. Read (and checked) when the callback is built.
        languages: folder -> raw-condition key (default ``{English: caption_en, Chinese: caption_zh}``).
        splits: file stems (default ``[simple_scene, complex_scene]``).
        k: images per prompt.
        max_prompts: only the first n prompts of each split (smoke tests); None = all.
        batch_size: images per ``generate`` call on each rank.
        sampler: default the module's.
        guidance: default the module's (e.g. CFG + cross-modal guidance, YAML like the model's ``guidance``).
        match_language: the guidance's matching models read the evaluated language's line; the LM always reads its
            own key (an English-only LM gets the English line of a Chinese prompt).
        scorer: matching-model source of the CLIP score (a ``ContrastiveMatchingModule`` ``.ckpt`` or a local CLIP
            directory, :func:`~lightning_dpmot.nets.matching.load_matching_model`), or language folder -> source
            (e.g. an English CLIP and a Chinese-CLIP); never a guide (refused). None: no CLIP score.
        scorer_batch_size: images per scorer pass.
        labels: caption accuracy with the shapes attribute classifier for splits with ``labels/<split>.jsonl``.
        fid: FID on the classifier's features against k real renders of each label (labelled splits).
        name: output subfolder of the log directory.
        seed_offset: added to every seed (sample j of prompt i: ``seed_offset + j * 100000 + i``).
        grid_size: images per grid.
        cache_dir: cache of the attribute classifier.
        classifier_options: training overrides of ``ShapesAttributeClassifier.for_data`` (e.g. ``num_train``).
    """

    def __init__(
        self,
        prompts: str,
        languages: dict[str, str] | None = None,
        splits: list[str] | None = None,
        k: int = 1,
        max_prompts: int | None = None,
        batch_size: int = 32,
        sampler: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
        match_language: bool = True,
        scorer: str | dict[str, str] | None = None,
        scorer_batch_size: int = 64,
        labels: bool = True,
        fid: bool = True,
        name: str = "prompt_eval",
        seed_offset: int = 0,
        grid_size: int = 32,
        cache_dir: str = DEFAULT_CACHE_DIR,
        classifier_options: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if k < 1 or batch_size < 1 or scorer_batch_size < 1:
            raise ValueError(
                f"k, batch_size and scorer_batch_size must be >= 1, got {k}, {batch_size}, {scorer_batch_size}"
            )
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"name must be a subfolder name of the log directory, got {name!r}")
        self.languages = check_languages(languages if languages is not None else DEFAULT_LANGUAGES)
        self.splits = list(splits) if splits is not None else list(DEFAULT_SPLITS)
        self.prompt_set = read_prompt_set(prompts, self.languages, self.splits, max_prompts, labels)
        self.prompts, self.k, self.max_prompts, self.batch_size = prompts, k, max_prompts, batch_size
        self.sampler, self.guidance, self.match_language = sampler, guidance, match_language
        self.scorer, self.scorer_batch_size = scorer, scorer_batch_size
        self.labels, self.fid, self.name, self.seed_offset, self.grid_size = labels, fid, name, seed_offset, grid_size
        self.cache_dir, self.classifier_options = cache_dir, dict(classifier_options or {})
        if isinstance(scorer, dict) and set(scorer) - set(self.languages):
            raise ValueError(
                f"scorer names languages {sorted(set(scorer) - set(self.languages))} not in {self.languages}"
            )
        check_scorer_not_guide(scorer, guidance)
        self.rows: list[dict[str, Any]] = []

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.name  # log_dir is a collective
        exists = trainer.strategy.broadcast((out_dir / "results.csv").exists())
        if exists:
            raise FileExistsError(f"PromptSetEvaluation: {out_dir / 'results.csv'} exists; choose another name")
        k, max_prompts = self.k, self.max_prompts
        if trainer.fast_dev_run:
            k, max_prompts = 1, min(max_prompts or FAST_DEV_PROMPTS, FAST_DEV_PROMPTS)
            rank_zero_info(f"PromptSetEvaluation: fast_dev_run, so only {max_prompts} prompts per split and k = 1")
        guidance = self.guidance if self.guidance is not None else pl_module.guidance
        check_scorer_not_guide(self.scorer, guidance)
        with torch.inference_mode(False), torch.no_grad():
            scorer = self.build_scorer(pl_module.device)
            caption_scorer = self.build_caption_scorer(pl_module, k) if trainer.is_global_zero else None
            self.rows = evaluate_prompt_set(
                pl_module,
                self.prompt_set,
                languages=self.languages,
                splits=self.splits,
                k=k,
                max_prompts=max_prompts,
                batch_size=self.batch_size,
                sampler=self.sampler,
                guidance=guidance,
                match_language=self.match_language,
                scorer=scorer,
                caption_scorer=caption_scorer,
                fid=self.fid,
                seed_offset=self.seed_offset,
                out_dir=out_dir,
                grid_size=self.grid_size,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                gather=lambda t: gather_rows(trainer, t),
                log=rank_zero_info,
            )
        if trainer.is_global_zero:
            self.log_results(trainer, pl_module, out_dir)

    def build_scorer(self, device: torch.device) -> dict[str, ClipScorer]:
        """Language folder -> CLIP scorer (frozen, on ``device``); empty without a ``scorer`` source."""
        sources = self.scorer if isinstance(self.scorer, dict) else dict.fromkeys(self.languages, self.scorer)
        loaded: dict[str, ClipScorer] = {}
        for source in {s for s in sources.values() if s is not None}:
            from lightning_dpmot.nets.matching import load_matching_model

            model = load_matching_model(source).to(device)
            loaded[source] = ClipScorer(model, self.scorer_batch_size, name=str(source))
        return {lang: loaded[source] for lang, source in sources.items() if source is not None}

    def build_caption_scorer(self, pl_module: L.LightningModule, k: int) -> ShapesCaptionScorer | None:
        """The shapes attribute classifier's scorer when labels are wanted and some split has them."""
        if not self.labels or not any(r and "label" in r[0] for r in self.prompt_set.values()):
            return None
        from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier

        shape = tuple(pl_module.data_shape)
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"caption accuracy needs RGB images (3, R, R); the module generates {shape}")
        options = {key: int(v) if float(v).is_integer() else v for key, v in self.classifier_options.items()}
        classifier = ShapesAttributeClassifier.for_data(shape[-1], self.cache_dir, **options)
        return ShapesCaptionScorer(classifier, real_per_label=k)

    def log_results(self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> None:
        """Numeric columns as metrics (rank 0 only), grids and the table to wandb."""
        for row in self.rows:
            prefix = f"eval/{row['split']}/{row['language']}"
            for column in LOGGED_COLUMNS:
                value = row.get(column)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    pl_module.log(f"{prefix}/{column}", float(value), rank_zero_only=True)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for row in self.rows:
                    grid = out_dir / f"{row['split']}_{row['language']}.png"
                    if grid.is_file():
                        logger.log_image(
                            key=f"eval/{row['split']}/{row['language']}/grid",
                            images=[str(grid)],
                            step=trainer.global_step,
                        )
                columns = list(RESULT_COLUMNS)
                logger.log_table(
                    key=f"eval/{self.name}", columns=columns, data=[[r.get(c) for c in columns] for r in self.rows]
                )


__all__ = ["PromptSetEvaluation"]
