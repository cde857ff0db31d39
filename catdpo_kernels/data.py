"""Preference data in the PKU-SafeRLHF schema: reading, the SafeDPO transform, tokenization.

Three steps, each usable on its own (docs/design.md, "Data"):

1. :func:`read_pku_saferlhf` reads rows in the PKU-SafeRLHF schema from a local
   JSONL / parquet file, a directory holding ``{split}.jsonl`` / ``{split}.parquet``,
   or a Hugging Face hub data set (``datasets.load_dataset``). Each row is checked;
   a malformed row is reported with its line number (JSONL) or row index (parquet,
   hub) and either rejected (``on_error="raise"``, the default: a
   :class:`MalformedRowError` listing them) or skipped (``on_error="skip"``: kept
   in :attr:`ReadResult.issues` and warned about). No row is ever dropped silently.
2. :func:`safedpo_transform` turns rows into :class:`PreferencePair` s:
   the winner is ``better_response_id`` (configurable); winner unsafe and loser
   safe: swap; both unsafe: drop (counted in the report); otherwise keep. A
   safe-vs-unsafe pair's category is the harm-category set of its unsafe response,
   kept multi-hot; a pair with no unsafe response has no category.
3. :func:`tokenize_pairs` + :func:`collate_pairs` tokenize prompt+chosen and
   prompt+rejected with any Hugging Face tokenizer and pad them into the row
   convention of ``catdpo_kernels.loss``: rows ``[0, B)`` chosen, ``[B, 2B)``
   rejected; ``labels`` equal ``input_ids`` on response tokens and ``-100`` on
   prompt and padding.

**Label alignment.** ``labels`` are *aligned with* ``input_ids`` (not pre-shifted),
as Hugging Face causal LMs expect. The logits at position ``t`` predict token
``t + 1``, so call ``catdpo_kernels.loss(..., shift_labels=True)``: it reads
``logits[:, :-1]`` against ``labels[:, 1:]`` through strides, without a copy.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .categories import PKU_SAFERLHF_CATEGORIES
from .hub_names import looks_like_hub_name

IGNORE_INDEX = -100

#: Columns the SafeDPO transform needs; a row without one of them is malformed.
REQUIRED_COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "response_0_harm_category",
    "response_1_harm_category",
    "better_response_id",
)
#: Other PKU-SafeRLHF columns: checked when present, not required.
OPTIONAL_COLUMNS = (
    "safer_response_id",
    "response_0_severity_level",
    "response_1_severity_level",
    "prompt_source",
    "response_0_source",
    "response_1_source",
    "response_0_sha256",
    "response_1_sha256",
)
PREFERENCE_KEYS = ("better_response_id", "safer_response_id")

#: The bundled synthetic sample (train / test JSONL in the PKU-SafeRLHF schema).
SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "pku_saferlhf_sample"


def sample_path(split: str = "train") -> Path:
    """Path of a split (``train`` or ``test``) of the bundled sample."""
    path = SAMPLE_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"the bundled sample has no split {split!r} (looked for {path})")
    return path


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class RowIssue:
    """One malformed row: where it is and what is wrong with it."""

    location: str
    """``file.jsonl:LINE`` for JSON lines, ``file.parquet[row N]`` / ``name[split][row N]`` otherwise."""
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


class MalformedRowError(ValueError):
    """Raised by :func:`read_pku_saferlhf` with ``on_error="raise"``; ``.issues`` lists every bad row."""

    def __init__(self, source: str, issues: Sequence[RowIssue]):
        self.source = source
        self.issues = list(issues)
        shown = "\n  ".join(str(i) for i in self.issues[:10])
        more = f"\n  ... and {len(self.issues) - 10} more" if len(self.issues) > 10 else ""
        super().__init__(
            f"{len(self.issues)} malformed row(s) in {source} (PKU-SafeRLHF schema):\n  {shown}{more}\n"
            "Fix the data, or pass on_error='skip' (--on-bad-rows skip) to skip these rows; skipped rows are "
            "reported, never dropped silently."
        )


@dataclass
class SchemaRow:
    """A validated PKU-SafeRLHF row and where it came from."""

    location: str
    data: dict[str, Any]


@dataclass
class ReadResult:
    """What :func:`read_pku_saferlhf` returns."""

    source: str
    rows: list[SchemaRow]
    issues: list[RowIssue] = field(default_factory=list)
    """The malformed rows that were skipped (``on_error="skip"``); empty otherwise."""

    def __len__(self) -> int:
        return len(self.rows)


def _is_int01(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in (0, 1)


def validate_row(row: Any, categories: Sequence[str] = PKU_SAFERLHF_CATEGORIES) -> list[str]:
    """Reasons a row does not follow the PKU-SafeRLHF schema (empty list: valid)."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in row or row[c] is None]
    if missing:
        problems.append(f"missing column(s) {missing}")
    for key in ("prompt", "response_0", "response_1"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            problems.append(f"{key} must be a string, got {type(row[key]).__name__}")
    for key in ("is_response_0_safe", "is_response_1_safe"):
        if key in row and row[key] is not None and not isinstance(row[key], bool):
            problems.append(f"{key} must be true/false, got {row[key]!r}")
    for key in PREFERENCE_KEYS:
        if key in row and row[key] is not None and not _is_int01(row[key]):
            problems.append(f"{key} must be 0 or 1, got {row[key]!r}")
    expected = set(categories)
    for key in ("response_0_harm_category", "response_1_harm_category"):
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"{key} must be a dict of {len(categories)} booleans, got {type(value).__name__}")
            continue
        unknown = sorted(set(value) - expected)
        absent = [c for c in categories if c not in value]
        if unknown:
            problems.append(f"{key} has unknown harm categories {unknown}")
        if absent:
            problems.append(f"{key} lacks harm categories {absent}")
        bad = sorted(k for k, v in value.items() if k in expected and not isinstance(v, bool))
        if bad:
            problems.append(f"{key} values must be true/false (not for {bad})")
    for key in ("response_0_severity_level", "response_1_severity_level"):
        v = row.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 3):
            problems.append(f"{key} must be an integer in [0, 3], got {v!r}")
    for key in ("prompt_source", "response_0_source", "response_1_source", "response_0_sha256", "response_1_sha256"):
        v = row.get(key)
        if v is not None and not isinstance(v, str):
            problems.append(f"{key} must be a string, got {type(v).__name__}")
    return problems


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # Binary, decoded per line: a bad byte is then one malformed row with its line number,
    # where a text-mode read would abort the whole file with a bare UnicodeDecodeError.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.end].hex(" ")
                yield loc, _Unparsable(f"invalid UTF-8 ({e.reason}: byte(s) {bad} at byte column {e.start + 1})")
                continue
            if not line.strip():
                continue  # a blank line holds no row
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, _Unparsable(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    # Batch by batch: a limit does not need the whole file as Python objects.
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path.name}[row {i}]", row
            i += 1


