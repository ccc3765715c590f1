"""The MaaS route-naming rules: which Limitador namespace (`<namespace>/<route>`) serves which model.

Route names follow the MaaS controller: an `inference.opendatahub.io` ExternalModel's route is
`status.httpRouteName` (else the model's name; the legacy `maas.opendatahub.io` one is
`maas-<name>`), an LLMInferenceService's is `<name>-kserve-route`, and a MaaSModelRef's status
names its route when it has one. A small models file may state them instead:

    models:
      - {limitador_namespace: maas-demo/gpt-4o, model: gpt-4o, kind: external, provider: openai}

The MaaS translator (`sources/maas.py`) names its namespaces by these rules, and the exporter's
model catalog (`exporter/catalog.py`) publishes them; both read them from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KINDS = ("external", "gpu")


@dataclass(frozen=True, order=True)
class ModelEntry:
    limitador_namespace: str
    model: str
    kind: str
    provider: str


class CatalogError(ValueError):
    pass


def entries_from_documents(documents: Iterable[Any]) -> list[ModelEntry]:
    """Catalog entries from parsed YAML documents (Kubernetes objects, lists, or a models file)."""
    entries: set[ModelEntry] = set()
    for document in documents:
        if not isinstance(document, Mapping):
            continue
        if document.get("kind") == "List":
            entries.update(entries_from_documents(document.get("items") or []))
        elif "models" in document and "kind" not in document:
            entries.update(_from_models_file(document["models"]))
        else:
            entry = _from_object(document)
            if entry is not None:
                entries.add(entry)
    return sorted(entries)


def load_catalog(paths: Iterable[str | Path]) -> list[ModelEntry]:
    documents: list[Any] = []
    for path in paths:
        try:
            documents.extend(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError) as exc:
            raise CatalogError(f"cannot read model catalog {path}: {exc}") from None
    return entries_from_documents(documents)


def _from_models_file(models: Any) -> list[ModelEntry]:
    if not isinstance(models, list):
        raise CatalogError("`models` must be a list")
    entries = []
    for item in models:
        try:
            entry = ModelEntry(str(item["limitador_namespace"]), str(item["model"]), str(item["kind"]),
                               str(item.get("provider", "")))
        except (KeyError, TypeError):
            raise CatalogError(f"a model needs limitador_namespace, model and kind: {item!r}") from None
        if entry.kind not in KINDS:
            raise CatalogError(f"model {entry.model}: kind must be one of {', '.join(KINDS)}")
        entries.append(entry)
    return entries


def _from_object(obj: Mapping[str, Any]) -> ModelEntry | None:
    kind = obj.get("kind")
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace", "default")
    if not name:
        return None
    if kind == "ExternalModel":
        legacy = str(obj.get("apiVersion", "")).startswith("maas.opendatahub.io")
        route = status.get("httpRouteName") or (f"maas-{name}" if legacy else name)
        return ModelEntry(f"{namespace}/{route}", name, "external", str(spec.get("provider", "")))
    if kind == "LLMInferenceService":
        return ModelEntry(f"{namespace}/{name}-kserve-route", name, "gpu", "vllm")
    if kind == "MaaSModelRef":
        ref = spec.get("modelRef") or {}
        external = ref.get("kind") == "ExternalModel"
        model = ref.get("name", name)
        default_route = model if external else f"{model}-kserve-route"
        route = status.get("httpRouteName") or default_route
        route_namespace = status.get("httpRouteNamespace") or namespace
        return ModelEntry(f"{route_namespace}/{route}", model, "external" if external else "gpu",
                          "" if external else "vllm")
    return None
