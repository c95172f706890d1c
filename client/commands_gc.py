"""moorctl commands: commands_gc (attached to moord.client.cli.main)."""

from __future__ import annotations
