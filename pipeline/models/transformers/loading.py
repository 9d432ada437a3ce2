"""What from_pretrained's loading report says it did not load: transformers 5 leaves a missing weight at
random, and one of another shape too under ignore_mismatched_sizes, with a warning only."""
from __future__ import annotations


def loading_problem(info: dict) -> str | None:
    """The first weight from_pretrained would not load (missing: left at random; another shape)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        name, found, wanted = (list(mismatched[0]) + [None, None])[:3]
        return f"{name} is {list(found) if found is not None else '?'} in the file, " \
               f"{list(wanted) if wanted is not None else '?'} in the model"
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.endswith("mask_token"))
    if missing:
        return f"{missing[0]} is not in the file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    return None
