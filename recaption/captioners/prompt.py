"""The prompt contract every VLM backend shares: the versioned system prompt, the schema it
asks for, the user text sent with each image, and how a reply's JSON object is found."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from recaption.errors import ConfigError
from recaption.records import Caption

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
USER_TEXT = "Caption this image."  # sent with each image, after the system prompt


def load_prompt(name: str) -> tuple[str, str]:
    """(version, text) of a bundled prompt name or a prompt file; the version is its stem."""
    path = Path(name) if name.endswith((".md", ".txt")) else PROMPTS / f"{name}.md"
    if not path.is_file():
        bundled = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.md")))
        raise ConfigError(f"captioner.prompt {name!r}: no such file (bundled: {bundled})")
    return path.stem, path.read_text().strip()


def prompt_with_schema(prompt: str) -> str:
    """The prompt for output modes that carry no schema on the wire (JSON mode, text)."""
    schema = json.dumps(Caption.model_json_schema())
    return f"{prompt}\n\nReply with only the JSON object, matching this JSON Schema:\n{schema}"


def parse_json_object(text: str) -> Any:
    """The JSON object in a reply: bare, fenced in ```json, or wrapped in prose."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            return json.loads(text[start : end + 1])  # JSONDecodeError if still broken
        raise
