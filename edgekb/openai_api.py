"""OpenAI-compatible routes: the same answers for the many tools that speak the OpenAI API.

    GET  /v1/models
    POST /v1/chat/completions         stream or not
    POST /v1/responses                stream, background, previous_response_id
    GET  /v1/responses/{id}           ?stream=true&starting_after=N resumes a stream
    POST /v1/responses/{id}/cancel

A transport: questions go to the conversation core, and what comes back is the request's log,
rendered in OpenAI's shapes. Answers come from the knowledge base, with their citations ([n])
in the text and the sources in extra fields; ``"edgekb": {"retrieval": false}`` in a request
body talks to the model alone, ``"edgekb": {"kbs": [...]}`` names the knowledge bases.
Chat completions are stateless, as OpenAI defines them: the earlier messages are the
conversation. A response continues another one's session with ``previous_response_id``.

Resuming a Responses stream: each event's ``sequence_number`` is the seq of the stored event
it renders, so ``starting_after=N`` means "I have everything up to our event N". OpenAI's shape
needs a few events that render no stored event of their own (response.created, an output
item's and its content part's ``added``, the closing ``done`` events); each carries the number
of the stored event before it, and the event that completes a stored event carries its seq. A
resumed stream is therefore the uncut stream's tail: nothing of the text is lost or repeated.

Extra fields (stock clients ignore them): ``queue`` {position, wait_s} while a question waits
for the LLM, ``stage`` {stage, progress?} (retrieving, reading the prompt, generating), and the
sources: ``sources`` on chat completions and chunks, file_citation annotations on responses.
Errors on /v1 have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import keys
from .conversations import RequestOptions, RequestState
from .errors import EdgekbError, ProtocolError
from .http_errors import STATUS_BY_CODE, Handler
from .protocol import INVALID_FIELD, UNKNOWN_REQUEST
from .access import requires
from .requester import client_address, user_of
from .sse import (
    EventStream,
    StreamGone,
    check_fields,
    json_body,
    named,
    new_request_id,
    parse_question,
    until_ended,
)

log = logging.getLogger(__name__)

MAX_CONVERSATION_PAIRS = 20  # earlier exchanges taken from a request (the prompt keeps what fits)
OPENAI_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error",
                         429: "rate_limit_error"}
Event = dict[str, Any]


# --- errors ------------------------------------------------------------------------------------

@web.middleware
async def openai_error_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error body on /v1, whichever layer made it ({"error": {"code", "message", ...}}),
    in OpenAI's shape, so OpenAI SDKs raise their typed errors (and retry 429 and 503)."""
    response = await handler(request)
    if not request.path.startswith("/v1/") or response.status < 400 \
            or not isinstance(response, web.Response) \
            or response.content_type != "application/json":
        return response
    try:
        error = json.loads(response.body)["error"]  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError):
        return response
    response.body = json.dumps({"error": openai_error(response.status, error)}).encode()
    return response


def openai_error(status: int, error: dict[str, Any]) -> dict[str, Any]:
    kind = OPENAI_TYPE_BY_STATUS.get(status, "server_error" if status >= 500
                                     else "invalid_request_error")
    extra = {k: v for k, v in error.items() if k not in ("code", "message", "field")}
    return {"message": error.get("message", ""), "type": kind, "param": error.get("field"),
            "code": error.get("code"), **extra}


# --- requests ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Extension:
    retrieval: bool = True
    kbs: Any = None


def extension(body: dict[str, Any]) -> Extension:
    """The ``edgekb`` object of a request body: our options, beside OpenAI's."""
    ext = body.get("edgekb", {})
    if not isinstance(ext, dict):
        raise ProtocolError(INVALID_FIELD, "edgekb: expected an object", field="edgekb")
    check_fields(ext, {"retrieval", "kbs"}, "edgekb.")
    retrieval = ext.get("retrieval", True)
    if not isinstance(retrieval, bool):
        raise ProtocolError(INVALID_FIELD, "edgekb.retrieval: expected true or false",
                            field="edgekb.retrieval")
    return Extension(retrieval, ext.get("kbs"))


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(INVALID_FIELD, f"{name}: expected true or false", field=name)
    return value


