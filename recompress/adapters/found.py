"""What an adapter found in a checkpoint, before any model is built: its tables, its family, every
hyper-parameter with where it came from, and what the user must still supply (``--hp KEY=VALUE``)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recompress.errors import UserError

SOURCES = ("checkpoint", "file name", "sidecar", "shapes", "user", "default")


@dataclass
class FoundTable:
    """One embedding table as stored upstream (``kind``: dense, qr, factorized...)."""

    name: str
    rows: int
    dim: int
    dtype: str
    bytes: int
    kind: str = "dense"
    role: str = "sparse_feature"
    parts: tuple[str, ...] = ()  # the upstream keys or files that hold it
    stored: Any = field(default=None, repr=False, compare=False)  # left in its file: read by row blocks (``stored``)

    @classmethod
    def of(cls, name: str, w: Any, key: str, role: str = "sparse_feature", rows: int | None = None) -> FoundTable:
        """The table a ``[rows, dim]`` tensor stored under ``key`` holds (``rows``: when the model's table has more
        rows than the tensor, e.g. a padding row recompress adds)."""
        return cls(name, int(w.shape[0]) if rows is None else rows, int(w.shape[-1]),
                   str(w.dtype).removeprefix("torch."), w.numel() * w.element_size(), role=role, parts=(key,))


@dataclass
class Found:
    """An adapter's reading of a checkpoint. ``build(hparams)`` makes the Checkpoint once nothing is missing."""

    format: str
    family: str
    tables: list[FoundTable]
    build: Callable[[dict[str, Any]], Any]
    hparams: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> the values it may take
    why_missing: dict[str, str] = field(default_factory=dict)
    like: dict[str, Any] = field(default_factory=dict)  # for a missing value without choices: an example of its type
    notes: list[str] = field(default_factory=list)
    upstream: bool = True  # False for recompress's own checkpoints, whose spec records everything
    provenance: dict[str, Any] = field(default_factory=dict)  # what the checkpoint says of itself (metrics...)

    def set(self, key: str, value: Any, source: str) -> None:
        """Record a hyper-parameter and its source (one of SOURCES, optionally with a detail after ':')."""
        assert source.split(":")[0] in SOURCES, source
        self.hparams[key], self.sources[key] = value, source

    def need(self, key: str, choices: tuple[str, ...], why: str, like: Any = None) -> None:
        """A hyper-parameter nothing in the checkpoint gives; the user must pass ``--hp key=VALUE`` (one of
        ``choices``, or a value of ``like``'s type)."""
        self.missing[key], self.why_missing[key] = choices, why
        if like is not None:
            self.like[key] = like

    def apply(self, user: dict[str, str]) -> Found:
        """Take the user's ``--hp`` values (they win over anything found), typed like the values they replace."""
        for key, text in user.items():
            if key not in self.hparams and key not in self.missing:
                known = sorted({*self.hparams, *self.missing})
                close = difflib.get_close_matches(key, known, n=1)
                raise UserError(f"--hp {key}: {self.format} checkpoints have no hyper-parameter {key!r}",
                                (f"did you mean {close[0]}? " if close else "") + f"known: {', '.join(known)}")
            choices = self.missing.get(key)
            value = _typed(key, text, self.hparams.get(key, self.like.get(key)), choices)
            if self.sources.get(key) == "shapes" and value != self.hparams[key]:
                raise UserError(f"--hp {key}={text}: the tensors' shapes say {key} = {json.dumps(self.hparams[key])}",
                                f"drop --hp {key}: what the weights' shapes give cannot be changed")
            self.missing.pop(key, None)
            self.set(key, value, "user")
        return self

    def checkpoint(self) -> Any:
        """The model, built; refused while a hyper-parameter is missing."""
        if self.missing:
            hp = " ".join(f"--hp {k}={'|'.join(v) if v else 'VALUE'}" for k, v in self.missing.items())
            raise UserError(f"this {self.format} checkpoint does not say {', '.join(self.missing)} "
                            f"({'; '.join(self.why_missing.values())})", f"pass {hp}")
        try:
            ckpt = self.build(dict(self.hparams))
        except (ValueError, RuntimeError) as e:  # a model refusing the values it was given (e.g. --hp dropout=-3)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if not self.sources or "user" not in self.sources.values():
                raise UserError(f"this {self.format} checkpoint cannot be built from what it says ({first})",
                                "the file is damaged, or pass the right value with --hp ('recompress inspect' lists "
                                "them and their sources)") from None
            user = ", ".join(f"{k}={v}" for k, v in self.hparams.items() if self.sources.get(k) == "user")
            raise UserError(f"this {self.format} checkpoint cannot be built with --hp {user} ({first})",
                            "check the values against 'recompress inspect'") from None
        if not self.upstream:
            return ckpt
        ckpt.spec.provenance.update({"source_format": self.format, "hparam_source": dict(self.sources), **self.provenance})
        user = {k: v for k, v in self.hparams.items() if self.sources.get(k) == "user"}
        if user:
            ckpt.spec.provenance["hparam_overrides"] = {k: str(v) for k, v in user.items()}
        return ckpt


def _typed(key: str, text: str, like: Any, choices: tuple[str, ...] | None) -> Any:
    if choices and text not in choices:
        raise UserError(f"--hp {key}={text}: not one of {', '.join(choices)}", f"e.g. --hp {key}={choices[0]}")
    if choices or like is None or isinstance(like, str):
        return text
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(like, (list, dict)):
            value = json.loads(text)
            if type(value) is not type(like):
                raise ValueError
            return value
        return type(like)(text)
    except ValueError:
        raise UserError(f"--hp {key}={text}: expected {type(like).__name__} like {like!r}",
                        f"e.g. --hp {key}={json.dumps(like) if isinstance(like, (list, dict)) else like}") from None


def parse_hp(pairs: tuple[str, ...] | list[str] | None) -> dict[str, str]:
    """``("heads=2", "qr_operation=add")`` -> dict; a pair without '=' is one clear error."""
    out: dict[str, str] = {}
    for p in pairs or ():
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--hp {p!r} is not KEY=VALUE", "e.g. --hp heads=2")
        out[key.strip()] = value.strip()
    return out
