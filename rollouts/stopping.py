"""Why a path stops: EOS, a finished \\boxed{} answer, repetition, length, depth (TreePO's checks)."""

from __future__ import annotations

import zlib
from collections import Counter

from treetune.data.answers import last_boxed


def has_repetition(text: str, window: int = 32, count: int = 8) -> bool:
    """Whether some `window`-character substring occurs at least `count` times in `text`."""
    if window <= 0 or len(text) < window * count:
        return False
    seen = Counter(text[i : i + window] for i in range(len(text) - window + 1))
    return seen.most_common(1)[0][1] >= count


def finish_reason_for(path_text: str, segment_text: str, engine_reason: str, response_tokens: int,
                      depth: int, *, max_response_tokens: int, max_depth: int | None = None,
                      stop_on_boxed: bool = True, repetition_window: int = 32, repetition_count: int = 8) -> str | None:
    """The reason a path ends after its newest segment, or None while it goes on.

    Checked in TreePO's order: repetition in the new segment, then EOS (reported as "boxed" when
    the path holds a finished \\boxed{} answer, else "eos"), a finished boxed answer without EOS
    (when `stop_on_boxed`), the response length, the depth limit.
    """
    if has_repetition(segment_text, repetition_window, repetition_count):
        return "repetition"
    boxed = last_boxed(path_text) is not None
    if engine_reason == "stop":
        return "boxed" if boxed else "eos"
    if stop_on_boxed and boxed:
        return "boxed"
    if response_tokens >= max_response_tokens:
        return "length"
    if max_depth is not None and depth >= max_depth:
        return "depth"
    return None


def request_seed(seed: int, problem_id: str, node_id: int) -> int:
    """A per-request seed that depends only on the run seed, the problem and the node."""
    return zlib.crc32(f"{seed}:{problem_id}:{node_id}".encode()) & 0x7FFFFFFF
