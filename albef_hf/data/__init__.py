"""Data: synthetic world, training transforms, dataset readers and collators."""
