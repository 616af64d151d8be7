"""The data path: listeners, the client and peer sides of a connection, PROXY protocol."""