def message_text(content: Any, field: str) -> str:
    """A message's text: a string, or a list of text parts (images and files are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text")
            and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ProtocolError(INVALID_FIELD, f"{field}: expected a string or a list of text parts",
                        field=field)


def conversation(messages: Any, field: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The question (the last message, from the user) and the earlier (question, answer)
    exchanges. System and developer messages are not used: the appliance's instruction holds."""
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(INVALID_FIELD, f"{field}: expected a non-empty list of messages",
                            field=field)
    said: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
                "system", "developer", "user", "assistant"):
            raise ProtocolError(INVALID_FIELD, f"{field}[{index}]: expected a message with role "
                                "system, developer, user or assistant", field=field)
        if message["role"] in ("user", "assistant"):
            said.append((message["role"], message_text(message.get("content"),
                                                       f"{field}[{index}].content")))
    if not said or said[-1][0] != "user":
        raise ProtocolError(INVALID_FIELD, f"{field}: the last message must be the user's",
                            field=field)
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for role, text in said[:-1]:
        if role == "user":
            question = text if question is None else f"{question}\n{text}"
        elif question is not None:
            pairs.append((question, text))
            question = None
    return said[-1][1], tuple(pairs[-MAX_CONVERSATION_PAIRS:])


def model_name(request: web.Request) -> str:
    return request.app[keys.SETTINGS].models.llm


def source_fields(event: Event) -> Event:
    return {k: v for k, v in event.items() if k not in ("type", "id", "seq")}


def stage_fields(event: Event) -> Event:
    return {k: v for k, v in event.items() if k in ("stage", "progress")}


def queue_fields(event: Event) -> Event:
    return {k: v for k, v in event.items() if k in ("position", "wait_s")}


async def start(request: web.Request, question: str, ext: Extension,
                options: RequestOptions, session: str | None = None) -> tuple[str, str]:
    """Ask in a new session (or ``session``, one of this user's); returns (session, request)."""
    request_id = new_request_id()
    ask = parse_question(request_id, question, ext.kbs)
    core = request.app[keys.CONVERSATIONS]
    user = user_of(request)
    opened = await core.open(user, session)
    await core.ask(opened.session, user, request_id, ask.text, ask.kbs, options,
                   address=client_address(request))
    return opened.session, request_id


async def stream_rendered(request: web.Request, session: str, request_id: str,
                          render: Callable[[Event], Iterable[tuple[Event | str, str | None]]],
                          first: Iterable[tuple[Event | str, str | None]] = ()
                          ) -> web.StreamResponse:
    """The request's log from its start, each stored event rendered into SSE events
    (data, event name): the streaming side of both APIs."""
    stream = EventStream(request, "openai", named(session, request_id))
    await stream.open()

    async def emit(items: Iterable[tuple[Event | str, str | None]]) -> None:
        for data, name in items:
            await stream.event(data if isinstance(data, str) else _encode(data), event=name)

    async def send(frame: str) -> None:
        await emit(render(json.loads(frame)))

    core = request.app[keys.CONVERSATIONS]
    try:
        await emit(first)
        await until_ended(stream, core.follow(session, request_id, 0, send))
    except StreamGone:
        pass
    except EdgekbError as exc:  # after the headers: the stream just ends
        log.warning("stream of %s/%s ended early: %s", session, request_id, exc.message)
    finally:
        await stream.close()
    return stream.response


def _encode(data: Event) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --- /v1/models --------------------------------------------------------------------------------

async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": model_name(request), "object": "model", "created": 0, "owned_by": "edgekb"}]})


# --- /v1/chat/completions ----------------------------------------------------------------------

