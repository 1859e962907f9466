"""The per-document part of the data stage as a list of steps with one signature.

A step has a ``name``, its ``config`` and ``apply(doc) -> doc | Rejection``; the pipeline
(:class:`Pipeline`) runs the steps in order and times each one, so the manifest reports every step's
CPU seconds and every rejection as ``<step>:<rule>`` with the part of the text that triggered it.
The list is built from the stage config (``steps``): the built-in names below, in any order, and a
user's own step as ``module:Class`` (constructed with its config dict, see :class:`Step`). Adding a
step (a decontamination filter, a classifier) touches only the list.

Document-level dedup needs every document at once (a shuffle), so it is a dataset stage of its own;
its per-document part, the signature, is the last step here (``sign``).
"""
from __future__ import annotations

import importlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import ConfigError

BUILTIN_STEPS = ("clean", "preset", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii")
DEFAULT_STEPS = list(BUILTIN_STEPS)


@dataclass
class Rejection:
    """Why a step drops a document: ``reason`` is ``<step>:<rule>``, ``detail`` the part of the text
    (a line, an n-gram, a character, a ratio) that decided it."""

    reason: str
    detail: str = ""


@dataclass
class Doc:
    """One document as the steps see it. ``meta`` is parsed on first use; ``preset`` is the filter
    preset that judges it (set by the ``preset`` step when ``auto``); ``pii`` counts replacements."""

    id: str
    text: str
    source: str
    meta_json: str = "{}"
    preset: str = ""
    pii: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # steps may leave results here (signatures)
    _meta: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = json.loads(self.meta_json) if self.meta_json not in ("", "{}") else {}
        return self._meta

    @property
    def format(self) -> str:
        """The input format as the reader saw it ("html" for pages, else from the file name)."""
        if '"format"' in self.meta_json:
            return str(self.meta.get("format", ""))
        return self.extra.get("format", "")


class Step:
    """Base class of every step (built-in or a user's ``module:Class``).

    ``config`` is the step's pydantic config (built-in steps) or the plain dict given in the stage
    config (user steps). ``apply`` returns the (possibly edited) document or a :class:`Rejection`.
    Steps are built once per worker batch function and must be picklable.
    """

    name = "step"

    def __init__(self, config: Any = None):
        self.config = config

    def apply(self, doc: Doc) -> Doc | Rejection:
        raise NotImplementedError


def shared_views(doc: Doc):
    """The views of the document's text that several steps need (words, lines, word counts, lower
    case: :class:`filters.Document`), computed once per text and shared until a step edits the text."""
    from pipelines.data.filters import Document

    view = doc.extra.get("_views")
    if view is None or view.text is not doc.text:
        view = doc.extra["_views"] = Document(doc.text)
    return view


# ---------------------------------------------------------------- built-in steps

class CleanStep(Step):
    name = "clean"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.clean import clean_document

        text, reason = clean_document(doc.text, doc.format == "html", self.config)
        if reason:
            return Rejection(reason, doc.text[:200])
        doc.text = text
        return doc


class PresetStep(Step):
    """Sets the preset that judges the document: the input's (``PATH:preset``), the config's, or with
    ``auto`` one chosen from the document's format and shape (:func:`filters.choose_preset`)."""

    name = "preset"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.filters import BOOK_WORDS, choose_preset

        preset = doc.preset or self.config.preset
        if preset == "published":
            preset = "web"
        if preset == "auto":
            # The words are split once per document and shared with the filters (shared_views).
            words = shared_views(doc).words if len(doc.text) >= BOOK_WORDS * 5 else None
            preset = choose_preset(doc.text, doc.format, doc.meta, doc.source, words)
        doc.preset = preset
        return doc


class _FilterStep(Step):
    """A quality filter whose settings depend on the document's preset: ``config`` is the stage's
    ``filters`` config; the settings of each preset are resolved once."""

    section = ""

    def __init__(self, config: Any = None):
        super().__init__(config)
        from pipelines.data.filters import PRESETS, effective_filters

        self._by_preset = {p: getattr(effective_filters(config, p), self.section) for p in PRESETS}

    def settings(self, doc: Doc) -> Any:
        return self._by_preset.get(doc.preset or "web") or self._by_preset["web"]

    def views(self, doc: Doc):
        return shared_views(doc)


class LanguageStep(_FilterStep):
    name = section = "language"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.filters import language_decision

        cfg = self.settings(doc)
        if not cfg.enabled:
            return doc
        reason, lang, score = language_decision(doc.text, cfg)
        if reason:
            return Rejection(reason, f"identified {lang} with score {score:.2f}")
        return doc


class GopherRepetitionStep(_FilterStep):
    name = section = "gopher_repetition"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.filters import explain, gopher_repetition

        cfg = self.settings(doc)
        if cfg.enabled and (reason := gopher_repetition(doc.text, cfg, self.views(doc))):
            return Rejection(reason, explain(reason, doc.text, cfg))
        return doc


class GopherQualityStep(_FilterStep):
    name = section = "gopher_quality"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.filters import explain, gopher_quality

        cfg = self.settings(doc)
        if cfg.enabled and (reason := gopher_quality(doc.text, cfg, self.views(doc))):
            return Rejection(reason, explain(reason, doc.text, cfg))
        return doc


class C4Step(_FilterStep):
    name = section = "c4"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.filters import c4_filter, explain

        cfg = self.settings(doc)
        if not cfg.enabled:
            return doc
        cleaned, reason = c4_filter(doc.text, cfg, self.views(doc))
        if reason:
            return Rejection(reason, explain(reason, doc.text, cfg))
        doc.text = cleaned
        return doc


class FineWebStep(_FilterStep):
    name = section = "fineweb"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.filters import explain, fineweb_filter

        cfg = self.settings(doc)
        if cfg.enabled and (reason := fineweb_filter(doc.text, cfg, self.views(doc))):
            return Rejection(reason, explain(reason, doc.text, cfg))
        return doc


class PIIStep(Step):
    name = "pii"

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.pii import redact

        doc.text, counts = redact(doc.text, self.config)
        for kind, n in counts.items():
            doc.pii[kind] = doc.pii.get(kind, 0) + n
        return doc


class SignStep(Step):
    """Exact hash, MinHash signature and LSH band keys of a kept document, for the dedup stage."""

    name = "dedup"

    def __init__(self, config: Any = None):
        super().__init__(config)
        from pipelines.data.dedup import new_minhash

        # Built here and shipped with the steps, so the permutations are not rebuilt (or datasketch
        # imported) inside the timed signing of a worker's first batch.
        self._prototype = new_minhash(config)

    def apply(self, doc: Doc) -> Doc | Rejection:
        from pipelines.data.dedup import sign_document

        doc.extra["signed"] = sign_document(doc.text, self.config, self._prototype)
        return doc


class Decontaminate(Step):
    """Not in the default list; an example of a step given as ``module:Class`` in the config:
    ``steps=[..., "pipelines.data.steps:Decontaminate"]`` with
    ``step_config={"pipelines.data.steps:Decontaminate": {"phrases": ["..."]}}``. Drops documents that
    contain any of the phrases (case-insensitive), e.g. the questions of an evaluation set."""

    name = "decontaminate"

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config or {})
        self.phrases = [p.lower() for p in self.config.get("phrases", [])]

    def apply(self, doc: Doc) -> Doc | Rejection:
        lower = doc.text.lower()
        for phrase in self.phrases:
            at = lower.find(phrase)
            if at >= 0:
                return Rejection("contains_phrase", doc.text[max(at - 40, 0):at + len(phrase) + 40])
        return doc


