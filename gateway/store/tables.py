"""Every table, imported once so `Base.metadata` knows them all (Alembic's environment, schema checks)."""

from gateway.adapters.models import Adapter
from gateway.calibration.models import CalibratorRow
from gateway.exchanges.models import Exchange
from gateway.experiments.models import Decision, Experiment
from gateway.review.models import (
           Feedback,
           Flag,
           ReviewEvent,
           ReviewItem,
           ReviewLabel,
           ReviewPair,
)
from gateway.runs.models import TrainingRun
from gateway.store.base import Base

__all__ = ["Adapter", "Base", "CalibratorRow", "Decision", "Exchange", "Experiment", "Feedback", "Flag", "ReviewEvent", "ReviewItem",
           "ReviewLabel", "ReviewPair", "TrainingRun"]