class ChatChunks:
    """A request's events as chat.completion.chunk objects."""

    def __init__(self, completion_id: str, created: int, model: str, usage: bool) -> None:
        self.base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": model}
        self.usage = usage

    def chunk(self, delta: Event, finish: str | None = None, **extra: Any) -> Event:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}], **extra}

    def first(self) -> list[tuple[Event | str, str | None]]:
        return [(self.chunk({"role": "assistant", "content": ""}), None)]

    def render(self, event: Event) -> list[tuple[Event | str, str | None]]:
        kind = event["type"]
        if kind == "delta":
            return [(self.chunk({"content": event["text"]}), None)]
        if kind == "source":
            return [(self.chunk({}, sources=[source_fields(event)]), None)]
        if kind == "queued":
            return [(self.chunk({}, queue=queue_fields(event)), None)]
        if kind == "status":
            return [(self.chunk({}, stage=stage_fields(event)), None)]
        if kind == "done":
            out: list[tuple[Event | str, str | None]] = [
                (self.chunk({}, finish_reason(event["finish"])), None)]
            if self.usage:
                out.append(({**self.base, "choices": [], "usage": chat_usage(event)}, None))
            return [*out, ("[DONE]", None)]
        if kind == "error":
            status = STATUS_BY_CODE.get(event["code"], 500)
            return [({"error": openai_error(status, source_fields(event))}, None)]
        return []


def finish_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"  # OpenAI has no "cancelled"


def chat_usage(done: Event) -> Event:
    usage = done.get("usage", {})
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": usage.get("cached_prompt_tokens", 0)}}


@requires("user", audit="ask")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    question, pairs = conversation(body.get("messages"), "messages")
    ext = extension(body)
    stream = flag(body, "stream")
    stream_options = body.get("stream_options") or {}
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    session, request_id = await start(request, question, ext, RequestOptions(
        retrieval=ext.retrieval, conversation=pairs))
    chunks = ChatChunks(f"chatcmpl-{session}.{request_id}", int(time.time()),
                        model_name(request), include_usage)
    if stream:
        return await stream_rendered(request, session, request_id, chunks.render, chunks.first())
    text: list[str] = []
    sources: list[Event] = []
    last: Event = {}

    async def add(frame: str) -> None:
        nonlocal last
        event = json.loads(frame)
        if event["type"] == "delta":
            text.append(event["text"])
        elif event["type"] == "source":
            sources.append(source_fields(event))
        elif event["type"] in ("done", "error"):
            last = event

    await request.app[keys.CONVERSATIONS].follow(session, request_id, 0, add)
    headers = named(session, request_id)
    if last.get("type") != "done":
        status = STATUS_BY_CODE.get(last.get("code", "internal"), 500)
        return web.json_response({"error": openai_error(status, source_fields(last))},
                                 status=status, headers=headers)
    return web.json_response({
        **{k: v for k, v in chunks.base.items() if k != "object"}, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(last["finish"])}],
        "usage": chat_usage(last), "sources": sources}, headers=headers)


# --- /v1/responses -----------------------------------------------------------------------------

def response_id(session: str, request_id: str) -> str:
    return f"resp_{session}.{request_id}"


def parse_response_id(value: str) -> tuple[str, str]:
    session, dot, request_id = value.removeprefix("resp_").partition(".")
    if not value.startswith("resp_") or not dot:
        raise ProtocolError(UNKNOWN_REQUEST, f"no response {value!r}")
    return session, request_id