def _iter_hub(name: str, split: str, config: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is in the [train] extra
        raise ImportError("reading a hub data set needs `datasets` (pip install 'catdpo_kernels[train]')") from e
    ds = datasets.load_dataset(name, name=config, split=split)
    for i, row in enumerate(ds):
        yield f"{name}[{split}][row {i}]", row


class _Unparsable:
    def __init__(self, reason: str):
        self.reason = reason


def _resolve_source(source: str | os.PathLike, split: str) -> tuple[str, Path | None]:
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a hub data set name, got {type(source).__name__}")
    if isinstance(source, str) and not source.strip():
        # Path("") is ".": an empty --data would silently read the working directory.
        raise ValueError("source is empty: pass a data file, a directory or a hub data set name")
    path = Path(source).expanduser()
    if path.is_dir():
        for ext in (".jsonl", ".json", ".parquet"):
            candidate = path / f"{split}{ext}"
            if candidate.is_file():
                return str(candidate), candidate
        raise FileNotFoundError(f"{path} holds no {split}.jsonl / {split}.json / {split}.parquet")
    if path.is_file():
        return str(path), path
    # Only a str can name a hub data set; a mistyped local path must fail here and now, not
    # after a hub lookup that ends ~30 s later in a ConnectionError.
    if not isinstance(source, str) or not looks_like_hub_name(source):
        raise FileNotFoundError(
            f"no such data file or directory: {source} (a hub data set is named owner/name, e.g. "
            "PKU-Alignment/PKU-SafeRLHF)"
        )
    return source, None  # a hub data set name, e.g. PKU-Alignment/PKU-SafeRLHF


def _check_limit(limit) -> int | None:
    # limit=0 used to return one row (the check ran after the first append), limit=-1 too.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 (or None: no limit), got {limit!r}")
    return None if limit is None else int(limit)


def _open_source(source, split: str, config: str | None) -> tuple[str, Iterator[tuple[str, Any]]]:
    if source is None:
        source = SAMPLE_DIR
    name, path = _resolve_source(source, split)
    if path is None:
        return name, _iter_hub(name, split, config)
    if path.suffix == ".parquet":
        return name, _iter_parquet(path)
    return name, _iter_jsonl(path)


def _checked_rows(
    name: str, records: Iterable[tuple[str, Any]], categories: Sequence[str], issues: list[RowIssue]
) -> Iterator[SchemaRow]:
    """The valid rows of ``records``, lazily; the malformed ones are appended to ``issues``."""
    for loc, record in records:
        problems = [record.reason] if isinstance(record, _Unparsable) else validate_row(record, categories)
        if problems:
            issues.append(RowIssue(loc, "; ".join(problems)))
            continue
        yield SchemaRow(loc, record)


def _finish_reading(name: str, n_valid: int, issues: list[RowIssue], on_error: str) -> None:
    """After reading: raise for malformed rows (``on_error="raise"``) or for a source with no usable row;
    warn about skipped rows."""
    if issues and on_error == "raise":
        raise MalformedRowError(name, issues)
    if n_valid == 0:
        if not issues:
            raise ValueError(f"{name} holds no rows (an empty file or data set, or blank lines only)")
        raise ValueError(
            f"{name} holds no usable rows: all {len(issues)} row(s) are malformed and were skipped (first: {issues[0]})"
        )
    if issues:
        warnings.warn(
            f"skipped {len(issues)} malformed row(s) of {name}: "
            + "; ".join(str(i) for i in issues[:3])
            + (" ..." if len(issues) > 3 else ""),
            stacklevel=3,
        )


def read_pku_saferlhf(
    source: str | Path | None = None,
    *,
    split: str = "train",
    config: str | None = None,
    on_error: str = "raise",
    categories: Sequence[str] = PKU_SAFERLHF_CATEGORIES,
    limit: int | None = None,
) -> ReadResult:
    """Read PKU-SafeRLHF-schema rows.

    Args:
        source: a ``.jsonl`` / ``.json`` (JSON lines) or ``.parquet`` file; a directory with
            ``{split}.jsonl`` (or ``.json`` / ``.parquet``); or a hub data set name such as
            ``PKU-Alignment/PKU-SafeRLHF``, read with ``datasets.load_dataset(source, config,
            split=split)``. ``None``: the bundled sample.
        split: the split of a directory or hub data set.
        config: the hub configuration (e.g. ``alpaca3-8b``).
        on_error: ``"raise"`` (default) raises :class:`MalformedRowError` listing every bad
            row with its line number; ``"skip"`` skips them, returns them in ``issues`` and
            warns.
        categories: the harm-category names each ``response_*_harm_category`` dict must hold.
        limit: read at most this many valid *rows* (``None``: all; else an int >= 1). Rows,
            not pairs: the SafeDPO transform may drop some of them; :func:`load_pairs`'s
            ``limit`` counts pairs.

    Raises:
        FileNotFoundError: a path that does not exist (only a bare ``owner/name`` is taken
            for a hub data set).
        MalformedRowError: malformed rows (invalid JSON or UTF-8, schema violations) with
            ``on_error="raise"``.
        ValueError: a source with no rows, or (``on_error="skip"``) with no valid row.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    limit = _check_limit(limit)
    name, records = _open_source(source, split, config)
    rows: list[SchemaRow] = []
    issues: list[RowIssue] = []
    for item in _checked_rows(name, records, categories, issues):
        rows.append(item)
        if limit is not None and len(rows) >= limit:
            break
    _finish_reading(name, len(rows), issues, on_error)
    return ReadResult(name, rows, issues)


# ------------------------------------------------------------------ SafeDPO transform
@dataclass(frozen=True)
class PreferencePair:
    """One preference pair after the SafeDPO transform."""

    prompt: str
    chosen: str
    rejected: str
    chosen_unsafe: bool
    rejected_unsafe: bool
    categories: tuple[bool, ...]
    """Multi-hot harm categories of the unsafe response; all ``False`` when the pair has none."""
    location: str = ""
    swapped: bool = False
    """``True`` when the SafeDPO transform swapped winner and loser."""

    @property
    def category_ids(self) -> list[int]:
        return [i for i, on in enumerate(self.categories) if on]


@dataclass
class TransformReport:
    """Counts of the SafeDPO transform; ``format()`` renders them with the category table."""

    category_names: tuple[str, ...]
    rows: int = 0
    kept: int = 0
    safe_vs_unsafe: int = 0
    both_safe: int = 0
    swapped: int = 0
    dropped_both_unsafe: int = 0
    multi_label: int = 0
    unsafe_without_category: int = 0
    category_counts: list[int] = field(default_factory=list)
    dropped_locations: list[str] = field(default_factory=list)
    skipped_malformed: list[RowIssue] = field(default_factory=list)

    def add_pair(self, p: PreferencePair) -> None:
        """Count one kept pair."""
        self.kept += 1
        self.swapped += p.swapped
        if not p.rejected_unsafe:
            self.both_safe += 1
            return
        self.safe_vs_unsafe += 1
        n_on = sum(p.categories)
        self.multi_label += n_on > 1
        self.unsafe_without_category += n_on == 0
        for c, on in enumerate(p.categories):
            self.category_counts[c] += on

    def format(self, title: str = "data") -> str:
        lines = [
            f"[{title}] {self.rows} rows -> {self.kept} pairs: {self.safe_vs_unsafe} safe-vs-unsafe "
            f"({self.swapped} swapped, {self.multi_label} multi-label, {self.unsafe_without_category} unsafe "
            f"without a category), {self.both_safe} both safe (no category); dropped {self.dropped_both_unsafe} "
            f"both-unsafe pairs; skipped {len(self.skipped_malformed)} malformed rows",
        ]
        width = max(len(n) for n in self.category_names)
        lines.append(f"  {'category':<{width}}  pairs")
        for name, count in zip(self.category_names, self.category_counts):
            lines.append(f"  {name:<{width}}  {count:5d}")
        lines.append(f"  {'(no category)':<{width}}  {self.both_safe + self.unsafe_without_category:5d}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "safe_vs_unsafe": self.safe_vs_unsafe,
            "both_safe": self.both_safe,
            "swapped": self.swapped,
            "dropped_both_unsafe": self.dropped_both_unsafe,
            "multi_label": self.multi_label,
            "unsafe_without_category": self.unsafe_without_category,
            "category_counts": dict(zip(self.category_names, self.category_counts)),
            "skipped_malformed": [str(i) for i in self.skipped_malformed],
        }


def safedpo_transform(
    rows: ReadResult | Iterable[SchemaRow | dict],
    *,
    categories: Sequence[str] = PKU_SAFERLHF_CATEGORIES,
    preference_key: str = "better_response_id",
) -> tuple[list[PreferencePair], TransformReport]:
    """SafeDPO's transformation and the category assignment (docs/design.md, "Data").

    The winner is ``row[preference_key]`` (``better_response_id`` by default: the
    helpfulness preference, which SafeDPO corrects for safety). Then:

    * winner unsafe, loser safe: swap them;
    * both unsafe: drop the pair (counted in ``report.dropped_both_unsafe``);
    * otherwise: keep it.

    A kept safe-vs-unsafe pair gets the harm categories of its unsafe (rejected)
    response as a multi-hot tuple; a both-safe pair gets none (all ``False``).
    """
    names = _check_preference_key(preference_key, categories)
    report = TransformReport(category_names=names, category_counts=[0] * len(names))
    if isinstance(rows, ReadResult):
        report.skipped_malformed = list(rows.issues)
        rows = rows.rows
    pairs = []
    for i, item in enumerate(rows):
        pair = _transform_row(item, i, names, preference_key, report)
        if pair is not None:
            pairs.append(pair)
    return pairs, report


def _check_preference_key(preference_key: str, categories: Sequence[str]) -> tuple[str, ...]:
    if preference_key not in PREFERENCE_KEYS:
        raise ValueError(f"preference_key must be one of {PREFERENCE_KEYS}, got {preference_key!r}")
    return tuple(categories)


def _transform_row(
    item: SchemaRow | dict, index: int, names: tuple[str, ...], preference_key: str, report: TransformReport
) -> PreferencePair | None:
    """One row through the SafeDPO transform, counted in ``report``; ``None`` when it is dropped."""
    loc, row = (item.location, item.data) if isinstance(item, SchemaRow) else (f"row {index}", item)
    report.rows += 1
    if row.get(preference_key) is None:
        raise ValueError(f"{loc}: {preference_key} is missing; cannot pick a winner")
    w = int(row[preference_key])
    l = 1 - w  # noqa: E741
    unsafe = (not row["is_response_0_safe"], not row["is_response_1_safe"])
    if unsafe[w] and unsafe[l]:
        report.dropped_both_unsafe += 1
        report.dropped_locations.append(loc)
        return None
    swapped = unsafe[w] and not unsafe[l]
    if swapped:
        w, l = l, w  # noqa: E741
    if unsafe[l]:
        harm = row[f"response_{l}_harm_category"]
        cats = tuple(bool(harm[n]) for n in names)
    else:
        cats = (False,) * len(names)
    pair = PreferencePair(
        prompt=row["prompt"],
        chosen=row[f"response_{w}"],
        rejected=row[f"response_{l}"],
        chosen_unsafe=unsafe[w],
        rejected_unsafe=unsafe[l],
        categories=cats,
        location=loc,
        swapped=swapped,
    )
    report.add_pair(pair)
    return pair


def load_pairs(
    source: str | Path | None = None,
    *,
    split: str = "train",
    config: str | None = None,
    on_error: str = "raise",
    preference_key: str = "better_response_id",
    limit: int | None = None,
) -> tuple[list[PreferencePair], TransformReport]:
    """:func:`read_pku_saferlhf` followed by :func:`safedpo_transform`, row by row.

    ``limit`` counts the returned *pairs* (after the transform drops both-unsafe rows), so
    a file and a directory of the same rows give the same pairs; reading stops as soon as
    ``limit`` pairs are kept, so a large (hub) data set is not read to the end. Malformed
    rows are then those met before that point. Raises ``ValueError`` when no pair is left
    (besides :func:`read_pku_saferlhf`'s errors).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    limit = _check_limit(limit)
    names = _check_preference_key(preference_key, PKU_SAFERLHF_CATEGORIES)
    name, records = _open_source(source, split, config)
    report = TransformReport(category_names=names, category_counts=[0] * len(names))
    issues: list[RowIssue] = []
    pairs: list[PreferencePair] = []
    n_valid = 0
    for i, item in enumerate(_checked_rows(name, records, names, issues)):
        n_valid += 1
        pair = _transform_row(item, i, names, preference_key, report)
        if pair is not None:
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                break
    _finish_reading(name, n_valid, issues, on_error)
    report.skipped_malformed = list(issues)
    if not pairs:
        raise ValueError(
            f"{name} gives no preference pairs: all {report.rows} valid row(s) are both-unsafe pairs, "
            "which the SafeDPO transform drops"
        )
    return pairs, report


def pairs_to_dataset(pairs: Sequence[PreferencePair]):
    """A ``datasets.Dataset`` with TRL's ``prompt`` / ``chosen`` / ``rejected`` columns plus
    ``category`` (multi-hot list of bools) and ``unsafe`` (``[h_chosen, h_rejected]``)."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "prompt": [p.prompt for p in pairs],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs],
            "category": [list(p.categories) for p in pairs],
            "unsafe": [[int(p.chosen_unsafe), int(p.rejected_unsafe)] for p in pairs],
        }
    )


# ----------------------------------------------------------------------- tokenization
DEFAULT_PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
DEFAULT_RESPONSE_TEMPLATE = " {response}"


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    categories: tuple[bool, ...]
    unsafe: tuple[int, int]
    """``(h_chosen, h_rejected)``."""


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    response_template: str = DEFAULT_RESPONSE_TEMPLATE,
    add_eos: bool = True,
) -> list[TokenizedPair]:
    """Tokenize each pair's prompt and its two responses with any HF tokenizer.

    The prompt (``prompt_template``, with the tokenizer's special tokens, e.g. BOS)
    and each response (``response_template``, no special tokens, then EOS when
    ``add_eos``) are tokenized separately and concatenated, so the prompt/response
    boundary is exact whatever the tokenizer merges. ``max_prompt_length`` keeps the
    end of a long prompt; ``max_length`` then cuts the end of a response.
    """
    eos = tokenizer.eos_token_id if add_eos else None
    out = []
    for p in pairs:
        prompt_ids = list(tokenizer(prompt_template.format(prompt=p.prompt), add_special_tokens=True)["input_ids"])
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
        responses = []
        for text in (p.chosen, p.rejected):
            ids = list(tokenizer(response_template.format(response=text), add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            if max_length is not None:
                ids = ids[: max(0, max_length - len(prompt_ids))]
            responses.append(ids)
        out.append(
            TokenizedPair(
                prompt_ids, responses[0], responses[1], p.categories, (int(p.chosen_unsafe), int(p.rejected_unsafe))
            )
        )
    return out


def collate_pairs(
    batch: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """Pad a list of tokenized pairs into the ``catdpo_kernels.loss`` row convention.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``(2B, T)`` (chosen rows
    first, right padding; ``labels`` aligned with ``input_ids``: use
    ``shift_labels=True``), ``categories`` ``(B, C)`` bool, ``unsafe`` ``(2B,)`` int64.
    """
    import torch

    seqs = [(ex.prompt_ids, ex.chosen_ids) for ex in batch] + [(ex.prompt_ids, ex.rejected_ids) for ex in batch]
    width = max(len(p) + len(r) for p, r in seqs)
    if pad_to_multiple_of:
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for i, (prompt, response) in enumerate(seqs):
        n_p, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, n_p:n] = input_ids[i, n_p:n]
    categories = torch.tensor([ex.categories for ex in batch], dtype=torch.bool)
    unsafe = torch.tensor([ex.unsafe[0] for ex in batch] + [ex.unsafe[1] for ex in batch], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "categories": categories,
        "unsafe": unsafe,
    }


# ------------------------------------------------------------- no-download tokenizer
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_word_tokenizer(texts: Iterable[str], *, min_frequency: int = 1):
    """A word-level ``PreTrainedTokenizerFast`` trained on ``texts``; needs no download.

    Words and punctuation are split by the ``tokenizers`` ``Whitespace`` pre-tokenizer
    and lower-cased; BOS is prepended to every ``add_special_tokens=True`` encoding.
    The vocabulary is a pure function of ``texts``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        sorted(set(texts)), WordLevelTrainer(special_tokens=specials, min_frequency=min_frequency, show_progress=False)
    )
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def pair_texts(pairs: Iterable[PreferencePair]) -> Iterator[str]:
    """Every prompt and response of ``pairs``, with the default templates (for a tokenizer)."""
    for p in pairs:
        yield DEFAULT_PROMPT_TEMPLATE.format(prompt=p.prompt)
        yield p.chosen
        yield p.rejected
