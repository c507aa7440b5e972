"""The FFCV backend: the view-contract crop decoder, its producer thread and the compiled-loader pool."""
