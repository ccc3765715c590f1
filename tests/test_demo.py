"""The demo's scenario (seed 003 section 10.2, Acts 1-4) as an integration test: the real service,
Envoy and OpenAI upstream, exactly as `ratelimit demo` runs them."""

from __future__ import annotations

import io

from ratelimit.demo import run_demo


def test_the_four_acts_through_a_real_envoy() -> None:
    out = io.StringIO()
    transcript = run_demo(out)
    statuses: dict[str, list[int]] = {}
    for call in transcript.calls:
        statuses.setdefault(call.label.rsplit(" req", 1)[0], []).append(call.status)
    # Act 1: charlie's 300 freemium tokens last about 3 calls (~106 tokens each), then 429.
    assert statuses["charlie/freemium"] == [200, 200, 200, 429]
    # Act 2: bob and alice are fine; Act 4: charlie, moved to pro, is too.
    assert statuses["bob/pro"] == statuses["alice/premium"] == statuses["charlie/pro"] == [200] * 5
    # Appendix E: one counter per user and subscription, remaining clamped, a reset time.
    view = {(next(iter(c["set_variables"].values())), c["limit"]["name"]): c for c in transcript.counters}
    freemium = view[("charlie", "models-as-a-service-freemium-subscription-qwen3-8b-tokens")]
    assert freemium["remaining"] == 0 and freemium["overshoot"] == 3 * 106 - 300
    assert view[("charlie", "models-as-a-service-pro-subscription-qwen3-8b-tokens")]["remaining"] == 3000 - 5 * 106
    assert all(0 < c["expires_in_seconds"] <= 300 for c in transcript.counters)
    assert "Charlie is locked out." in out.getvalue() and "remaining" in out.getvalue()
