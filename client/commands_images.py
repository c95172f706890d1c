"""moorctl images: export, check, usage, tag and the rest of the Images API."""

from moord.client.cli import images  # noqa: F401
