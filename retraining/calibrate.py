"""The calibrator of a trained candidate, fitted without humans: its answers on the calibration
split (seed Q&A never trained on, apart from the frozen split), with and without retrieval, scored
against the references (good = similarity ≥ 0.75), then checked on the frozen split it never saw —
the calibrated score next to the v2 formula, each with AUROC, Brier and the reliability table."""

from __future__ import annotations

from gateway.calibration.calibrator import Fit, fit, summary
from gateway.core.settings import Settings


def fit_from_evaluation(settings: Settings, calibration_items: list[dict], frozen: dict[str, list[dict]],
                        variant: str, per_mode: bool | None = None) -> Fit:
    """`calibration_items`: evaluation items (retraining/evaluate.py) of the calibration split;
    `frozen`: mode ("rag", "no_rag") → the same variant's items on the frozen split; `per_mode`
    overrides `calibration.per_mode` (the benchmark measures both)."""
    cfg = settings.calibration
    rows = [(i["confidence"], bool(i["good"])) for i in calibration_items]
    result = fit(rows, c=cfg.c, rule=cfg.flag_rule, target=cfg.flag_target, min_per_class=cfg.min_per_class,
                 per_mode=cfg.per_mode if per_mode is None else per_mode,
                 formula=[i["confidence"].get("formula", i["confidence"]["score"]) for i in calibration_items],
                 variant=variant, source="calibration_split")
    checks = {}
    for mode, items in frozen.items():
        labels = [bool(i["good"]) for i in items]
        calibrated = [result.calibrator.predict(i["confidence"]) for i in items]
        formula = [i["confidence"].get("formula", i["confidence"]["score"]) for i in items]
        thresholds = [result.calibrator.threshold_for(i["confidence"]) for i in items]
        checks[mode] = {"calibrated": summary(calibrated, labels, thresholds),
                        "formula": summary(formula, labels, settings.review.confidence_threshold)}
    result.metrics["frozen"] = checks
    result.metrics["labels"] = {"n": len(rows), "good": sum(y for _, y in rows)}
    return result
