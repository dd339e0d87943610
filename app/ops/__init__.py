"""The operator's side: a CLI that talks to a replica's HTTP API like any other client."""
