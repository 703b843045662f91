"""What training minimises and reports: loss (the loss family, pure functions of log-probs), metrics (named
sums accumulated on the device), step (the one loss step of train, evaluate and the bench)."""