STEP_CLASSES: dict[str, type[Step]] = {
    "clean": CleanStep, "preset": PresetStep, "language": LanguageStep,
    "gopher_repetition": GopherRepetitionStep, "gopher_quality": GopherQualityStep, "c4": C4Step,
    "fineweb": FineWebStep, "pii": PIIStep,
}


def load_user_step(spec: str, config: dict[str, Any] | None) -> Step:
    """A user's ``module:Class`` step, constructed with its config dict; ConfigError (one line) if not."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"config field 'steps': {spec!r} is neither a built-in step "
                          f"({', '.join(BUILTIN_STEPS)}) nor module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config field 'steps': cannot load {spec} ({err})") from None
    try:
        step = cls(config or {})
    except Exception as err:
        raise ConfigError(f"config field 'steps': {spec}({config or {}}) failed: {err}") from None
    if not callable(getattr(step, "apply", None)):
        raise ConfigError(f"config field 'steps': {spec} has no apply(document) method")
    if not getattr(step, "name", None) or getattr(step, "name", None) == "step":
        step.name = class_name.lower()
    return step


def build_steps(names: Iterable[str], stage_config: Any, sign: bool) -> list[Step]:
    """The pipeline of the stage config: built-in names get their config section, ``module:Class``
    entries their dict from ``step_config``; ``sign`` appends the dedup signature step."""
    sections = {"clean": stage_config.clean, "preset": stage_config.filters, "language": stage_config.filters,
                "gopher_repetition": stage_config.filters, "gopher_quality": stage_config.filters,
                "c4": stage_config.filters, "fineweb": stage_config.filters, "pii": stage_config.pii}
    steps: list[Step] = []
    for name in names:
        if name in STEP_CLASSES:
            steps.append(STEP_CLASSES[name](sections[name]))
        else:
            steps.append(load_user_step(name, stage_config.step_config.get(name)))
    if sign:
        steps.append(SignStep(stage_config.dedup))
    return steps


class Pipeline:
    """Runs the steps on one document at a time and times each step (CPU seconds of the calling thread,
    summed per step name)."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        self.seconds: dict[str, float] = {s.name: 0.0 for s in steps}

    def run(self, doc: Doc) -> Doc | Rejection:
        clock = time.thread_time  # CPU seconds of this thread: what the manifest reports, honest under load
        for step in self.steps:
            started = clock()
            try:
                result = step.apply(doc)
            finally:
                self.seconds[step.name] += clock() - started
            if isinstance(result, Rejection):
                if ":" not in result.reason:
                    result.reason = f"{step.name}:{result.reason}"
                return result
            if result is None:
                raise TypeError(f"step {step.name} returned None (return the document or a Rejection)")
            doc = result
        return doc