class ResponseView:
    """A request's log as an OpenAI response object and its stream of events (see the module
    docstring for their sequence numbers). Deterministic: the same log, the same events."""

    def __init__(self, rid: str, item: str, created_at: int, model: str,
                 background: bool | None) -> None:
        self.id, self.item, self.created_at, self.model = rid, item, created_at, model
        self.background = background
        self.status = "queued"
        self.queue: Event | None = None
        self.text: list[str] = []
        self.annotations: list[Event] = []
        self.usage: Event | None = None
        self.error: Event | None = None
        self.incomplete: Event | None = None
        self.opened = False
        self.last_seq = 0

    def snapshot(self, output: bool = True) -> Event:
        body: Event = {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "background": self.background, "error": self.error,
            "incomplete_details": self.incomplete, "instructions": None,
            "max_output_tokens": None, "model": self.model,
            "output": [self._item()] if output and self.opened else [],
            "parallel_tool_calls": False, "previous_response_id": None, "temperature": None,
            "top_p": None, "tool_choice": "none", "tools": [],
            "text": {"format": {"type": "text"}}, "truncation": "disabled",
            "usage": self.usage, "metadata": {}, "store": True}
        if self.status == "queued" and self.queue is not None:
            body["queue"] = self.queue
        return body

    def created(self) -> list[tuple[Event, str]]:
        return [self._named({"type": "response.created", "sequence_number": 0,
                             "response": self.snapshot(output=False)})]

    def render(self, event: Event) -> list[tuple[Event, str]]:
        """The Responses events of one stored event, numbered."""
        seq = event.get("seq") or self.last_seq + 1  # an end that could not be stored
        self.last_seq = seq
        out = [self._named({**e, "sequence_number": seq - 1}) for e in self._events(event)]
        if out:
            out[-1][0]["sequence_number"] = seq
        return out

    def _events(self, event: Event) -> list[Event]:
        kind = event["type"]
        if kind == "queued":
            self.queue = queue_fields(event)
            if event["position"] > 0:
                return [{"type": "response.queued", "response": self.snapshot(False),
                         "queue": self.queue}]
            self.status = "in_progress"
            return [{"type": "response.in_progress", "response": self.snapshot(False),
                     "queue": self.queue}]
        if kind == "status":
            self.status = "in_progress"
            return [{"type": "response.in_progress", "response": self.snapshot(False),
                     "stage": stage_fields(event)}]
        if kind == "source":
            annotation = {"type": "file_citation", "file_id": event["doc"],
                          "filename": event["doc"], "index": 0, **source_fields(event)}
            self.annotations.append(annotation)
            return [*self._open(), {**self._part_ref(), "type":
                                    "response.output_text.annotation.added",
                                    "annotation_index": len(self.annotations) - 1,
                                    "annotation": annotation}]
        if kind == "delta":
            self.text.append(event["text"])
            return [*self._open(), {**self._part_ref(), "type": "response.output_text.delta",
                                    "delta": event["text"], "logprobs": []}]
        if kind == "done":
            return self._done(event)
        if kind == "error":
            self.status = "failed"
            self.error = {"code": event["code"], "message": event["message"]}
            return [{"type": "response.failed", "response": self.snapshot()}]
        return []

    def _done(self, event: Event) -> list[Event]:
        usage = event.get("usage", {})
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self.usage = {"input_tokens": prompt, "output_tokens": completion,
                      "total_tokens": prompt + completion,
                      "input_tokens_details": {"cached_tokens":
                                               usage.get("cached_prompt_tokens", 0)},
                      "output_tokens_details": {"reasoning_tokens": 0}}
        finish = event["finish"]
        self.status = {"stop": "completed", "length": "incomplete"}.get(finish, "cancelled")
        if finish != "stop":
            self.incomplete = {"reason": "max_output_tokens" if finish == "length"
                               else finish}
        text = "".join(self.text)
        closing = [*self._open(),
                   {**self._part_ref(), "type": "response.output_text.done", "text": text,
                    "logprobs": []},
                   {**self._part_ref(), "type": "response.content_part.done",
                    "part": self._part()},
                   {"type": "response.output_item.done", "output_index": 0,
                    "item": self._item()}]
        final = "response.completed" if finish == "stop" else "response.incomplete"
        return [*closing, {"type": final, "response": self.snapshot()}]

    def _open(self) -> list[Event]:
        """The message item and its text part, before the first thing they hold."""
        if self.opened:
            return []
        self.opened = True
        return [{"type": "response.output_item.added", "output_index": 0,
                 "item": {**self._item(), "content": []}},
                {**self._part_ref(), "type": "response.content_part.added",
                 "part": {"type": "output_text", "text": "", "annotations": [],
                          "logprobs": []}}]

    def _part_ref(self) -> Event:
        return {"item_id": self.item, "output_index": 0, "content_index": 0}

    def _part(self) -> Event:
        return {"type": "output_text", "text": "".join(self.text),
                "annotations": list(self.annotations), "logprobs": []}

    def _item(self) -> Event:
        status = {"in_progress": "in_progress", "queued": "in_progress",
                  "completed": "completed"}.get(self.status, "incomplete")
        return {"id": self.item, "type": "message", "status": status, "role": "assistant",
                "content": [self._part()]}

    @staticmethod
    def _named(event: Event) -> tuple[Event, str]:
        return event, event["type"]


