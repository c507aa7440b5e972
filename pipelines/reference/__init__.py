"""The reference backend (torchvision + DataLoader): the semantic oracle the fast backends are tested against."""
