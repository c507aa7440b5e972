"""Compiled kernels the backends share (JPEG scaled decode, INTER_AREA resize, libffcv bindings); backends share these, never each other."""
