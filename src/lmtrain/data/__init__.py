"""Text sources, cached token ids and the random-window data module (import the submodules directly)."""
