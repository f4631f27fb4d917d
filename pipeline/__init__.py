"""Data loading: shards (or an image folder) to `(images, labels)` batches on the training device.

Start at `pipeline.loader.create_loader`.
"""
