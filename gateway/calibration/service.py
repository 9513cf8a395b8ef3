"""Refitting calibrators on reviewers' verdicts, and the calibration views (API, console, CLI).

A variant's calibrator is first fitted by the trainer on the calibration split (no humans needed);
once `calibration.min_labels` reviewed verdicts exist for it (approve = good, correct/reject =
bad; audit items, drawn at random, keep that sample from holding only doubted answers), the
scheduled refit (every `calibration.refit_interval_hours`) or `POST /v1/calibrators/refit` fits on
them instead. Serving picks the new active calibrator up at its next registry sync.
"""

from __future__ import annotations

import structlog

from gateway.calibration.calibrator import (
    Calibrator,
    NotEnoughLabels,
    choose_threshold,
    fit,
    mode_of,
    summary,
)
from gateway.calibration.diagram import reliability_svg
from gateway.calibration.models import CalibratorRow
from gateway.calibration.repository import Calibrators
from gateway.core.errors import InvalidRequest, NotFound
from gateway.core.settings import Settings
from gateway.store.base import iso_utc

log = structlog.get_logger(__name__)


def mode_thresholds(row: CalibratorRow) -> dict[str, float]:
    """Retrieval mode → its own threshold, for the modes that have their own model (none for a row
    this version cannot read: serving skips it too)."""
    try:
        calibrator = Calibrator.from_params(row.params)
    except (KeyError, TypeError, ValueError):
        return {}
    return {mode: round(float(m["threshold"]), 6) for mode, m in calibrator.modes.items()}


def calibrator_view(row: CalibratorRow) -> dict:
    return {"id": row.id, "variant": row.variant, "source": row.source, "labels": row.labels, "good": row.good,
            "threshold": round(row.threshold, 6), "thresholds": mode_thresholds(row), "active": row.active,
            "created_at": iso_utc(row.created_at),
            "metrics": row.metrics}


class CalibrationService:
    def __init__(self, settings: Settings, calibrators: Calibrators) -> None:
        self.settings, self.calibrators = settings, calibrators

    async def refit(self, variant: str) -> dict:
        """Fit `variant`'s calibrator on its reviewed verdicts; InvalidRequest says why it cannot."""
        cfg = self.settings.calibration
        rows = await self.calibrators.reviewed(variant, cfg.max_labels)
        if len(rows) < cfg.min_labels:
            raise InvalidRequest(f"{variant}: {len(rows)} reviewed verdicts with confidence signals; "
                                 f"calibration.min_labels = {cfg.min_labels} are needed to refit", code="too_few_labels")
        try:
            fitted = fit(rows, c=cfg.c, rule=cfg.flag_rule, target=cfg.flag_target, min_per_class=cfg.min_per_class,
                         per_mode=cfg.per_mode, formula=[p.get("formula", 0.0) for p, _ in rows], variant=variant,
                         source="reviews")
        except NotEnoughLabels as exc:
            raise InvalidRequest(f"{variant}: {exc}", code="too_few_labels") from None
        if cfg.flag_rule == "review_share":  # the share is of traffic, not of the (biased) reviewed sample
            recent = await self.calibrators.recent_parts(variant, self.settings.review.stats_recent_exchanges)
            cal, from_traffic = fitted.calibrator, {}
            for mode, model in cal.modes.items():  # a mode with its own model: that share of its own traffic
                mine = [cal.predict(p) for p in recent if mode_of(p) == mode]
                if len(mine) >= cfg.min_labels:
                    model["threshold"] = choose_threshold(mine, [], "review_share", cfg.flag_target)
                    from_traffic[mode] = len(mine)
            # the pooled threshold flags the modes without a model of their own, scored pooled
            rest = [p for p in recent if mode_of(p) not in cal.modes] or recent
            if len(rest) >= cfg.min_labels:
                cal.threshold = choose_threshold([cal.predict_pooled(p) for p in rest], [], "review_share",
                                                 cfg.flag_target)
                from_traffic["pooled"] = len(rest)
            # which thresholds came from recent traffic (the others: the reviewed sample's held-out scores,
            # at which the cross-validated flagged share and recall were measured)
            fitted.metrics["threshold_from_recent_exchanges"] = from_traffic
            for mode, info in fitted.metrics.get("modes", {}).items():
                info["threshold"] = round(cal.thresholds()[mode], 6)
        good = sum(y for _, y in rows)
        row = await self.calibrators.add(variant, "reviews", fitted, len(rows), good)
        log.info("calibration.refit", variant=variant, labels=len(rows), good=good, calibrator_id=row.id,
                 auroc=fitted.metrics["cross_validated"]["auroc"], threshold=round(row.threshold, 4))
        return calibrator_view(row)

    async def refit_all(self, variants: list[str]) -> list[dict]:
        """The scheduled job: refit every served variant that has enough verdicts (others are skipped)."""
        done = []
        for variant in variants:
            try:
                done.append(await self.refit(variant))
            except InvalidRequest as exc:
                log.info("calibration.refit_skipped", variant=variant, reason=str(exc))
        return done

    async def list(self, variant: str | None = None) -> list[dict]:
        return [calibrator_view(r) for r in await self.calibrators.list(variant)]

    async def get(self, calibrator_id: int) -> dict:
        row = await self.calibrators.get(calibrator_id)
        if row is None:
            raise NotFound(f"No calibrator {calibrator_id}", param="calibrator_id")
        return calibrator_view(row)

    async def live(self, variant: str) -> dict | None:
        """How the active calibrator does on the variant's reviewed verdicts so far (AUROC, Brier,
        reliability), next to the formula — what the console's stats page shows."""
        rows = await self.calibrators.reviewed(variant, self.settings.calibration.max_labels)
        active = (await self.calibrators.active()).get(variant)
        if not rows:
            return None
        labels = [y for _, y in rows]
        out = {"variant": variant, "formula": summary([p.get("formula", 0.0) for p, _ in rows], labels)}
        if active is not None:
            out["calibrated"] = summary([active.predict(p) for p, _ in rows], labels,
                                        [active.threshold_for(p) for p, _ in rows])
            out["calibrator_id"] = active.id
        return out


    async def overview(self, variants: list[str]) -> list[dict]:
        """Per variant: its active calibrator (source, labels, threshold, cross-validated AUROC and
        Brier next to the formula's, the frozen split's check when fitted at training time), how it
        does on the reviewed verdicts so far, and the reliability diagram as inline SVG."""
        active = {row.variant: row for row in await self.calibrators.list(limit=500) if row.active}
        out = []
        for variant in dict.fromkeys([*variants, *active]):
            row, live = active.get(variant), await self.live(variant)
            if row is None and live is None:
                continue
            fitted = (row.metrics or {}).get("cross_validated", {}) if row else {}
            formula = (row.metrics or {}).get("formula", {}) if row else {}
            curves = {}
            if fitted.get("reliability"):
                curves["calibrated (held out at fit)"] = fitted["reliability"]
            if live and live.get("calibrated"):
                curves["calibrated (reviewed verdicts)"] = live["calibrated"]["reliability"]
            if live:
                curves["formula (reviewed verdicts)"] = live["formula"]["reliability"]
            out.append({"variant": variant, "calibrator": calibrator_view(row) if row else None,
                        "fit": fitted, "fit_formula": formula, "frozen": (row.metrics or {}).get("frozen") if row else None,
                        "live": live, "svg": reliability_svg(curves, title=f"{variant}: reliability") if curves else None})
        return out
