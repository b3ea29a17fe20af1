"""Per-layer override files: glob patterns over node or weight names mapped to rank specs.

```yaml
"*attention*": 0.75     # first matching pattern wins
"lm_head*": skip        # leave dense
```
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from lrcompile.errors import RankSpecError
from lrcompile.numerics.ranks import RankSpec


@dataclasses.dataclass(frozen=True)
class Override:
    """A glob pattern over node or weight names and the spec for the layers it matches."""

    pattern: str
    spec: RankSpec


def load_overrides(path: str | Path) -> tuple[Override, ...]:
    """Reads a JSON or YAML mapping ``{glob pattern: spec or "skip"}``, in file order.

    Raises:
        RankSpecError: The file is missing, unparsable, not a mapping, or holds a bad spec.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RankSpecError(f"{path}: cannot read the override file ({e.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # only needed for YAML override files

            data = yaml.safe_load(text)
    except Exception as e:  # json and yaml raise many types; the message is what matters
        raise RankSpecError(f"{path}: not valid JSON/YAML: {_first_line(e)}") from None
    if not isinstance(data, dict) or not data:
        raise RankSpecError(f"{path}: expected a non-empty mapping of name pattern -> rank spec")
    return tuple(_override(path, str(pattern), spec) for pattern, spec in data.items())


def _override(path: Path, pattern: str, spec: str | float) -> Override:
    try:
        return Override(pattern, RankSpec.parse(spec, allow_skip=True))
    except RankSpecError as e:
        raise RankSpecError(f"{path}: pattern {pattern!r}: {e}") from None


def resolve_spec(
    default: RankSpec, overrides: Sequence[Override], names: Iterable[str]
) -> RankSpec:
    """The spec of the first override whose pattern matches any of ``names``, else ``default``."""
    names = [n for n in names if n]
    for override in overrides:
        if any(fnmatch.fnmatchcase(name, override.pattern) for name in names):
            return override.spec
    return default


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
