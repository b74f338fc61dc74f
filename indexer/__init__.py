"""Batch indexing of radiograph archives (reader -> mapper -> writer); built in a later step."""
