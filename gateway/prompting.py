"""How the model is prompted: the system prompt and, when retrieval is on, the retrieved entries.

One function used by serving and by `tellerloop eval`, so what is evaluated is exactly what is
served. Layouts (chosen by measurement, see README):
  * "system": entries appended to the system prompt;
  * "user":   entries placed in the last user turn, before the question.
Entries are numbered, Q&A entries shown as question/answer, each cut to `max_entry_chars`.
"""

from __future__ import annotations

from gateway.rag.knowledge import Hit
from gateway.settings import Settings

NO_CONTEXT = "No information in the bank's records matches this question."


def format_entries(hits: list[Hit], max_chars: int, entry_format: str = "qa") -> str:
    if not hits:
        return NO_CONTEXT
    parts = []
    for n, hit in enumerate(hits, start=1):
        meta = hit.metadata
        if meta.get("kind") == "qa" and meta.get("question"):
            body = (f"Question: {meta['question']}\nAnswer: {meta['answer']}" if entry_format == "qa"
                    else meta["answer"])
        else:
            title = meta.get("title") or ""
            body = f"{title}\n{hit.text}" if title else hit.text
        if len(body) > max_chars:
            body = body[:max_chars].rsplit(" ", 1)[0] + " ..."
        parts.append(f"[{n}]\n{body}")
    return "\n\n".join(parts)


def build_messages(settings: Settings, messages: list[dict[str, str]], hits: list[Hit] | None) -> list[dict[str, str]]:
    """`messages` are the client's (roles already normalised); `hits` is None when retrieval is off."""
    messages = [dict(m) for m in messages]
    system = settings.model.system_prompt
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    if hits is not None:
        context = f"{settings.rag.instruction}\n\n{format_entries(hits, settings.rag.max_entry_chars, settings.rag.entry_format)}"
        if settings.rag.layout == "system":
            system = f"{system}\n\n{context}" if system else context
        else:
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            question = messages[last_user]["content"]
            messages[last_user]["content"] = f"{context}\n\nCustomer question: {question}"
    return ([{"role": "system", "content": system}] if system else []) + messages


def last_user_message(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")
