"""lb: a Consul-native TCP load balancer on Twisted."""

__version__ = "0.1.0"
