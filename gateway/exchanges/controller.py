"""Read access to the exchange log for support staff."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.api.auth import require
from gateway.core.errors import NotFound
from gateway.exchanges.repository import ExchangeRepository, exchange_record
from gateway.review.schemas import ExchangeRecord
from gateway.review.service import ReviewService


class ExchangesController(Controller):
    path = "/v1/exchanges"
    guards = [require("reviewer")]
    tags = ["exchanges"]

    @get("/{exchange_id:str}", summary="The full record of one exchange")
    async def get_exchange(
        self, exchange_id: FromPath[str], exchange_repository: NamedDependency[ExchangeRepository],
        review_service: NamedDependency[ReviewService],
    ) -> ExchangeRecord:
        row = await exchange_repository.get(exchange_id) if len(exchange_id) <= 64 else None
        if row is None:
            raise NotFound(f"No exchange with id '{exchange_id[:64]}'", param="exchange_id", code="not_found")
        return ExchangeRecord.model_validate({**exchange_record(row), **await review_service.exchange_signals(row.id)})