def view_of(request: web.Request, session: str, request_id: str, state: RequestState,
            background: bool | None) -> ResponseView:
    return ResponseView(response_id(session, request_id), f"msg_{request_id}",
                        int(state.created_at), model_name(request), background)


async def fed_view(request: web.Request, session: str, request_id: str, state: RequestState,
                   background: bool | None, live: bool) -> ResponseView:
    """The response object from the log: as it stands now, or (``live``) once it ended."""
    view = view_of(request, session, request_id, state, background)

    async def feed(frame: str) -> None:
        view.render(json.loads(frame))

    await request.app[keys.CONVERSATIONS].follow(session, request_id, 0, feed, live=live)
    return view


async def owned(request: web.Request, value: str) -> tuple[str, str, RequestState]:
    session, request_id = parse_response_id(value)
    state = await request.app[keys.CONVERSATIONS].state(session, user_of(request), request_id)
    if state is None:
        raise ProtocolError(UNKNOWN_REQUEST, f"no response {value!r}")
    return session, request_id, state


@requires("user", audit="ask")
async def create_response(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    ext = extension(body)
    stream, background = flag(body, "stream"), flag(body, "background")
    raw = body.get("input")
    if isinstance(raw, str):
        question, pairs = raw, None
    else:
        question, held = conversation(raw, "input")
        pairs = held or None  # a single question: the session's own turns (stateful)
    session = None
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise ProtocolError(INVALID_FIELD, "previous_response_id: expected a response id",
                                field="previous_response_id")
        session = (await owned(request, previous))[0]
    session, request_id = await start(request, question, ext, RequestOptions(
        retrieval=ext.retrieval, conversation=pairs, detached=background), session)
    state = await request.app[keys.CONVERSATIONS].state(session, user_of(request), request_id)
    assert state is not None
    headers = named(session, request_id)
    if stream:
        view = view_of(request, session, request_id, state, background)
        return await stream_rendered(request, session, request_id, view.render, view.created())
    view = await fed_view(request, session, request_id, state, background, live=not background)
    return web.json_response(view.snapshot(), headers=headers)


async def get_response(request: web.Request) -> web.StreamResponse:
    session, request_id, state = await owned(request, request.match_info["id"])
    stream = request.query.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise ProtocolError(INVALID_FIELD, "stream: expected true or false", field="stream")
    raw_after = request.query.get("starting_after")
    if raw_after is not None and not (raw_after.isascii() and raw_after.isdigit()
                                      and len(raw_after) <= 15):
        raise ProtocolError(INVALID_FIELD, "starting_after: expected a sequence number",
                            field="starting_after")
    after = int(raw_after) if raw_after is not None else -1
    if stream == "false":
        view = await fed_view(request, session, request_id, state, None, live=False)
        return web.json_response(view.snapshot(), headers=named(session, request_id))
    view = view_of(request, session, request_id, state, None)

    def tail(event: Event) -> list[tuple[Event, str]]:
        return [item for item in view.render(event) if item[0]["sequence_number"] > after]

    first = view.created() if after < 0 else []
    return await stream_rendered(request, session, request_id, tail, first)


@requires("user", audit="cancel")
async def cancel_response(request: web.Request) -> web.Response:
    session, request_id, state = await owned(request, request.match_info["id"])
    await request.app[keys.CONVERSATIONS].cancel(session, request_id, user=user_of(request),
                                                 address=client_address(request))
    view = await fed_view(request, session, request_id, state, None, live=False)
    return web.json_response(view.snapshot(), headers=named(session, request_id))


def setup_openai(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{id:resp_[A-Za-z0-9_.:-]{1,140}}", get_response)
    app.router.add_post("/v1/responses/{id:resp_[A-Za-z0-9_.:-]{1,140}}/cancel",
                        cancel_response)
