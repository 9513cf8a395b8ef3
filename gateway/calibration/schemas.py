"""Response and request models of the calibration endpoints (`/v1/calibrators`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CalibratorView(BaseModel):
    """One fitted calibrator: where its labels came from, its flag threshold, its measured quality."""

    model_config = ConfigDict(extra="forbid")

    id: int
    variant: str = Field(description="the served variant it scores (an adapter version, or base)")
    source: Literal["calibration_split", "reviews", "shipped"]
    labels: int = Field(description="labelled answers it was fitted on")
    good: int
    threshold: float = Field(description="answers scoring below this are flagged for review (the pooled model's; "
                                         "a retrieval mode in `thresholds` uses its own)")
    thresholds: dict[str, float] = Field(default_factory=dict,
                                         description="retrieval mode (rag, no_rag) → the threshold of that mode's own "
                                                     "model, for the modes that had enough labels for one")
    active: bool
    created_at: str | None
    metrics: dict[str, Any] = Field(description="cross-validated AUROC/Brier/reliability, the formula's, "
                                                "and (at training time) the frozen split's")


class CalibratorList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[CalibratorView]


class RefitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str = Field(min_length=1, max_length=16, pattern=r"^(base|v\d{4,8})$",
                         description="the variant to refit on its reviewed verdicts")
