"""Peer discovery over mDNS (zeroconf) and cluster membership.

A single node needs none of it; the cluster work (advertisement, browsing, signed TXT records, membership mirrored
in Redis) lands here.
"""
