"""The guards the request path uses: InputGuard over a prompt's texts, OutputGuard over a whole
response or, through StreamScanner, a streamed one."""

from __future__ import annotations

from serving.policy.guardrails.config import GuardrailRule
from serving.policy.guardrails.scan import GuardrailAction, GuardrailBlocked, Plan, Scan, Tally, whole


class InputGuard:
    """A policy's input rules, applied to a request's prompt texts before the engine sees them."""

    def __init__(self, rules: list[GuardrailRule]):
        self._count_rules = [r for r in rules if r.kind.reads_prompt_tokens]
        self._plan = Plan([r for r in rules if r.kind.reads_text])

    def check(self, texts: list[str], prompt_tokens: int | None = None) -> tuple[list[str], list[GuardrailAction]]:
        """Returns the texts (redacted where a redact rule matched) and the actions taken.
        Raises GuardrailBlocked on the first block. Injection phrases add up across the texts;
        the token-count rules (max_prompt_tokens) are skipped when prompt_tokens is None (nothing
        counted them)."""
        tally = Tally("input")
        if prompt_tokens is not None:
            for rule in self._count_rules:
                assert rule.kind.over_count is not None  # what makes it a count rule
                reason = rule.kind.over_count(rule, prompt_tokens)
                if reason is not None:
                    if rule.action == "block":
                        raise GuardrailBlocked(
                            rule.label, "input", None, f"Blocked by guardrail `{rule.label}`: {reason}"
                        )
                    tally.add(rule.label, rule.action, None)
        if self._plan.empty:
            return list(texts), tally.actions
        return [whole(self._plan, tally, text) for text in texts], tally.actions


class OutputGuard:
    """A policy's output rules, applied to whole responses (`check_text`) or streams (`stream`)."""

    def __init__(self, rules: list[GuardrailRule]):
        self._plan = Plan(rules)

    @property
    def active(self) -> bool:
        return not self._plan.empty

    def check_text(self, text: str) -> tuple[str, list[GuardrailAction]]:
        """A whole (non-streamed) output: the text as the client may see it, and the actions.
        Raises GuardrailBlocked."""
        tally = Tally("output")
        if self._plan.empty:
            return text, tally.actions
        return whole(self._plan, tally, text), tally.actions

    def stream(self) -> StreamScanner:
        return StreamScanner(self._plan)


class StreamScanner:
    """One streamed output (one choice). Concatenating what feed and flush return gives
    check_text(whole text); nothing of a span that will be blocked or redacted is released.
    `actions` accumulates what was done; after a block it ends with that block (count 1)."""

    def __init__(self, plan: Plan):
        self._plan = plan
        self._tally = Tally("output")
        self.actions: list[GuardrailAction] = self._tally.actions
        self._scan: Scan | None = None  # made on the first feed (a stream read whole needs none)
        self._blocked: GuardrailBlocked | None = None

    def feed(self, text: str) -> str:
        """The text that is safe to release now (redacted). Raises GuardrailBlocked."""
        if self._plan.empty:
            return text
        if self._blocked is not None:
            raise self._blocked
        if self._scan is None:
            self._scan = Scan(self._plan, self._tally)
        try:
            return self._scan.feed(text)
        except GuardrailBlocked as e:
            self._note_block(e)
            raise

    def flush(self) -> str:
        """End of the stream: decide on everything held and release it. Raises GuardrailBlocked."""
        if self._blocked is not None:
            raise self._blocked
        if self._scan is None:
            return ""
        try:
            return self._scan.finish()
        except GuardrailBlocked as e:
            self._note_block(e)
            raise

    def last(self, text: str) -> str:
        """The stream's last text: feed(text) + flush(). When nothing came before it (the whole
        output arrived at once) it is checked as a whole text, which skips the detectors that
        cannot match it instead of searching each for a match that more text could complete."""
        if self._plan.empty:
            return text
        if self._scan is not None or self._blocked is not None:
            return (self.feed(text) if text else "") + self.flush()
        try:
            return whole(self._plan, self._tally, text) if text else ""
        except GuardrailBlocked as e:
            self._note_block(e)
            raise

    def _note_block(self, e: GuardrailBlocked) -> None:
        # The stream's record ends with the block, so the audit shows why it stopped.
        self._blocked = e
        self._tally.add(e.guardrail, "block", e.entity)
