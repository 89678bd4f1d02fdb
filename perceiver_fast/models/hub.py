"""Hub-style ``save_pretrained(dir)`` / ``from_pretrained(dir)`` for our models.

The models inherit :class:`HubMixin`: ``huggingface_hub.PyTorchModelHubMixin``
when huggingface_hub is installed (a folder with ``config.json``, the
constructor's keyword arguments, and ``model.safetensors``), else a stand-in
whose two methods say what to install. huggingface_hub stays optional (the
``[hub]`` extra) because the kernels, layers, models and ``perceiver-fast
bench`` need only torch and triton; saving and loading is the one feature that
needs it, and it fails with that hint instead of the package failing to import.
"""
from __future__ import annotations

__all__ = ["HubMixin", "HUB_AVAILABLE", "HUB_TAGS"]

HUB_TAGS = ["perceiver_fast"]

try:
    from huggingface_hub import PyTorchModelHubMixin as HubMixin

    HUB_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    HUB_AVAILABLE = False

    class HubMixin:  # type: ignore[no-redef]
        """Stand-in without huggingface_hub: the models work, saving and loading say what to install."""

        def __init_subclass__(cls, **kwargs) -> None:  # accepts PyTorchModelHubMixin's class keywords
            super().__init_subclass__()

        @staticmethod
        def _missing() -> ImportError:
            return ImportError("save_pretrained/from_pretrained need huggingface_hub and safetensors: "
                               "pip install 'perceiver_fast[hub]'")

        def save_pretrained(self, *args, **kwargs):
            raise self._missing()

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise cls._missing()
