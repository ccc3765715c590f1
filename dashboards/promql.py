"""PromQL building blocks that work whether counters are scraped bare (Limitador, a direct scrape)
or with `_total` (an OpenTelemetry pipeline appends it): the name is matched by `__name__`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

RATE_WINDOW = "5m"
ROUTE = "limitador_namespace"
CATALOG = "ratelimit_model_info"
# The route-naming convention the seed's "MaaS External Models" dashboard filters on: the MaaS
# controller names an LLMInferenceService's route `<name>-kserve-route`; every other route
# (`<name>`, legacy `maas-<name>`) serves an ExternalModel.
KSERVE_ROUTE = ".*-kserve-route"
ROUTE_CONVENTION = {"external": f'{ROUTE}!~"{KSERVE_ROUTE}"', "gpu": f'{ROUTE}=~"{KSERVE_ROUTE}"'}


@dataclass(frozen=True)
class Selector:
    """`{__name__=~"name(_total)?", matchers...}`: `name` is a regex; counters also match `_total`."""

    name: str
    matchers: tuple[str, ...] = ()
    counter: bool = True

    def where(self, *matchers: str) -> Selector:
        return replace(self, matchers=(*self.matchers, *matchers))

    def __str__(self) -> str:
        name = f'__name__=~"{self.name}(_total)?"' if self.counter else f'__name__=~"{self.name}"'
        return "{" + ",".join((name, *self.matchers)) + "}"


def series(name: str, *matchers: str, counter: bool = True) -> str:
    """A selector for the names matching regex `name` (each also with `_total` when a counter),
    with extra label matchers."""
    return str(Selector(name, matchers, counter))


def rate(selector: str | Selector, window: str = RATE_WINDOW) -> str:
    return f"rate({selector}[{window}])"


def same(selector: str | Selector) -> str:
    return str(selector)


def of_kind(kind: str, selector: Selector, *catalog_matchers: str,
            over: Callable[[str | Selector], str] = rate) -> str:
    """`over(selector)` for the routes that serve a model of this kind (external | gpu).

    A route the catalog (`ratelimit_model_info`) lists is placed by the catalog, which is right
    whatever the route is called; a route it does not list - every route on a plain Limitador,
    where no catalog series exist - by the naming convention. The two halves cover disjoint
    routes, so `or` never drops an element. `catalog_matchers` narrow the catalog's half only
    (its labels, e.g. `model`, may be missing from the call series)."""
    info = CATALOG + "{" + ",".join((f'kind="{kind}"', *catalog_matchers)) + "}"
    listed = f"{over(selector)} and on ({ROUTE}) {info}"
    unlisted = f"{over(selector.where(ROUTE_CONVENTION[kind]))} unless on ({ROUTE}) {CATALOG}"
    return f"(({listed}) or ({unlisted}))"


def route_matchers(kind: str, label_source: Selector) -> list[str]:
    """Label-value matchers (a union) offering the routes of a kind: the catalog's, and those of
    `label_source` named by the convention (all there is on a plain Limitador)."""
    return [f'{CATALOG}{{kind="{kind}"}}', str(label_source.where(ROUTE_CONVENTION[kind]))]
