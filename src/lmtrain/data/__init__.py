"""A corpus tokenized into cached ids and the random-window data module (import the submodules directly)."""
