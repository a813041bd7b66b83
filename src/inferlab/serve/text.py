"""From generated token ids to text safe to send, at a cost proportional to the new text only.

IncrementalDetokenizer decodes a small window of recent ids at each token (vLLM's
`detokenize_incrementally`, HF's `DecodeStream`), never the whole answer. StopMatcher follows
each stop string with a Knuth-Morris-Pratt automaton over the characters as they come: it knows
at once when a stop string completes and how many trailing characters could still be the start
of one (held back, not sent). Both cost O(new characters) per token, however long the answer or
the stop strings.
"""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """Text increments of a growing token sequence: whole characters only (a UTF-8 character
    split over tokens decodes as U+FFFD until its last byte comes)."""

    def __init__(self, decode: Decode):
        self.decode = decode
        self.ids: list[int] = []
        # ids[prefix:read] were already turned into text; they give the next token its context
        self.prefix = 0
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left at the end (an incomplete character is dropped)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self.ids[self.prefix:]
        if not window:
            return ""
        before = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self.decode(window)
        if text.endswith("\ufffd") and not final:
            return ""  # wait for the rest of the character
        if final:
            text = text.rstrip("\ufffd")
        seen = before if text.startswith(before) else before.rstrip("\ufffd")
        new = text[len(seen):]
        self.prefix, self.read = self.read, len(self.ids)
        return new


class StopMatcher:
    """The stop strings followed over a character stream: feed() says where the first one ends
    (if it did) and how many trailing characters might still begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.fail = [_prefix_function(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # characters of each stop string matched so far

    def feed(self, text: str) -> int | None:
        """Advance over text; the index just past the first completed stop string, or None."""
        for i, ch in enumerate(text):
            done = False
            for j, s in enumerate(self.stops):
                k, fail = self.state[j], self.fail[j]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                self.state[j] = k
                done = done or k == len(s)
            if done:
                return i + 1
        return None

    def matched_length(self) -> int:
        """The length of the longest stop string completed there (call right after feed())."""
        return max(len(s) for s, k in zip(self.stops, self.state) if k == len(s))

    @property
    def hold(self) -> int:
        """Trailing characters that may be the start of a stop string."""
        return max(self.state, default=0)


def _prefix_function(s: str) -> list[int]:
    """Knuth-Morris-Pratt: per prefix of s, the length of its longest proper prefix-suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class TextAssembler:
    """Token ids in, text increments out: whole characters only, nothing that could be the start
    of a stop string (held back until it is known not to be one), nothing from a stop string on."""

    def __init__(self, decode: Decode, stop: list[str] | StopMatcher):
        self.detok = IncrementalDetokenizer(decode)
        self.matcher = stop if isinstance(stop, StopMatcher) else StopMatcher(stop)
        self.pending = ""  # decoded, not sent: a possible start of a stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        return self._take(self.detok.add(token_id))

    def flush(self) -> str:
        """At the end of generation: what was held back (it was no stop string after all)."""
        if self.stopped:
            return ""
        out = self._take(self.detok.flush())
        out, self.pending = out + self.pending, ""
        return out

    def _take(self, new: str) -> str:
        if self.stopped or not new:
            return ""
        end = self.matcher.feed(new)
        text = self.pending + new
        if end is not None:
            self.stopped = True
            cut = len(self.pending) + end - self.matcher.matched_length()
            self.pending = ""
            return text[:max(cut, 0)]
        keep = min(self.matcher.hold, len(text))
        out, self.pending = text[:len(text) - keep], text[len(text) - keep:]
        return out
