"""OpenAI-compatible chat completions and model listing."""

from __future__ import annotations

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.response import Stream

from gateway.api.auth import require
from gateway.chat.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
)
from gateway.chat.service import ChatService, sse_events


class ChatController(Controller):
    path = "/v1"
    guards = [require("client")]
    tags = ["chat"]

    @post("/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)",
          responses={200: ResponseSpec(ChatCompletion, description="a chat.completion object; with \"stream\": true "
                                       "a text/event-stream of chat.completion.chunk objects ending with data: [DONE]")})
    async def create(
        self, request: Request, data: JSONBody[ChatCompletionRequest], chat_service: NamedDependency[ChatService]
    ) -> Response | Stream:
        session = request.headers.get(chat_service.settings.experiment.session_header)
        run = await chat_service.start(data, request.user, session=session[:200] if session else None)
        headers = {"X-Exchange-Id": run.exchange_id, "X-Variant": run.route.variant}
        if data.stream:
            # litestar's ServerSentEvent hops to a worker thread before the first event and rebuilds
            # every event through a StringIO; the payloads are single-line JSON, framed directly
            return Stream(sse_events(chat_service.stream(run)), media_type="text/event-stream",
                          headers={**headers, "Cache-Control": "no-cache", "Connection": "keep-alive",
                                   "X-Accel-Buffering": "no"})
        return Response(await chat_service.complete(run), headers=headers)

    @get("/models", summary="The logical model and the variants served")
    async def models(self, chat_service: NamedDependency[ChatService]) -> ModelList:
        cfg = chat_service.settings.model
        ids = [cfg.name, *chat_service.engine.variants()]
        return ModelList(object="list", data=[ModelCard(id=i, object="model", created=0, owned_by="tellerloop")
                                              for i in ids])
