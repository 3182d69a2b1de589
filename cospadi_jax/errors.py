"""Exception types shared across cospadi-jax (each message names the problem and the fix)."""

from __future__ import annotations


class HubUnavailableError(ConnectionError):
    """A Hugging Face hub id (model or dataset) was given but the hub cannot be reached."""
