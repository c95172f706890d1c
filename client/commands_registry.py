"""moorctl images pull / push: images from and to registries."""

from moord.client.cli import images  # noqa: F401
