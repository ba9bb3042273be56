"""Input and output guardrails: PII, prompt-injection heuristics, deny-lists, prompt size.

A tenant's guardrail policy is two lists of rules, `input` (the prompt, before the engine sees
it) and `output` (the response, before the client sees it). Each rule detects something and
takes one action: `block` (the request or the stream ends with an error that never repeats the
matched text), `redact` (the match is masked in place: `[EMAIL]`, ..., `[REDACTED]` for
deny-lists) or `flag` (recorded only; the text is unchanged).

Detection runs on a normalised view of the text (`normalise`: compatibility forms such as
full-width and mathematical letters, invisible characters dropped, accents and combining marks
dropped, Cyrillic and Greek look-alikes and Unicode dashes, dots and spaces folded to ASCII);
what is released is the text as written, with only the matched spans masked.

The package, by concern: `config` (the rules), `normalise` (the view), `pii`, `injection` and
`deny` (what each rule type looks for), `detectors` (a rule compiled), `scan` (every detector
over a text, whole or streamed), `guards` (what the request path calls).
"""

from serving.policy.guardrails.config import GuardrailPolicy, GuardrailRule
from serving.policy.guardrails.deny import DENY_MASK
from serving.policy.guardrails.guards import InputGuard, OutputGuard, StreamScanner
from serving.policy.guardrails.injection import DEFAULT_INJECTION_THRESHOLD
from serving.policy.guardrails.pii import MASKS, PII_ENTITIES
from serving.policy.guardrails.scan import MAX_HOLD, GuardrailAction, GuardrailBlocked

__all__ = [
    "DEFAULT_INJECTION_THRESHOLD",
    "DENY_MASK",
    "MASKS",
    "MAX_HOLD",
    "PII_ENTITIES",
    "GuardrailAction",
    "GuardrailBlocked",
    "GuardrailPolicy",
    "GuardrailRule",
    "InputGuard",
    "OutputGuard",
    "StreamScanner",
]
