"""Health: the rise/fall state machine, probes, and the per-pool monitor."""
