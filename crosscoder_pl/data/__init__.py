"""Text sources, paired activations, shuffle buffer, activation cache, LightningDataModules."""
