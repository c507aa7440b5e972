"""The store formats convert writes and every backend reads: the layout and manifest, FFCV ``.beton`` and webdataset shards + index."""
