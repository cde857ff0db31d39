"""Whether a data or model source names a Hugging Face hub repository rather than a local path.

Kept free of torch: the training program's option checks use it before any heavy import.
"""

from __future__ import annotations

import re

# A file extension: a dot and a letter-led suffix (``.jsonl``, ``.csv``, ``.gz``); ``2.5`` in a
# hub name such as ``teknium/OpenHermes-2.5`` is a version, not an extension.
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,9}$")


def looks_like_hub_name(text: str) -> bool:
    """A bare ``owner/name``: one ``/``, nothing path-like around it."""
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and "\\" not in text
        and not _EXTENSION.search(parts[1])
    )
