"""Object stores (local filesystem, S3) and the caches in front of them."""
