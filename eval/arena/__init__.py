"""The preference arena: a Pick-a-Pic-style web app that collects a team's pairwise judgments
into a database and exports them in the Pick-a-Pic schema."""
