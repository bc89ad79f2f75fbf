"""Lightning callbacks: artifact export, data-stream statistics, end-of-training analyses."""
