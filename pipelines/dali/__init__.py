"""The DALI backend: the webdataset feed, the pipeline graph and the CPU scaled-JPEG operator."""
