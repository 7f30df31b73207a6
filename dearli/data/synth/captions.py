"""Captions of synthetic scenes: plain English naming every class present, with counts.

Example: "two red circles, a blue square and a crowd of yellow stars on grass and sand under sky".
Every annotated segment's class display name appears verbatim (things pluralised on the last word),
so a text encoder trained on captions learns exactly the words the M2F-Lang classifier embeds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from dearli.data.synth.classes import CLASSES

_NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def plural(name: str) -> str:
    """Plural of a class name, inflecting its last word ("red cross" -> "red crosses")."""
    head, _, last = name.rpartition(" ")
    last = last + "es" if last.endswith(("s", "x", "sh", "ch")) else last + "s"
    return f"{head} {last}" if head else last


def article(word: str) -> str:
    """ "an" before a vowel sound ("an orange cross"), else "a"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def count_phrase(count: int, name: str) -> str:
    """ "a red circle", "an orange star", "three red circles", "many red circles" (above ten)."""
    if count == 1:
        return f"{article(name)} {name}"
    word = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else "many"
    return f"{word} {plural(name)}"


def join_words(parts: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(segments: Sequence[dict], stuff_order: Sequence[int] = ()) -> str:
    """Caption of a scene from its final segments.

    Args:
        segments: dicts with category_id and iscrowd.
        stuff_order: stuff category ids in the order to name them (e.g. top to bottom); stuff present in
            ``segments`` but missing here is appended in id order.
    Returns:
        One sentence without final punctuation.
    """
    counts = Counter(s["category_id"] for s in segments if CLASSES[s["category_id"]].isthing and not s["iscrowd"])
    crowds = sorted({s["category_id"] for s in segments if s["iscrowd"]})
    # Most numerous first, then by class id, so the sentence is deterministic.
    things = [count_phrase(n, CLASSES[c].name) for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    things += [f"a crowd of {plural(CLASSES[c].name)}" for c in crowds]
    present = {s["category_id"] for s in segments if not CLASSES[s["category_id"]].isthing}
    ordered = [c for c in stuff_order if c in present] + sorted(present.difference(stuff_order))
    ground = [CLASSES[c].name for c in ordered if CLASSES[c].kind != "sky"]
    has_sky = any(CLASSES[c].kind == "sky" for c in ordered)
    caption = join_words(things) if things else "an empty scene"
    if ground:
        caption += " on " + join_words(ground)
    if has_sky:
        caption += " under sky" if ground or not things else " in the sky"
    return caption
