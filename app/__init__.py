"""paydispatch: exactly-once payment dispatch through leader election and fencing."""
