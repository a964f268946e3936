"""The peers package's exceptions; each has a stable ``code`` (the node maps them to messages and exit codes)."""


class PeerError(Exception):
    """Base class of everything the peers package raises."""

    code = "peer_error"


class MissingSecret(PeerError):
    """Discovery needs the cluster secret to sign and check advertisements; set ``peers.secret_file``."""

    code = "missing_secret"


class DuplicateNode(PeerError):
    """Another responder on the network already advertises this node id; give each node its own ``node.id``."""

    code = "duplicate_node"


class DiscoveryUnavailable(PeerError):
    """The mDNS sockets could not be opened or the advertisement could not be published."""

    code = "discovery_unavailable"
