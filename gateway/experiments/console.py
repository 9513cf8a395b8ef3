"""The console's Experiments page: arms with intervals, P(challenger better), the e-values of the
anytime rule at the last recorded evaluation, what the rule would decide now, a chart of each arm's
cumulative thumbs-up rate, the decision history, and (admins) evaluate / promote / retire / roll back."""

from __future__ import annotations

from typing import Annotated

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect, Template
from pydantic import BaseModel, ConfigDict, Field

from gateway.adapters.service import AdapterService
from gateway.api.errors import http_status
from gateway.console.auth import FORM, ConsolePages, page, signed_in
from gateway.core.errors import DomainError
from gateway.experiments.service import ExperimentService


class VersionForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: str = Field("", max_length=20)


class ExperimentsConsoleController(ConsolePages):
    @get("/experiments")
    async def experiments_page(self, request: Request,
                               experiment_service: NamedDependency[ExperimentService]) -> Template:
        notice = request.session.pop("notice", None) if "session" in request.scope else None  # after an action
        return await self._experiments(request, experiment_service, notice=notice)

    async def _experiments(self, request: Request, service: ExperimentService, status_code: int = 200,
                           notice: str | None = None, error: str | None = None) -> Template:
        overview = await service.experiments_overview()
        return page("experiments.html", request, status_code=status_code, o=overview,
                    chart=experiment_chart(overview["current"]), notice=notice, error=error,
                    cfg=service.settings.experiment, evalues=last_evalues(overview["current"]))

    @post("/experiments/{action:str}", status_code=303)
    async def experiment_action(self, request: Request, action: FromPath[str], data: Annotated[VersionForm, FORM],
                                adapter_service: NamedDependency[AdapterService],
                                experiment_service: NamedDependency[ExperimentService]) -> Response:
        me = signed_in(request)
        if me.role != "admin":
            return await self._experiments(request, experiment_service, 403,
                                           error=f"Only admins decide experiments; key '{me.name}' has '{me.role}'.")
        try:
            if action == "evaluate":
                result = await adapter_service.evaluate(me.name)
                notice = f"Evaluated: {result['action']} — {result['reason']}"
            elif action in ("promote", "retire") and data.version:
                act = adapter_service.promote if action == "promote" else adapter_service.retire
                result = await act(data.version, me.name)
                notice = f"{data.version} is now {result['state']}."
            elif action == "rollback":
                notice = f"Rolled back: {(await adapter_service.rollback(me.name))['champion']} is champion."
            else:
                return await self._experiments(request, experiment_service, 404, error=f"Unknown action '{action[:30]}'.")
        except DomainError as exc:
            return await self._experiments(request, experiment_service, http_status(exc), error=exc.message)
        request.session["notice"] = notice[:300]
        return Redirect("/console/experiments", status_code=303)


def experiment_chart(view: dict | None, width: int = 600, height: int = 220) -> dict:
    """SVG coordinates for the cumulative thumbs-up rate per arm (server-side: no chart library)."""
    left, right, top, bottom = 40, width - 10, 10, height - 20
    ticks = [{"y": bottom - (bottom - top) * v, "label": f"{int(v * 100)}%"} for v in (0, 0.25, 0.5, 0.75, 1.0)]
    lines = {"champion": "", "challenger": ""}
    for arm in lines:
        pts = [(left + (right - left) * p["fraction"], bottom - (bottom - top) * p[arm])
               for p in (view or {}).get("timeline", []) if p[arm] is not None]
        lines[arm] = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    return {"width": width, "height": height, "left": left, "right": right, "ticks": ticks, **lines}


def last_evalues(view: dict | None) -> dict | None:
    """The anytime rule's e-values and when: from the experiment's newest decision that recorded them
    (an evaluation is recorded whenever it saw new evidence)."""
    for d in (view or {}).get("decisions", []):
        if d["evidence"].get("anytime"):
            return {"at": d["at"], **d["evidence"]["anytime"]}
    return None
