"""The API's OpenAPI document, derived from the routes and the pydantic models themselves.

Each view says where it is defined what it takes and answers (`declare`): its request
body and query models, its path parameters, and every status it can answer with the
model of that answer's body. `operations(app)` walks the app's URL map and gives each
rule's full entry; a rule without a declaration, or with a path argument its declaration
does not describe, is an error, so no route exists without its entry. `document` builds
OpenAPI 3.1 from the entries and the models' own JSON schemas; the API also checks every
answer's status against its entry as it leaves.

What the common layers answer follows from the declaration instead of being listed by
each view: a route behind a bearer token answers 401 with `WWW-Authenticate`, one with
a JSON body 400 (naming the field), 413 and 415, one with a query model 400.

Why not a library (spectree, flask-openapi3, apiflask): see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args, get_origin

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
# Methods werkzeug answers for every rule by itself: not operations of their own.
IMPLICIT = {"HEAD", "OPTIONS"}
F = TypeVar("F", bound=Callable[..., Any])


class Undeclared(Exception):
    """A URL rule without its entry (or a path argument its entry does not describe)."""


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: the operation a 2xx leads to, its parameters from the answer."""

    operation: str
    parameters: dict[str, str]


@dataclass(frozen=True)
class Answer:
    """One status of an operation: its body (a model, `list[Model]`, a JSON schema or
    None), media type, headers (name -> description) and links."""

    description: str
    body: Any = None
    media_types: tuple[str, ...] = ("application/json",)
    headers: dict[str, str] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)


@dataclass(frozen=True)
class PathParameter:
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: dict[int, Answer]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path: dict[str, PathParameter] = field(default_factory=dict)
    # The security scheme the operation needs (None: open to anyone).
    security: str | None = "bearer"
    description: str = ""


def declare(summary: str, answers: dict[int, Answer], *, body: type[BaseModel] | None = None,
            query: type[BaseModel] | None = None,
            path: dict[str, PathParameter] | None = None,
            security: str | None = "bearer") -> Callable[[F], F]:
    """The view's entry in the document, written beside it."""

    def mark(view: F) -> F:
        view.openapi = Operation(  # type: ignore[attr-defined]
            summary, answers, body, query, path or {}, security,
            " ".join((view.__doc__ or "").split()))
        return view

    return mark


# -- what the common layers answer, from the declaration -----------------------------------
def _common(op: Operation, error: type[BaseModel]) -> dict[int, Answer]:
    extra: dict[int, Answer] = {}
    if op.security is not None:
        extra[401] = Answer("missing or unknown token", error,
                            headers={"WWW-Authenticate": "the scheme the route wants"})
    if op.query is not None:
        extra[400] = Answer("a query parameter out of bounds (named in `field`)", error)
    if op.body is not None:
        extra[400] = Answer("malformed body (the field named in `field`)", error)
        extra[413] = Answer("body over the node's limit", error)
        extra[415] = Answer("not application/json", error)
    return extra


@dataclass(frozen=True)
class Entry:
    """One operation of the app: its werkzeug rule, OpenAPI path, method and entry."""

    rule: str
    path: str
    method: str
    op: Operation


def operations(app: Flask, error: type[BaseModel]) -> list[Entry]:
    """Every operation of the app's URL map with its full entry (the common answers
    added); raises Undeclared for a rule without one."""
    ops: list[Entry] = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        op: Operation | None = getattr(view, "openapi", None)
        if op is None:
            raise Undeclared(f"{rule.rule} ({rule.endpoint}) has no OpenAPI entry: "
                             "declare it where the view is defined (enorm.openapi.declare)")
        missing = set(rule.arguments) - set(op.path)
        if missing:
            raise Undeclared(f"{rule.rule}: path arguments {sorted(missing)} not declared")
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", f"{{{arg}}}")
            for conv in ("path", "string", "int"):
                path = path.replace(f"<{conv}:{arg}>", f"{{{arg}}}")
        answers = {**_common(op, error), **op.answers}
        full = Operation(op.summary, dict(sorted(answers.items())), op.body, op.query,
                         op.path, op.security, op.description)
        ops += [Entry(rule.rule, path, m, full) for m in sorted((rule.methods or set()) - IMPLICIT)]
    return ops


def _models(body: Any) -> list[type[BaseModel]]:
    if isinstance(body, type) and issubclass(body, BaseModel):
        return [body]
    if get_origin(body) is list:
        return _models(get_args(body)[0])
    return []


def document(ops: list[Entry], *, title: str, version: str,
             security_schemes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI 3.1 of an app's operations (`operations(app)`), from their entries and the
    models' own schemas."""
    pairs: set[tuple[type[BaseModel], str]] = set()
    for op in (e.op for e in ops):
        if op.body is not None:
            pairs.add((op.body, "validation"))
        for answer in op.answers.values():
            pairs.update((m, "serialization") for m in _models(answer.body))
    refs, defs = models_json_schema(sorted(pairs, key=lambda p: (p[0].__name__, p[1])),
                                    ref_template=REF)

    def schema(body: Any) -> dict[str, Any]:
        if get_origin(body) is list:
            return {"type": "array", "items": schema(get_args(body)[0])}
        if isinstance(body, type) and issubclass(body, BaseModel):
            return refs[(body, "serialization")]
        return body

    paths: dict[str, dict[str, Any]] = {}
    for e in ops:
        path, method, op = e.path, e.method, e.op
        entry: dict[str, Any] = {
            "operationId": operation_id(method, path), "summary": op.summary,
            "security": [{op.security: []}] if op.security else [],
            "parameters": _parameters(op), "responses": {},
        }
        if op.description:
            entry["description"] = op.description
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(op.body, "validation")]}}}
        for status, answer in op.answers.items():
            out: dict[str, Any] = {"description": answer.description}
            if answer.body is not None:
                out["content"] = {t: {"schema": schema(answer.body)}
                                  for t in answer.media_types}
            elif answer.media_types != ("application/json",):
                out["content"] = {t: {} for t in answer.media_types}
            if answer.headers:
                out["headers"] = {h: {"description": d, "required": True,
                                      "schema": {"type": "string"}}
                                  for h, d in answer.headers.items()}
            if answer.links:
                out["links"] = {name: {"operationId": link.operation,
                                       "parameters": link.parameters}
                                for name, link in answer.links.items()}
            entry["responses"][str(status)] = out
        paths.setdefault(path, {})[method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "components": {"schemas": defs.get("$defs", {}), "securitySchemes": security_schemes},
        "paths": dict(sorted(paths.items())),
    }


def operation_id(method: str, path: str) -> str:
    """`GET /v1/servers/{sid}` -> `get_v1_servers_sid`: what links name."""
    words = [w.strip("{}") for w in path.strip("/").split("/") if w]
    return "_".join([method.lower(), *words]).replace(".", "_").replace("-", "_")


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params = [{"name": n, "in": "path", "required": True, "description": p.description,
               "schema": p.schema} for n, p in op.path.items()]
    if op.query is not None:
        s = op.query.model_json_schema()
        required = set(s.get("required", []))
        for name, prop in s["properties"].items():
            params.append({"name": name, "in": "query", "required": name in required,
                           "schema": {k: v for k, v in prop.items() if k != "title"}})
    return params
