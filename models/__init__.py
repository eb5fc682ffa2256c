"""Reference models: ``create_model(name)`` / ``list_models()``; one file per family.

Importing this package imports every family module so their ``@register_model``
entries exist before anyone asks the registry.
"""

from . import mlp, mobilenet, pd, resnet, sequence  # noqa: F401  (registers the models)
from .registry import arch_spec, create_model, list_models, model_info, register_model

__all__ = ["arch_spec", "create_model", "list_models", "model_info", "register_model"]
