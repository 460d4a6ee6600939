"""Datasets, on-disk formats, paired transforms and the synthetic data generator."""
