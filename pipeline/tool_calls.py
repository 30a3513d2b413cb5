"""Tool calls and tool definitions, from the shapes datasets write them in to the one chat templates read.

Chat templates with tool support (transformers' `apply_chat_template(messages, tools=...)`) read:
  - tools: [{"type": "function", "function": {"name", "description", "parameters"}}]
  - an assistant turn's calls: {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
    "function": {"name": str, "arguments": {...}}}]}, the arguments a mapping (templates serialise them);
  - a result: {"role": "tool", "content": str}.
Datasets write them two ways, both read here:
  - OpenAI: "tool_calls" on the assistant message, each {"id", "type": "function", "function": {"name",
    "arguments": JSON string}}; results as role "tool" with "tool_call_id"; "tools" beside "messages";
  - sharegpt (LLaMA-Factory): a turn from "function_call" whose value is the call as JSON ({"name", "arguments"} or
    a list of them), a turn from "observation" with the result; "tools" a JSON string of the definitions.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pipeline.errors import DataError
from pipeline.records import json_type

Error = Callable[[str, str], DataError]


def _decoded(value: Any, field: str, error: Error, what: str) -> Any:
    """`value`, or the JSON it holds when it is a string (sharegpt files and OpenAI arguments are JSON strings)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise error(field, f"{what} is a string that is not valid JSON: {e.msg} (column {e.colno})") from None


def tools(value: Any, field: str, error: Error) -> tuple[dict, ...]:
    """A record's tool definitions, each as {"type": "function", "function": {...}}."""
    value = _decoded(value, field, error, "the tool list")
    if not isinstance(value, list):
        raise error(field, f"must be a list of tool definitions, found {json_type(value)}")
    found = []
    for index, tool in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(tool, dict):
            raise error(where, f"must be an object, found {json_type(tool)}")
        function = tool.get("function") if tool.get("type") == "function" or "function" in tool else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise error(where, "must name a function: {\"type\": \"function\", \"function\": {\"name\", "
                               "\"description\", \"parameters\"}} or {\"name\", \"description\", \"parameters\"}")
        found.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tuple(found)


def _call(value: Any, where: str, error: Error) -> dict:
    if not isinstance(value, dict):
        raise error(where, f"must be an object, found {json_type(value)}")
    function = value.get("function", value)  # OpenAI nests the call under "function"; sharegpt does not
    if not isinstance(function, dict):
        raise error(f"{where}.function", f"must be an object, found {json_type(function)}")
    inner = f"{where}.function" if "function" in value else where
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise error(f"{inner}.name", "must be the called function's name, a non-empty string")
    arguments = _decoded(function.get("arguments", {}), f"{inner}.arguments", error, "the arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise error(f"{inner}.arguments", f"must be an object of arguments, found {json_type(arguments)}")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def openai_calls(value: Any, field: str, error: Error) -> list[dict]:
    """An assistant message's "tool_calls" (OpenAI)."""
    if not isinstance(value, list) or not value:
        raise error(field, f"must be a non-empty list of calls, found {json_type(value)}")
    return [_call(item, f"{field}[{index}]", error) for index, item in enumerate(value)]


def sharegpt_calls(value: Any, field: str, error: Error) -> list[dict]:
    """A function_call turn's value: one call or a list of calls, as JSON."""
    value = _decoded(value, field, error, "the function call")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise error(field, "must hold at least one call")
    return [_call(item, field if len(items) == 1 and not isinstance(value, list) else f"{field}[{index}]", error)
            for index, item in enumerate(items)]


def names(tool_list, messages) -> list[str]:
    """Every function name a conversation defines or calls: what a template with tool support must render."""
    found = [tool["function"]["name"] for tool in tool_list]
    for message in messages:
        found += [call["function"]["name"] for call in message.get("tool_calls", ())]
    return found
