"""Turning one raw row of any supported shape into `(prompt, chosen, rejected)` text, or a `RowProblem`.

Shapes: `strings` (prompt/chosen/rejected strings), `messages` (chosen/rejected as lists of
`{role, content}`, UltraFeedback style; prompt = all but the last assistant turn, rendered with the
tokenizer's chat template) and `hh` (Anthropic HH: whole conversations split at the last
`\\n\\nAssistant:`). Checks run in the order of `REASONS`; a row is reported under the first that fails.
"""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import ConfigError, DataError

HH_MARKER = "\n\nAssistant:"
REASONS = (
    "not_utf8",  # a line of a JSON-lines file that is not UTF-8 text
    "malformed_json",  # a line of a JSON-lines file that is not one JSON object (e.g. a truncated last line)
    "missing_field",  # field absent or null
    "not_a_string",  # field present but not a string
    "malformed_messages",  # not a list, items without string role/content, template cannot render
    "unknown_role",  # a message role outside MESSAGE_ROLES (e.g. 'bot', 'human', 'gpt')
    "no_assistant_turn",  # messages not ending in an assistant turn; HH text without "\n\nAssistant:"
    "prompt_mismatch",  # chosen and rejected do not share the prompt
    "empty_prompt",
    "empty_response",  # after stripping whitespace
    "identical_responses",  # chosen == rejected
)

MESSAGE_ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates render
Triple = tuple[str, str, str]


class RowProblem(Exception):
    """Why one row is unusable: a reason from `REASONS`, the field (None for a line that could not be
    read at all), and what was expected."""

    def __init__(self, reason: str, field: str | None, expected: str):
        where = f"field '{field}': " if field else ""
        super().__init__(f"{reason}: {where}expected {expected}")
        self.reason, self.field, self.expected = reason, field, expected


def detect_format(columns: Sequence[str], rows: Sequence[dict[str, Any]], name: str, fmt: str = "auto") -> str:
    """Resolve `fmt` ('auto' looks at the first non-null `chosen`: list → messages; else strings if there is a
    `prompt` column, else hh) and check the needed columns exist."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if fmt == "strings" and "prompt" not in columns:
        missing.insert(0, "prompt")
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}; found {list(columns)}")
    if fmt != "auto":
        return fmt
    first = next((r["chosen"] for r in rows if isinstance(r, dict) and r.get("chosen") is not None), None)
    if isinstance(first, list):
        return "messages"
    return "strings" if "prompt" in columns else "hh"


def _text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowProblem("missing_field", field, "a string")
    if not isinstance(value, str):
        raise RowProblem("not_a_string", field, f"a string, got {type(value).__name__}")
    return value


def _check_texts(prompt_core: str, chosen: str, rejected: str) -> None:
    if not prompt_core.strip():
        raise RowProblem("empty_prompt", "prompt", "a non-empty prompt")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowProblem("empty_response", field, "a non-empty response")
    if chosen.strip() == rejected.strip():
        raise RowProblem("identical_responses", "rejected", "a response different from chosen")


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat-template rendering of `messages` followed by the generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_response(tokenizer, prompt_msgs: list[dict[str, str]], prompt: str, reply: dict[str, str]) -> str:
    """Rendered full conversation minus the rendered prompt; if the prompt is not a prefix of it,
    the reply's content + eos."""
    full = tokenizer.apply_chat_template(prompt_msgs + [reply], tokenize=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    return reply["content"] + (tokenizer.eos_token or "")


def parse_strings(row: dict[str, Any], tokenizer=None, chat_template: bool = False) -> Triple:
    prompt, chosen, rejected = (_text(row, f) for f in ("prompt", "chosen", "rejected"))
    _check_texts(prompt, chosen, rejected)
    if chat_template:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return prompt, chosen, rejected


def _split_hh(text: str, field: str) -> tuple[str, str]:
    cut = text.rfind(HH_MARKER)
    if cut < 0:
        raise RowProblem("no_assistant_turn", field, f"a conversation containing {HH_MARKER!r}")
    cut += len(HH_MARKER)
    return text[:cut], text[cut:].lstrip()


def parse_hh(row: dict[str, Any], tokenizer=None, chat_template: bool = False) -> Triple:
    chosen_text, rejected_text = _text(row, "chosen"), _text(row, "rejected")
    prompt, chosen = _split_hh(chosen_text, "chosen")
    other, rejected = _split_hh(rejected_text, "rejected")
    if other != prompt:
        raise RowProblem("prompt_mismatch", "rejected", f"the same conversation as chosen up to the last {HH_MARKER!r}")
    _check_texts(prompt[: -len(HH_MARKER)], chosen, rejected)
    return prompt, chosen, rejected


def _messages(row: dict[str, Any], field: str) -> list[dict[str, str]]:
    value = row.get(field)
    if value is None:
        raise RowProblem("missing_field", field, "a list of {role, content} messages")
    if not isinstance(value, list) or not value:
        got = type(value).__name__
        raise RowProblem("malformed_messages", field, f"a non-empty list of {{role, content}} messages, got {got}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowProblem("malformed_messages", field, f"message {k} to be a dict with string role and content")
        if m["role"] not in MESSAGE_ROLES:
            raise RowProblem("unknown_role", field, f"message {k} to have a role in {', '.join(MESSAGE_ROLES)}, "
                                                    f"got {m['role']!r}")
    if value[-1]["role"] != "assistant":
        last = value[-1]["role"]
        raise RowProblem("no_assistant_turn", field, f"the last message to have role 'assistant', got {last!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_messages(row: dict[str, Any], tokenizer=None, chat_template: bool = True) -> Triple:
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    prompt_msgs = chosen[:-1]
    if rejected[:-1] != prompt_msgs:
        raise RowProblem("prompt_mismatch", "rejected", "the same messages as chosen before the last assistant turn")
    _check_texts("".join(m["content"] for m in prompt_msgs), chosen[-1]["content"], rejected[-1]["content"])
    try:
        prompt = render_prompt(tokenizer, prompt_msgs)
        return (prompt, *(render_response(tokenizer, prompt_msgs, prompt, side[-1]) for side in (chosen, rejected)))
    except Exception as e:  # e.g. a template that insists on alternating roles
        raise RowProblem("malformed_messages", "chosen", f"messages the chat template can render ({e})") from e


PARSERS = {"strings": parse_strings, "hh": parse_hh, "messages": parse_messages}
FORMATS = ("auto", *PARSERS)  # a new format: its parser in PARSERS (and, for "auto", a rule in detect_format)
