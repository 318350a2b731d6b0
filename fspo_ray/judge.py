"""An LLM judge of which of two answers a user prefers, asked in both orders (fspo-method.md §5).

The judge sees the question, two answers labelled "m" (first) and "M" (second) and the user's description,
and says m or M. Every pair is judged twice with the order swapped; a verdict counts only when both orders
name the same answer, so a judge's position bias cannot decide a comparison. Evaluation uses it for win
rates, data generation to label the pairs it writes: it sits below both.
"""

from __future__ import annotations

from collections.abc import Callable

# A judge: (question, first answer, second answer, user description, user preferences) -> "m", "M" or "?".
Judge = Callable[[str, str, str, str, dict], str]

JUDGE_PROMPT = (
    "You are judging which of two answers a particular user would prefer.\n"
    "User description: {description}\n\nQuestion: {question}\n\n"
    "Answer m:\n{first}\n\nAnswer M:\n{second}\n\n"
    "Which answer does this user prefer? Reply with m or M only.\nVerdict:"
)


def judge_prompt(question: str, first: str, second: str, description: str) -> str:
    return JUDGE_PROMPT.format(description=description, question=question, first=first, second=second)


def parse_verdict(text: str) -> str | None:
    stripped = text.strip()
    return stripped[0] if stripped[:1] in ("m", "M") else None


def order_consistent(first_order: str | None, swapped_order: str | None) -> str | None:
    """Which answer won, "a" or "b", from the verdicts on (a, b) and on (b, a); None when they disagree."""
    if first_order == "m" and swapped_order == "M":
        return "a"
    if first_order == "M" and swapped_order == "m":
        return "b"
    return None


def judge_both_orders(judge: Judge, question: str, ours: str, theirs: str, description: str, prefs: dict) -> str | None:
    """ "win", "loss", or None when the two orders disagree."""
    winner = order_consistent(judge(question, ours, theirs, description, prefs),
                              judge(question, theirs, ours, description, prefs))  # fmt: skip
    return {"a": "win", "b": "loss"}.get(winner)


def endpoint_judge(url: str, model: str, api_key: str | None = None) -> Judge:
    """An OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API) as the judge."""
    import httpx

    def judge(question: str, first: str, second: str, description: str, preferences: dict) -> str:
        response = httpx.post(
            f"{url.rstrip('/')}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": judge_prompt(question, first, second,
                                                                                          description)}],
                  "max_tokens": 2, "temperature": 0},
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=120,
        )  # fmt: skip
        response.raise_for_status()
        return parse_verdict(response.json()["choices"][0]["message"]["content"]) or "?"

    return judge
