"""PromQL building blocks that work whether counters are scraped bare (Limitador, a direct scrape)
or with `_total` (an OpenTelemetry pipeline appends it): the name is matched by `__name__`."""

from __future__ import annotations

RATE_WINDOW = "5m"


def series(name: str, *matchers: str, counter: bool = True) -> str:
    """A selector for the names matching regex `name` (each also with `_total` when a counter),
    with extra label matchers."""
    name_matcher = f'__name__=~"{name}(_total)?"' if counter else f'__name__=~"{name}"'
    return "{" + ",".join((name_matcher, *matchers)) + "}"


def rate(selector: str, window: str = RATE_WINDOW) -> str:
    return f"rate({selector}[{window}])"


def of_kind(expression: str, kind: str, *matchers: str) -> str:
    """Keep the elements of `expression` whose route serves a model of this kind (external | gpu),
    from the catalog series: robust where route names (`maas-x`, `x`, `x-kserve-route`) are not."""
    info = "ratelimit_model_info{" + ",".join((f'kind="{kind}"', *matchers)) + "}"
    return f"({expression} and on (limitador_namespace) {info})"
