"""What the entry points run: train, evaluate (its studies and estimators), infer_clash, and the
command-line tasks ``python -m wlshear.tasks.<name> key=value`` (render, mock_field, noise_kernel,
fit_surface, summarize); ``rules``: every entry point's config value table."""
