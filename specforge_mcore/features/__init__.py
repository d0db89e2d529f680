"""The offline feature store: what the frozen target computes for the draft, kept on disk for reuse."""
