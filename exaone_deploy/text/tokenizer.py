"""The model's tokenizer and chat template, read from Hugging Face files without transformers.

`Tokenizer.from_dir` reads a checkpoint or bundle directory the way transformers'
`AutoTokenizer.from_pretrained` does for a `tokenizer.json` tokenizer: the backend from
`tokenizer.json`; special tokens, extra added tokens and the chat template from
`tokenizer_config.json` (with `chat_template.jinja`, `additional_chat_templates/*.jinja` and the legacy
`special_tokens_map.json`); stop ids from `generation_config.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from ..errors import ExaoneDeployError
from .chat import _plain, render_chat_template


class TokenizerError(ExaoneDeployError, ValueError):
    """Tokenizer files that cannot be read, or a chat template that is absent or ambiguous."""


# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _token_content(value: Any, source: Path) -> str | None:
    """A special token from a config: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: not a token: {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"cannot read {path}: expected a JSON object")
    return data


def _ids_of(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """Encode, decode and render chats for one model, on the `tokenizers` library alone."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        eos_ids: Iterable[int] = (),
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        #: Named special tokens (bos_token, eos_token, ...), passed to chat templates as variables.
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        #: The Jinja chat template, or named templates ({"default": ..., "tool_use": ...}), or None.
        self.chat_template = chat_template
        #: As in tokenizer_config.json. Informational only: like transformers 5, encoding with
        #: `add_special_tokens=True` follows tokenizer.json's post-processor.
        self.add_bos_token = add_bos_token
        self.bos_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.pad_id = self.token_to_id(self.special_tokens.get("pad_token"))
        self.unk_id = self.token_to_id(self.special_tokens.get("unk_token"))
        eos = list(eos_ids)
        own_eos = self.token_to_id(self.special_tokens.get("eos_token"))
        if own_eos is not None and own_eos not in eos:
            eos.append(own_eos)
        #: Ids that end generation: generation_config.json's eos_token_id, then the tokenizer's eos token.
        self.eos_ids: list[int] = eos

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required), `tokenizer_config.json` and `generation_config.json` from `path`."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}: {tokenizer_file} is missing")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"cannot load {tokenizer_file}: {e}") from e

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}

        # Tokens listed in the config but missing from tokenizer.json are added, as transformers does.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        added = config.get("added_tokens_decoder") or {}
        for _, entry in sorted(added.items(), key=lambda item: int(item[0])):
            if not isinstance(entry, dict) or entry.get("content") in known:
                continue
            flags = {k: entry[k] for k in _ADDED_TOKEN_FLAGS if k in entry}
            backend.add_tokens([tokenizers.AddedToken(entry["content"], **flags)])
            known.add(entry["content"])

        special_tokens: dict[str, str] = {}
        legacy_file = path / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and legacy_file.is_file():  # as transformers: legacy configs only
            legacy = _read_json(legacy_file)
            special_tokens.update({k: _token_content(legacy.get(k), legacy_file) for k in SPECIAL_TOKEN_NAMES})
        for name in SPECIAL_TOKEN_NAMES:
            if config.get(name) is not None:
                special_tokens[name] = _token_content(config[name], config_file)
        special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        missing = [t for t in special_tokens.values() if t not in known]
        if missing:
            backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])

        eos_ids: list[int] = []
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            eos_ids = _ids_of(_read_json(generation_file).get("eos_token_id"))

        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=cls._load_chat_template(path, config),
            eos_ids=eos_ids,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    @staticmethod
    def _load_chat_template(path: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
        # Template files win over the config entry, as in transformers.
        templates: dict[str, str] = {}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if templates:
            return templates["default"] if list(templates) == ["default"] else templates
        template = config.get("chat_template")
        if isinstance(template, list):
            return {t["name"]: t["template"] for t in template}
        return template

    # ---- tokens ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (what `skip_special_tokens` drops)."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added tokens written in the text ("[|user|]", "<think>") become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: `chat_template` (a name among several, or a template), else the default.

        With several named templates, "tool_use" is picked when tools are given, else "default".
        """
        if isinstance(self.chat_template, dict):
            if chat_template is not None:
                return self.chat_template.get(chat_template, chat_template)
            if tools is not None and "tool_use" in self.chat_template:
                return self.chat_template["tool_use"]
            if "default" in self.chat_template:
                return self.chat_template["default"]
            raise TokenizerError(f"several chat templates and no default: pass one of {sorted(self.chat_template)}")
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        return self.chat_template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` (and `tools`) into a prompt, as ids (`tokenize=True`) or text.

        Matches transformers' `apply_chat_template(..., enable_thinking=..., tokenize=...)`: the special
        tokens and `kwargs` are template variables, and the text is encoded without adding special tokens.
        """
        template = self.get_chat_template(chat_template, tools)
        documents = kwargs.pop("documents", None)
        variables = {**self.special_tokens, "enable_thinking": enable_thinking, **kwargs}
        if not tokenize:
            return render_chat_template(
                template,
                messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        # Text from the client (message contents, tool definitions and arguments, documents) that spells a control
        # token ("[|endofturn|]", "[|system|]") must stay text, or a user could forge turns; the template's own
        # markup still produces the control tokens. Each occurrence in client text is swapped for a placeholder
        # before rendering, and encoded as text after it.
        user = {
            "messages": _plain(list(getattr(messages, "messages", messages))),
            "tools": _plain(tools),
            "documents": _plain(documents),
        }
        sentinel = self._sentinel(json.dumps(user, ensure_ascii=False))
        if sentinel is None:  # cannot happen with real input: every candidate character occurs in it
            raise TokenizerError("chat messages contain every placeholder character; cannot render them safely")
        user = self._defuse(user, sentinel)
        text = render_chat_template(
            template,
            user["messages"],
            tools=user["tools"],
            documents=user["documents"],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return self._encode_defused(text, sentinel)

    # ---- control tokens in client text ------------------------------------------------------------

    @cached_property
    def control_tokens(self) -> list[str]:
        """Contents of the added tokens marked special ([|user|], [|endofturn|], bos/eos...), longest first."""
        tokens = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content}
        return sorted(tokens, key=lambda t: (-len(t), t))

    @cached_property
    def _text_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes control-token spellings as ordinary text."""
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    @staticmethod
    def _sentinel(text: str) -> str | None:
        """A Unicode noncharacter that does not occur in `text` (they are never assigned to characters)."""
        return next((c for c in map(chr, range(0xFDD0, 0xFDF0)) if c not in text), None)

    def _defuse(self, value: Any, sentinel: str) -> Any:
        """`value` with each control token in its strings (not dict keys, not message roles) as a placeholder."""
        if isinstance(value, str):
            for k, token in enumerate(self.control_tokens):
                if token in value:
                    value = value.replace(token, f"{sentinel}{k}{sentinel}")
            return value
        if isinstance(value, Mapping):
            return {k: (v if k == "role" else self._defuse(v, sentinel)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._defuse(v, sentinel) for v in value]
        return value

    def _encode_defused(self, text: str, sentinel: str) -> list[int]:
        ids: list[int] = []
        parts = re.split(f"{sentinel}(\\d+){sentinel}", text)
        for i, part in enumerate(parts):
            if i % 2:
                ids += self._text_backend.encode(self.control_tokens[int(part)], add_special_tokens=False).ids
            elif part:
                ids += self.encode(part)
        return ids
