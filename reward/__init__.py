"""Judges, preference labels and the data they feed to reward modelling. Knows nothing about the stages."""
