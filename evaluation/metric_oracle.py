"""`oracle`: the toy world's ground truth, judged per image (`toyworld.oracle`), as four curves:
`oracle/subject` (does it show the subject's attributes), `oracle/prompt` (the background and
position its prompt asks for, read from pixels), `oracle/clean` (free of artefacts) and
`oracle/score` (their geometric mean).

Only for the toy world (`base_model: toy`): the subject is the one of the world's subjects
(`toyworld.scene.SUBJECTS`) that its own images show best, and a folder that shows none of them
is refused. Selection never weighs these curves unless the spec names them: they measure what
the other metrics estimate, and `bench/stop_accuracy.py` scores selection against them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from contract.layout import SETUP_ORACLE_SUBJECT
from contract.spec import ORACLE_CURVES
from contract.toy_models import TOY, toy_model_path
from evaluation.context import GeneratedImages, TrialContext
from evaluation.metric import EvalMetric
from toyworld.oracle import Judgement, Oracle

SUBJECT_MATCH_FLOOR = 0.4
"""Mean subject match below which the subject's own images show none of the world's subjects
(measured, two images each: the toy subjects' folders 0.57-0.74, the hand-drawn quickstart
subjects and the astronaut photos 0.05-0.20)."""
PARTS = tuple(curve.split("/")[1] for curve in ORACLE_CURVES)


def load_oracle(source: str) -> Oracle:
    """`eval.oracle_model`: `toy` (committed) or a file."""
    return Oracle.load(toy_model_path("oracle_model") if source == TOY else Path(source))


def toy_subject(oracle: Oracle, files: list[Path]) -> tuple[str, float]:
    """The world's subject that a subject's image files show, and their match to it; raises
    ValueError when they show none (`dreamsweep validate` asks before any trial starts)."""
    subject, match = oracle.nearest_subject([Image.open(p).convert("RGB") for p in files])
    if match < SUBJECT_MATCH_FLOOR:
        raise ValueError(
            f"metric 'oracle' judges images of the toy world's subjects, and the images in "
            f"{str(files[0].parent)!r} show none of them (best: {subject!r}, match "
            f"{match:.2f} < {SUBJECT_MATCH_FLOOR}); use a toy-world subject folder "
            "(configs/subjects/toyworld/) or drop 'oracle'"
        )
    return subject, match


class OracleMetric(EvalMetric):
    name = "oracle"

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        self.oracle = load_oracle(trial.spec.oracle_model)
        self.subject, self.match = toy_subject(self.oracle, trial.reference_files)
        # The images last judged (held, so no later set can be taken for them) and their judgement.
        self._judged: tuple[GeneratedImages, Judgement] | None = None

    def setup(self) -> dict[str, str]:
        return {SETUP_ORACLE_SUBJECT: f"{self.subject} (match {self.match:.2f})"}

    def judgement(self, generated: GeneratedImages) -> Judgement:
        """The images judged once, whoever asks first (records, then curves)."""
        if self._judged is None or self._judged[0] is not generated:
            prompts = [job.prompt for job in self.trial.jobs]
            judged = self.oracle.judge(generated.images, prompts, self.subject)
            self._judged = (generated, judged)
        return self._judged[1]

    def record_columns(self, generated: GeneratedImages) -> dict[str, list[object]]:
        judged = self.judgement(generated)
        return {
            curve: getattr(judged, part).tolist()
            for curve, part in zip(ORACLE_CURVES, PARTS, strict=True)
        }

    def curves(
        self, generated: GeneratedImages, rows: list[int], per_image: torch.Tensor | None
    ) -> dict[str, float]:
        judged = self.judgement(generated)
        return {
            curve: getattr(judged, part)[rows].mean().item()
            for curve, part in zip(ORACLE_CURVES, PARTS, strict=True)
        }
