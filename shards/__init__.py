"""Shard format: turning an ImageNet folder into verified, shuffled webdataset tar shards.

Nothing in this package imports torch: the converter runs on machines without it.
"""
