"""Lightning callbacks: the artifact at the end of training, data-stream statistics."""
