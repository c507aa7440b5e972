"""The in-memory backend (see :mod:`pipelines.memory.loader`)."""
