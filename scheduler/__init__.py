"""Jobs and their states, the Redis Streams work queue, retries, reclaim and fencing."""
