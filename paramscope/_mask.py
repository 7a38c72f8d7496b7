"""Weight-decay mask decisions on dotted paths (no jax needed)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence


def compile_patterns(patterns: Sequence[str] | None, option: str = "pattern") -> list[re.Pattern] | None:
    """Compiles regexes, raising ``ValueError`` that names an invalid one."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"Invalid {option} regex {pattern!r}: {err}") from None
    return compiled


def mask_predicate(
    exclude: Sequence[str] | None, include: Sequence[str] | None = None
) -> Callable[[str], bool]:
    """The weight-decay decision for one dotted path, as :func:`get_param_mask_fn` makes it."""
    if exclude is not None and include is not None:
        raise ValueError("Only one of exclude or include can be set, not both.")
    excluded = compile_patterns(exclude, "exclude")
    included = compile_patterns(include, "include")
    if excluded is not None:
        return lambda path: not any(p.search(path) for p in excluded)
    if included is not None:
        return lambda path: any(p.search(path) for p in included)
    return lambda path: True
