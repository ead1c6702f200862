"""The toy world's tools: its Pick-a-Pic-style data, the oracle's judging of runs, the toy bases'
pretraining and ``make demo``."""
