"""Datasets on disk -> webdataset shards -> training batches. Knows nothing about models."""
