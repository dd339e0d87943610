"""Test support that is itself a real thing: servers tests talk to over real sockets."""
