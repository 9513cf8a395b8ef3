"""Calibrators (admin): list them, inspect one, refit a variant on its reviewers' verdicts now."""

from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from gateway.api.auth import require
from gateway.calibration.schemas import CalibratorList, CalibratorView, RefitRequest
from gateway.calibration.service import CalibrationService


class CalibrationController(Controller):
    path = "/v1/calibrators"
    guards = [require("admin")]
    tags = ["calibration"]

    @get("/", summary="Fitted confidence calibrators, newest first")
    async def list_calibrators(self, calibration_service: NamedDependency[CalibrationService]) -> CalibratorList:
        return CalibratorList.model_validate({"object": "list", "data": await calibration_service.list()})

    @get("/{calibrator_id:int}", summary="One calibrator with its metrics")
    async def get_calibrator(self, calibrator_id: FromPath[int],
                             calibration_service: NamedDependency[CalibrationService]) -> CalibratorView:
        return CalibratorView.model_validate(await calibration_service.get(calibrator_id))

    @post("/refit", status_code=201, summary="Refit a variant's calibrator on its reviewed verdicts")
    async def refit(self, data: JSONBody[RefitRequest],
                    calibration_service: NamedDependency[CalibrationService]) -> CalibratorView:
        return CalibratorView.model_validate(await calibration_service.refit(data.variant))
